"""Media I/O for references and outputs: load images / clips, fit-and-pad, 4n+1 clips, H.264 mp4, Wan i2v crop.

Conventions
-----------
* Frames are `torch.uint8` tensors [T, H, W, 3] (RGB, channel-last, CPU). An image is a 1-frame clip.
* Model-space pixels are float32 [3, T, H, W] in [-1, 1], computed as `(x / 255 - 0.5) / 0.5`, exactly the
  official `TF.to_tensor(img).sub_(0.5).div_(0.5)` (`to_model_range`).

`load_media(x)` input rules
---------------------------
* a path (str / Path): images `.png .jpg .jpeg .webp .bmp` through PIL (first frame of an animated file; EXIF
  orientation applied), videos `.mp4 .mov .webm .mkv .avi .gif` through PyAV (all frames, or the first
  `max_frames`). Anything else is a `MediaError`, as is a missing, unreadable or corrupt file or a clip with no
  frames.
* an encoded file in memory (`bytes`, `bytearray`, `memoryview`, `io.BytesIO`), e.g. a server request's payload:
  an image when PIL recognises PNG, JPEG, WebP or BMP (as the image extensions above), otherwise a video for PyAV
  (GIF included, as for files); neither is a `MediaError`.
* a `PIL.Image.Image`.
* a numpy array or torch tensor. dtype: uint8 ([0, 255]) or floating point in [0, 1] (a tolerance of 1e-3 is
  clamped). Floats outside [0, 1] are rejected, never guessed: [-1, 1] data (our model range) must be mapped with
  `(x + 1) / 2` first, 0..255 floats cast to uint8. Other dtypes (bool, uint16, int64, ...) are rejected.
  Accepted layouts, with C in {1, 3, 4} unless stated:
      [H, W] (grayscale)   [H, W, C]   [C, H, W]   [T, H, W, C]   [3, T, H, W] (this library's model layout)
  A shape that fits more than one layout (e.g. [3, 64, 3] or [3, H, W, 3]) is rejected as ambiguous; pass
  `layout=` ("HW", "HWC", "CHW", "THWC", "CTHW") to say which. torchvision's [T, C, H, W] is not accepted
  (permute it to [T, H, W, C]). CUDA tensors are copied to the CPU.
* Grayscale is repeated to RGB; an alpha channel (RGBA, LA, palette transparency, 4-channel arrays) is composited
  over black, the default padding colour; 16-bit grayscale images are scaled to 8 bits.
A Python object of another type raises TypeError.

Reference clips (`load_clip`)
-----------------------------
A reference keeps at most `max_frames` frames (4n+1): `clip_indices` is the rule (`to_4n_plus_1` applies it to
frames in memory). A video is decoded streaming: every frame is decoded, but only the frames the rule keeps are
converted to RGB, fitted to the working size and stored, so memory is that of the result (at most `max_frames`
fitted frames), not of the clip. The rule needs the frame count before the first frame is kept: the container's
count, or, when it states none (Matroska / WebM, some AVI), a count of the stream's packets (a demux pass, no
decoding). The decode pass counts the frames it decodes to the end; where that differs from the count it started
from (an edit list, a wrong header), a second pass selects by the decoded count. The selection is therefore always
exactly the one `to_4n_plus_1` makes on the whole decoded clip; a wrong count costs time (one more pass), never
memory or a different frame. `fps=` / `long_clip=` resample first and keep a centred run (`select_frames`).
"""
from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence, Union

import numpy as np
import torch

from .frame_ops import (Fit, MediaError, canvas, check_fit, check_frames, check_max_frames, clip_indices, fit_and_pad,
                        check_fps, fit_box, fitted, paste, select_frames, to_4n_plus_1, to_model_range, writable)

ASSET_DIR = Path(__file__).resolve().parent / "assets"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".gif")
LAYOUTS = ("HW", "HWC", "CHW", "THWC", "CTHW")
H264_ENCODERS = ("libx264", "h264", "libopenh264")
_FLOAT_TOL = 1e-3
_PIL_IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP")  # PIL's names for what IMAGE_EXTENSIONS hold
InMemoryFile = Union[bytes, bytearray, memoryview, io.BytesIO]


class ClipTooLong(MediaError):
    """A clip longer than the bound a caller set (`load_clip(max_source_frames=, max_seconds=)`)."""


def _supported() -> str:
    return f"images {' '.join(IMAGE_EXTENSIONS)}; videos {' '.join(VIDEO_EXTENSIONS)}"


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def _pil_to_rgb_array(img) -> np.ndarray:
    """A PIL image -> uint8 [H, W, 3]; EXIF orientation applied, alpha composited over black."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not make an otherwise good image unusable
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8)  # a writable copy


def _load_image(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MediaError(f"{path}: cannot read the file ({e})") from e
    image = _image_from_bytes(data, str(path))
    if image is None:
        raise MediaError(f"{path}: not a readable image (the data is not {' / '.join(_PIL_IMAGE_FORMATS)}); "
                         f"supported: {_supported()}")
    return image


def _in_memory(x) -> bytes | None:
    """The bytes of an encoded file held in memory; None for any other input."""
    if isinstance(x, bytes):
        return x
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, io.BytesIO):
        return x.getvalue()
    return None


def _image_from_bytes(data: bytes, what: str) -> np.ndarray | None:
    """uint8 [1, H, W, 3] if `data` is an image PIL recognises as PNG / JPEG / WebP / BMP; None otherwise (then
    it is a video, GIF included, which PyAV decodes as it does a .gif file)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise MediaError(f"{what}: image too large to load safely ({e})") from e
    except (OSError, SyntaxError, ValueError):  # not an image PIL knows: a video, or garbage PyAV will refuse
        return None
    with img:
        if img.format not in _PIL_IMAGE_FORMATS:
            return None
        try:
            img.load()
            return _pil_to_rgb_array(img)[None]
        except Image.DecompressionBombError as e:
            raise MediaError(f"{what}: image too large to load safely ({e})") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{what}: a {img.format} image that cannot be read ({type(e).__name__}: {e})") from e


class VideoData(NamedTuple):
    frames: torch.Tensor  # uint8 [T, H, W, 3]
    fps: float | None
    codec: str


class _Video(NamedTuple):
    """A video to decode: a path or the bytes of a file, and how errors name it."""

    src: str | bytes
    what: str


class _Decoded(NamedTuple):
    frames: np.ndarray | None  # uint8 [k, h, w, 3], the kept frames (None when none was reached)
    count: int  # frames decoded
    fps: float | None
    codec: str


def _open_video(video: _Video):
    import av

    try:
        return av.open(io.BytesIO(video.src) if isinstance(video.src, bytes) else video.src)
    except (av.FFmpegError, OSError, ValueError) as e:
        kind = "an image or video" if isinstance(video.src, bytes) else "a readable video"
        raise MediaError(f"{video.what}: not {kind} ({type(e).__name__}: {e}); supported: {_supported()}") from e


def _stated_frames(stream) -> int:
    """The frame count the container states for a stream; 0 when it states none (Matroska, WebM)."""
    return int(stream.frames or 0)


def _stated_seconds(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else None  # AV_TIME_BASE units


def _too_long(video: _Video, frames: int | None, seconds: float | None, max_source_frames: int | None,
              max_seconds: float | None) -> None:
    if max_source_frames is not None and frames is not None and frames > max_source_frames:
        raise ClipTooLong(f"{video.what}: the clip has more than {max_source_frames} frames, the limit")
    if max_seconds is not None and seconds is not None and seconds > max_seconds:
        raise ClipTooLong(f"{video.what}: the clip lasts {seconds:.3g} s, longer than the limit of {max_seconds:g} s")


def _frame_count(video: _Video, max_source_frames: int | None, max_seconds: float | None) -> tuple[int, float | None]:
    """The clip's frame count as the container states it, else its packets counted (a demux pass, nothing decoded),
    and its stated rate (or None). Refuses a clip whose stated length passes a limit before anything is decoded."""
    import av

    container = _open_video(video)
    with container:
        if not container.streams.video:
            raise MediaError(f"{video.what}: the file has no video stream")
        stream = container.streams.video[0]
        n, rate = _stated_frames(stream), stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        _too_long(video, n or None, _stated_seconds(container, stream), max_source_frames, max_seconds)
        if n:
            return n, fps
        try:
            for packet in container.demux(stream):
                n += packet.size > 0  # the final empty packet only flushes the demuxer
                _too_long(video, n, None, max_source_frames, None)
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"{video.what}: reading failed after {n} packet(s) ({type(e).__name__}: {e})") from e
    return n, fps


def _decode(video: _Video, keep: np.ndarray | None = None, first: int | None = None, fit: Fit | None = None,
            to_end: bool = False, max_source_frames: int | None = None,
            max_seconds: float | None = None) -> _Decoded:
    """One decoding pass, converting to RGB and storing only the frames it keeps.

    keep: increasing frame indices to keep, stored in order in one buffer of len(keep) frames (fitted as they
    arrive when `fit` is given, so that only fitted frames are ever stored); None keeps every frame, or the first
    `first`. Decoding stops after the last kept frame unless `to_end` (to count the clip's frames). Refuses a clip
    that decodes to more than max_source_frames frames or max_seconds (the stated length is `_frame_count`'s)."""
    import av

    if fit is not None and keep is None:
        raise ValueError("fitting while decoding needs the kept frame indices")
    container = _open_video(video)
    with container:
        if not container.streams.video:
            raise MediaError(f"{video.what}: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        slots = None if keep is None else {int(i): k for k, i in enumerate(keep)}
        stop = (first if keep is None else int(keep[-1]) + 1) if not to_end else None
        out: np.ndarray | None = None
        kept: list[np.ndarray] = []
        size = box = start_time = None
        count = 0
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.height, frame.width)
                    box = fit_box(*size, fit.height, fit.width) if fit else None
                    start_time = frame.time
                elif (frame.height, frame.width) != size:
                    raise MediaError(f"{video.what}: the frame size changes inside the clip (from {size[1]}x{size[0]} "
                                     f"to {frame.width}x{frame.height} at frame {count})")
                _too_long(video, count + 1, None if frame.time is None or start_time is None
                          else frame.time - start_time, max_source_frames, max_seconds)
                k = count if slots is None else slots.get(count)
                if k is not None:
                    rgb = frame.to_ndarray(format="rgb24")  # uint8 [h, w, 3]
                    if slots is None:
                        kept.append(rgb)
                    elif fit is not None:
                        if out is None:
                            out = canvas(len(keep), fit)  # uint8 [len(keep), height, width, 3]
                        paste(out[k], rgb, box)
                    else:
                        if out is None:
                            out = np.empty((len(keep), *rgb.shape), np.uint8)
                        out[k] = rgb
                count += 1
                if stop is not None and count >= stop:
                    break
        except MediaError:
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            raise MediaError(f"{video.what}: decoding failed after {count} frame(s) ({type(e).__name__}: {e})") from e
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else None
        codec = stream.codec_context.name
    if count == 0:
        raise MediaError(f"{video.what}: the video has zero frames")
    if slots is None:
        out = np.stack(kept)
    return _Decoded(out, count, fps, codec)


def _clip_from_video(video: _Video, max_frames: int, fit: Fit | None, max_source_frames: int | None,
                     max_seconds: float | None, fps: float | None = None, long_clip: str = "subsample") -> np.ndarray:
    """The frames `select_frames` keeps, decoded streaming (module docstring): uint8 [T, h, w, 3]; a source frame
    kept twice (a slow clip resampled up) is decoded and fitted once."""
    n, rate = _frame_count(video, max_source_frames, max_seconds)
    n = max(1, n)  # a count of 0 is corrected by the decode pass
    for _ in range(2):
        keep = select_frames(n, max_frames, src_fps=rate, fps=fps, long_clip=long_clip)
        unique = np.unique(keep)  # increasing, as `_decode` stores them
        got = _decode(video, unique, fit=fit, to_end=True, max_source_frames=max_source_frames,
                      max_seconds=max_seconds)
        if got.count == n:
            return got.frames if len(unique) == len(keep) else got.frames[np.searchsorted(unique, keep)]
        n, rate = got.count, got.fps or rate  # the count was wrong (an edit list, a header): select again
    raise MediaError(f"{video.what}: two decoding passes gave different frame counts; the file is unreliable")


def read_video(path: str | Path, max_frames: int | None = None) -> VideoData:
    """Decode a video file: (frames uint8 [T, H, W, 3], fps, codec name as FFmpeg reports it, e.g. "h264").
    Every frame is kept (or the first `max_frames`): memory grows with the clip; `read_frames` and `load_clip`
    keep only some."""
    path = _check_path(path)
    check_max_frames(max_frames)
    got = _decode(_Video(str(path), str(path)), first=max_frames)
    return VideoData(torch.from_numpy(got.frames), got.fps, got.codec)


def read_frames(source: str | Path | InMemoryFile, indices: Iterable[int]) -> torch.Tensor:
    """The frames of a video (path or in-memory file) at `indices` (any order, repeats allowed): uint8
    [len(indices), H, W, 3]. Only those frames are converted and stored; decoding stops after the last one, so
    memory does not depend on where in the clip they lie. A clip shorter than an index is a MediaError."""
    idx = np.asarray(list(indices), dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0:
        raise ValueError(f"indices must be a non-empty list of frame indices >= 0, got {idx.tolist()!r}")
    video = _source(source) if isinstance(source, (str, Path)) or _in_memory(source) is not None else None
    if not isinstance(video, _Video):
        raise MediaError(f"read_frames reads a video file (a path with a video extension or its bytes), got "
                         f"{source if isinstance(source, (str, Path)) else type(source).__name__}")
    wanted = np.unique(idx)  # increasing
    got = _decode(video, wanted)
    if got.count <= wanted[-1]:
        raise MediaError(f"{video.what}: frame {int(wanted[-1])} asked for, but the clip has {got.count} frames")
    frames = got.frames if np.array_equal(wanted, idx) else got.frames[np.searchsorted(wanted, idx)]
    return torch.from_numpy(frames)


def _check_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: file not found")
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, not an image or video file")
    return path


def _match_layouts(shape: tuple) -> list[str]:
    nd, ch = len(shape), (1, 3, 4)
    out = []
    if nd == 2:
        out.append("HW")
    elif nd == 3:
        if shape[-1] in ch:
            out.append("HWC")
        if shape[0] in ch:
            out.append("CHW")
    elif nd == 4:
        if shape[-1] in ch:
            out.append("THWC")
        if shape[0] == 3:
            out.append("CTHW")
    return out


def _array_to_frames(a, what: str, layout: str | None) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        if a.dtype.kind not in "uif":
            raise MediaError(f"{what} has dtype {a.dtype}; use uint8 in [0, 255] or float in [0, 1]")
        t = torch.from_numpy(writable(a))
    else:
        t = a.detach()
        if t.device.type != "cpu":
            t = t.cpu()
    shape = tuple(t.shape)
    if t.dtype == torch.uint8:
        pass
    elif t.is_floating_point():
        if t.numel() and not torch.isfinite(t).all():
            raise MediaError(f"{what} holds NaN or inf values")
        if t.numel():
            lo, hi = t.min().item(), t.max().item()
            if lo < -_FLOAT_TOL or hi > 1 + _FLOAT_TOL:
                hint = ("data in [-1, 1] (model range) must be mapped with (x + 1) / 2" if lo < 0
                        else "0..255 data must be cast to uint8")
                raise MediaError(f"{what}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; {hint}")
        t = (t.float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise MediaError(f"{what} has dtype {str(t.dtype).replace('torch.', '')}; use uint8 in [0, 255] "
                         f"or float in [0, 1]")

    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if len(layout) != len(shape) or (layout != "HW" and shape[layout.index("C")] not in (1, 3, 4)):
            raise MediaError(f"{what} of shape {list(shape)} does not fit layout {layout!r}")
        chosen = layout
    else:
        fits = _match_layouts(shape)
        if not fits:
            raise MediaError(
                f"{what} has shape {list(shape)}; supported layouts are [H, W], [H, W, C], [C, H, W], "
                f"[T, H, W, C] with C in 1/3/4, and [3, T, H, W] (torchvision's [T, C, H, W] must be permuted "
                f"to [T, H, W, C])")
        if len(fits) > 1:
            raise MediaError(f"{what} of shape {list(shape)} is ambiguous: it fits layouts {fits}; "
                             f"pass layout= to choose")
        chosen = fits[0]
    perm = {"HW": None, "HWC": (0, 1, 2), "CHW": (1, 2, 0), "THWC": (0, 1, 2, 3), "CTHW": (1, 2, 3, 0)}[chosen]
    if chosen == "HW":
        t = t[None, :, :, None]
    else:
        t = t.permute(*perm)
        if t.ndim == 3:
            t = t[None]
    if 0 in t.shape:
        what_zero = "zero frames" if t.shape[0] == 0 else "an empty frame size"
        raise MediaError(f"{what} of shape {list(shape)} has {what_zero}")
    return _to_rgb(t)


def _to_rgb(t: torch.Tensor) -> torch.Tensor:
    c = t.shape[-1]
    if c == 1:
        t = t.expand(*t.shape[:-1], 3)
    elif c == 4:  # composite over black
        a = t[..., 3:].float() / 255
        t = (t[..., :3].float() * a).round().to(torch.uint8)
    return t.contiguous()


def _source(x, layout: str | None = None) -> _Video | torch.Tensor:
    """What an input is: a video to decode (a path with a video extension, or in-memory bytes that are no image),
    or frames uint8 [T, H, W, 3] (image files, PIL images, arrays, tensors)."""
    if isinstance(x, (str, Path)):
        path = _check_path(x)
        ext = path.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            return torch.from_numpy(_load_image(path))
        if ext in VIDEO_EXTENSIONS:
            return _Video(str(path), str(path))
        raise MediaError(f"{path}: unsupported file type {ext or '(no extension)'!r}; supported: {_supported()}")
    data = _in_memory(x)
    if data is not None:
        what = f"in-memory file ({len(data)} bytes)"
        if not data:
            raise MediaError(f"{what}: empty; pass the bytes of an image or video file")
        image = _image_from_bytes(data, what)
        return _Video(data, what) if image is None else torch.from_numpy(image)
    try:
        from PIL import Image
        is_pil = isinstance(x, Image.Image)
    except ImportError:  # pragma: no cover
        is_pil = False
    if is_pil:
        return torch.from_numpy(_pil_to_rgb_array(x))[None]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _array_to_frames(x, f"{type(x).__name__}", layout)
    raise TypeError(f"cannot load media from a {type(x).__name__}; pass a file path, the bytes of a file, a PIL "
                    f"image, a numpy array or a torch tensor")


def load_media(x, max_frames: int | None = None, *, layout: str | None = None) -> torch.Tensor:
    """Load an image or clip (path, bytes of a file, PIL image, numpy array or torch tensor) as uint8 [T, H, W, 3].

    `max_frames` keeps the first `max_frames` frames (a video stops decoding there). See the module docstring
    for the accepted forms; errors are `MediaError` (a ValueError) except for unsupported Python types
    (TypeError). A whole video is held in memory: `load_clip` is the bounded way to read a reference."""
    check_max_frames(max_frames)
    src = _source(x, layout)
    if isinstance(src, _Video):
        frames = torch.from_numpy(_decode(src, first=max_frames).frames)
    else:
        frames = src
    if max_frames is not None:
        frames = frames[:max_frames]
    return frames.contiguous()


def load_clip(x, max_frames: int, size: tuple[int, int] | None = None, pad_value: int | Sequence[int] = (0, 0, 0), *,
              layout: str | None = None, max_source_frames: int | None = None, max_seconds: float | None = None,
              fps: float | None = None, long_clip: str = "subsample") -> torch.Tensor:
    """A reference as the engine uses it: the frames the 4n+1 rule keeps of any input `load_media` accepts
    (`clip_indices`, i.e. `to_4n_plus_1(load_media(x), max_frames)`), each fitted into size = (height, width) and
    padded with `pad_value` when a size is given (`fit_and_pad`'s pixels before its [-1, 1] mapping, bit for bit).
    Returns uint8 [T, H, W, 3], T = 4n+1 <= max_frames.

    A video (path or in-memory file) is decoded streaming, keeping only the selected frames, each fitted as it
    arrives: memory is that of the result whatever the clip's length (the module docstring says how the frame
    count is found). `max_source_frames` / `max_seconds` refuse a longer clip, by its stated length before
    decoding and by what is decoded while decoding (a server's bound on work); None: no bound.
    `fps` resamples a video first (from its stated rate; frames in memory are taken as they are) and `long_clip`
    says what a longer clip keeps: `frame_ops.select_frames` is the rule (the defaults give `clip_indices`)."""
    check_max_frames(max_frames)
    if max_frames is None:
        raise ValueError("max_frames is required")
    check_max_frames(max_source_frames)
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number or None, got {max_seconds!r}")
    if size is not None and (not isinstance(size, (tuple, list)) or len(size) != 2):
        raise ValueError(f"size must be (height, width), got {size!r}")
    check_fps(fps)
    fit = None if size is None else check_fit(*size, pad_value)
    src = _source(x, layout)
    if isinstance(src, _Video):
        return torch.from_numpy(_clip_from_video(src, max_frames, fit, max_source_frames, max_seconds, fps, long_clip))
    if max_source_frames is not None and src.shape[0] > max_source_frames:
        raise ClipTooLong(f"the clip has more than {max_source_frames} frames, the limit")
    frames = src[torch.from_numpy(select_frames(src.shape[0], max_frames, long_clip=long_clip))]
    if fit is None:
        return frames.contiguous()
    box = fit_box(frames.shape[1], frames.shape[2], fit.height, fit.width)
    return torch.from_numpy(fitted(frames.numpy(), fit, box))


# ---------------------------------------------------------------------------------------------------------------
# The official Wan image-to-video crop
# ---------------------------------------------------------------------------------------------------------------

def crop_center_to(image, width: int, height: int) -> torch.Tensor:
    """Official Wan i2v resize-and-crop: scale = max(width / iw, height / ih), resize to (round(iw * scale),
    round(ih * scale)) with LANCZOS, centre-crop to width x height (offsets floor((rw - width) / 2), ...).

    `image`: anything `load_media` accepts (every frame is processed). Returns uint8 [T, height, width, 3]; use
    `to_model_range` for the [-1, 1] tensor the VAE takes."""
    from PIL import Image

    if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
        raise ValueError(f"width and height must be positive ints, got {width!r} x {height!r}")
    frames = image if (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 4
                       and image.shape[-1] == 3) else load_media(image)
    frames = check_frames(frames)
    _, ih, iw, _ = frames.shape
    scale = max(width / iw, height / ih)
    rw, rh = round(iw * scale), round(ih * scale)
    x1, y1 = (rw - width) // 2, (rh - height) // 2
    out = []
    for f in frames.numpy():
        img = Image.fromarray(f).resize((rw, rh), Image.LANCZOS).crop((x1, y1, x1 + width, y1 + height))
        out.append(np.asarray(img))
    return torch.from_numpy(np.stack(out))


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

def h264_encoder() -> str:
    """Name of the first H.264 encoder this PyAV build has (libx264, h264, libopenh264); MediaError if none."""
    import av

    for name in H264_ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    raise MediaError(f"this PyAV/FFmpeg build has no H.264 encoder (tried {', '.join(H264_ENCODERS)}); install a "
                     f"PyAV wheel built with libx264")


def write_mp4(frames, path: str | Path, fps: float = 24, *, crf: int = 18, preset: str = "medium") -> Path:
    """Write uint8 [T, H, W, 3] frames as H.264 (yuv420p) mp4 at `fps`; returns the path.

    yuv420p needs even sizes: an odd height / width is padded by repeating the last row / column (the file is
    then one pixel larger in that direction). libx264 gets `crf` (0 lossless .. 51; 18 is visually lossless) and
    `preset`; the moov atom is written first (`+faststart`) so the file streams. Colour conversion is FFmpeg's
    default (BT.601, limited range), as in the official Wan `cache_video` path."""
    import av

    frames = check_frames(frames)
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    rate = Fraction(fps).limit_denominator(1001)
    t, h, w, _ = frames.shape
    arr = frames.numpy()
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = h + h % 2, w + w % 2
    codec = h264_encoder()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec in ("libx264", "h264"):
                stream.options = {"crf": str(int(crf)), "preset": preset}
            else:
                stream.bit_rate = int(0.15 * w * h * float(rate))
            for i in range(t):
                frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
                frame.pts = i
                frame.time_base = 1 / rate
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    except (av.FFmpegError, OSError, ValueError) as e:
        path.unlink(missing_ok=True)
        raise MediaError(f"could not write {path}: {type(e).__name__}: {e}") from e
    return path


__all__ = ["MediaError", "ClipTooLong", "VideoData", "load_media", "load_clip", "read_video", "read_frames",
           "write_mp4", "h264_encoder", "crop_center_to", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "LAYOUTS",
           "ASSET_DIR", "InMemoryFile", "clip_indices", "select_frames", "to_4n_plus_1", "fit_and_pad",
           "to_model_range"]  # the last five re-exported from frame_ops, the rules load_clip applies
