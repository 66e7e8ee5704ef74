"""anyid_rt.media: loading every input form, fit-and-pad geometry, 4n+1 clips, reference clips decoded streaming
(same frames as the whole decode, memory independent of the clip's length), H.264 mp4, Wan i2v preprocessing."""
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

av = pytest.importorskip("av", reason="PyAV is not installed (the GPU machines lack it)")

from anyid_rt import media
from anyid_rt.media import (ASSET_DIR, MediaError, crop_center_to, fit_and_pad, fit_box, load_clip, load_media,
                            read_video, to_4n_plus_1, to_model_range, write_mp4)

from helpers import best_output_size, wan_i2v_image

ASTRONAUT = ASSET_DIR / "astronaut.png"
CLIP = ASSET_DIR / "astronaut_clip.mp4"


def _smooth(t=5, h=48, w=64, seed=0):
    """A smooth, moving test clip (compresses well, so a round trip can be checked tightly)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        r = 127 + 100 * np.sin(x / 9 + i * 0.3 + seed)
        g = 127 + 100 * np.cos(y / 7 - i * 0.2)
        b = 127 + 80 * np.sin((x + y) / 13)
        frames.append(np.stack([r, g, b], -1))
    return torch.from_numpy(np.clip(np.stack(frames), 0, 255).round().astype(np.uint8))


def _psnr(a, b):
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


def _write_with_pyav(path, frames, codec, pix_fmt, fps=8):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames.numpy():
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))


# --------------------------------------------------------------------------------------------------------------
# bundled assets
# --------------------------------------------------------------------------------------------------------------

def test_bundled_assets():
    total = sum(p.stat().st_size for p in ASSET_DIR.iterdir() if p.is_file())
    assert total < 1_000_000
    img = load_media(ASTRONAUT)
    assert img.shape == (1, 256, 256, 3) and img.dtype == torch.uint8
    v = read_video(CLIP)
    assert v.frames.shape == (9, 128, 128, 3) and v.codec == "h264" and v.fps == pytest.approx(8)
    # the clip starts as the whole picture: frame 0 matches the image downscaled to 128
    ref = torch.from_numpy(np.array(Image.open(ASTRONAUT).resize((128, 128), Image.LANCZOS)))
    assert _psnr(v.frames[0], ref) > 30
    # and the astronaut PNG is skimage's picture
    skdata = pytest.importorskip("skimage.data")
    ref = np.asarray(Image.fromarray(skdata.astronaut()).resize((256, 256), Image.LANCZOS))
    assert np.array_equal(img[0].numpy(), ref)


# --------------------------------------------------------------------------------------------------------------
# load_media: files
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext, lossless", [(".png", True), (".bmp", True), (".webp", True), (".jpg", False),
                                           (".jpeg", False), (".PNG", True)])
def test_load_image_files(tmp_path, ext, lossless):
    src = np.array(Image.open(ASTRONAUT))[:200, :120]  # non-square on purpose
    p = tmp_path / f"x{ext}"
    kw = {"lossless": True} if ext == ".webp" else {}
    Image.fromarray(src).save(p, **kw)
    out = load_media(p)
    assert out.shape == (1, 200, 120, 3) and out.dtype == torch.uint8
    if lossless:
        assert np.array_equal(out[0].numpy(), src)
    else:
        assert _psnr(out[0], torch.from_numpy(src)) > 28
    assert torch.equal(load_media(str(p)), out)  # str and Path


def test_grayscale_rgba_palette_16bit(tmp_path):
    gray = np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) % 256
    Image.fromarray(gray.astype(np.uint8), "L").save(tmp_path / "g.png")
    g = load_media(tmp_path / "g.png")
    assert g.shape == (1, 32, 64, 3) and torch.equal(g[0, ..., 0], g[0, ..., 2])
    assert np.array_equal(g[0, ..., 1].numpy(), gray.astype(np.uint8))

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255
    rgba[:, 4:6, 3] = 0
    rgba[:, 6:, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = load_media(tmp_path / "a.png")[0]
    assert a[0, 0].tolist() == [200, 100, 50]  # opaque
    assert a[0, 4].tolist() == [0, 0, 0]  # transparent -> black
    assert a[0, 7].tolist() == [100, 50, 25]  # half -> composited over black

    pal = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert load_media(tmp_path / "p.png")[0, 0, 0].tolist() == [200, 100, 50]

    deep = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    d = load_media(tmp_path / "d.png")
    assert d.shape == (1, 16, 16, 3) and np.array_equal(d[0, ..., 0].numpy(), (deep // 257).astype(np.uint8))


def test_exif_orientation_applied(tmp_path):
    src = np.zeros((20, 40, 3), np.uint8)
    src[:, :10] = 255  # white band on the left
    img = Image.fromarray(src)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_media(tmp_path / "r.jpg")
    assert out.shape == (1, 40, 20, 3)
    assert out[0, :10].float().mean() > 200 and out[0, 30:].float().mean() < 50  # band now on top


@pytest.mark.parametrize("ext, codec, pix_fmt", [(".mp4", "libx264", "yuv420p"), (".mov", "libx264", "yuv420p"),
                                                 (".mkv", "libx264", "yuv420p"), (".webm", "libvpx-vp9", "yuv420p"),
                                                 (".avi", "mpeg4", "yuv420p"), (".gif", "gif", "rgb8")])
def test_load_video_files(tmp_path, ext, codec, pix_fmt):
    frames = _smooth(t=7, h=48, w=64)
    p = tmp_path / f"v{ext}"
    _write_with_pyav(p, frames, codec, pix_fmt)
    out = load_media(p)
    assert out.shape == (7, 48, 64, 3) and out.dtype == torch.uint8
    assert _psnr(out, frames) > (18 if ext == ".gif" else 28)
    assert torch.equal(load_media(p, max_frames=3), out[:3])


# --------------------------------------------------------------------------------------------------------------
# load_media: in-memory forms
# --------------------------------------------------------------------------------------------------------------

def test_pil_numpy_torch_forms():
    img = Image.open(ASTRONAUT)
    ref = load_media(ASTRONAUT)
    assert torch.equal(load_media(img), ref)
    hwc = np.array(img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only numpy memory (np.asarray of a PIL image) is copied, no warning
        assert torch.equal(load_media(np.asarray(img)), ref)
    assert torch.equal(load_media(hwc), ref)  # [H, W, 3] uint8
    assert torch.equal(load_media(hwc[None]), ref)  # [1, H, W, 3]
    f = hwc.astype(np.float32) / 255
    assert torch.equal(load_media(f), ref)  # float in [0, 1]
    t = torch.from_numpy(hwc.copy())
    assert torch.equal(load_media(t.permute(2, 0, 1)), ref)  # [3, H, W]
    assert torch.equal(load_media(t.permute(2, 0, 1).double() / 255), ref)
    clip = torch.stack([t, t.flip(0)])  # [T, H, W, 3]
    assert torch.equal(load_media(clip), clip)
    assert torch.equal(load_media(clip.permute(3, 0, 1, 2)), clip)  # [3, T, H, W]
    assert torch.equal(load_media(clip.permute(3, 0, 1, 2).float() / 255), clip)
    assert torch.equal(load_media(clip, max_frames=1), clip[:1])
    gray = hwc[..., 0]
    g = load_media(gray)  # [H, W]
    assert g.shape == (1, 256, 256, 3) and torch.equal(g[0, ..., 2], torch.from_numpy(gray))
    assert torch.equal(load_media(torch.from_numpy(gray)[None]), g)  # [1, H, W]
    rgba = np.concatenate([hwc, np.full(hwc.shape[:2] + (1,), 255, np.uint8)], -1)
    assert torch.equal(load_media(rgba), ref)
    assert torch.equal(load_media(torch.from_numpy(hwc).half().div(255).float()), load_media(
        torch.from_numpy(hwc).half().div(255)))  # fp16 accepted


def test_float_rounding_and_tolerance():
    x = torch.tensor([[[0.0, 0.5, 1.0]]]).expand(5, 6, 3)  # [H, W, 3]
    assert load_media(x)[0, 0, 0].tolist() == [0, 128, 255]
    assert load_media(x * 1.0005 - 0.0002)[0, 0, 0].tolist() == [0, 128, 255]  # within 1e-3: clamped


def test_layout_override_and_ambiguity():
    clip3 = torch.randint(0, 255, (3, 16, 16, 3), dtype=torch.uint8)  # 3 frames RGB or [3, T, H, W=3]?
    with pytest.raises(MediaError, match="ambiguous"):
        load_media(clip3)
    assert torch.equal(load_media(clip3, layout="THWC"), clip3)
    assert load_media(clip3, layout="CTHW").shape == (16, 16, 3, 3)
    with pytest.raises(MediaError, match="ambiguous"):
        load_media(np.zeros((3, 16, 3), np.uint8))
    with pytest.raises(MediaError, match="does not fit layout"):
        load_media(clip3, layout="CHW")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_media(clip3, layout="NCHW")


@pytest.mark.parametrize("bad, pattern", [
    (np.zeros((0, 8, 8, 3), np.uint8), "zero frames"),
    (np.zeros((8, 0, 3), np.uint8), "empty frame size"),
    (np.zeros((8, 8, 3), bool), "dtype bool"),
    (np.zeros((8, 8, 3), np.uint16), "dtype uint16"),
    (torch.zeros(8, 8, 3, dtype=torch.int64), "dtype int64"),
    (np.full((8, 8, 3), -0.5, np.float32), r"\(x \+ 1\) / 2"),
    (np.full((8, 8, 3), 200.0, np.float32), "cast to uint8"),
    (torch.full((8, 8, 3), float("nan")), "NaN"),
    (np.zeros((8, 8, 5), np.uint8), "supported layouts"),
    (np.zeros((2, 3, 8, 8), np.uint8), r"\[T, C, H, W\]"),  # torchvision video layout is refused
    (np.zeros((1, 2, 8, 8, 3), np.uint8), "supported layouts"),
    (np.zeros(5, np.uint8), "supported layouts"),
])
def test_bad_arrays(bad, pattern):
    with pytest.raises(MediaError, match=pattern):
        load_media(bad)


def test_bad_types_and_args():
    with pytest.raises(TypeError, match="list"):
        load_media([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(TypeError, match="NoneType"):
        load_media(None)
    with pytest.raises(ValueError, match="max_frames"):
        load_media(ASTRONAUT, max_frames=0)
    assert issubclass(MediaError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# load_media: file errors
# --------------------------------------------------------------------------------------------------------------

def test_missing_directory_unsupported(tmp_path):
    with pytest.raises(MediaError, match="file not found"):
        load_media(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="is a directory"):
        load_media(tmp_path)
    for name in ("notes.txt", "scan.tiff", "noext"):
        (tmp_path / name).write_bytes(b"hello")
        with pytest.raises(MediaError, match=r"unsupported file type.*supported: images .png"):
            load_media(tmp_path / name)


def test_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("x.png", "x.jpg", "x.webp", "x.mp4", "x.gif", "x.mkv"):
        (tmp_path / name).write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(MediaError, match="not a readable"):
            load_media(tmp_path / name)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match="not a readable image"):
        load_media(tmp_path / "empty.png")
    good = (tmp_path / "good.png")
    Image.open(ASTRONAUT).save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="truncated"):
        load_media(tmp_path / "trunc.png")


def test_video_without_frames_or_video_stream(tmp_path):
    for ext, codec in ((".avi", "mpeg4"), (".mp4", "libx264")):
        p = tmp_path / f"z{ext}"
        c = av.open(str(p), "w")
        s = c.add_stream(codec, rate=24)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
        c.close()
        with pytest.raises(MediaError, match="zero frames|no video stream"):
            load_media(p)


# --------------------------------------------------------------------------------------------------------------
# fit_and_pad
# --------------------------------------------------------------------------------------------------------------

def _level(v):
    return (v / 255 - 0.5) / 0.5


def test_fit_and_pad_wide_into_square():
    frames = torch.full((2, 64, 128, 3), 200, dtype=torch.uint8)  # 2:1
    out = fit_and_pad(frames, 96, 96, pad_value=(10, 20, 30))
    assert out.shape == (3, 2, 96, 96) and out.dtype == torch.float32
    assert fit_box(64, 128, 96, 96) == (24, 0, 48, 96)
    pad = torch.tensor([_level(10), _level(20), _level(30)]).view(3, 1, 1, 1)
    assert torch.allclose(out[:, :, :24], pad.expand(3, 2, 24, 96))  # top band
    assert torch.allclose(out[:, :, 72:], pad.expand(3, 2, 24, 96))  # bottom band
    assert torch.allclose(out[:, :, 24:72], torch.full((3, 2, 48, 96), _level(200)))  # image, edge to edge


def test_fit_and_pad_tall_odd_leftover_and_content():
    src = load_media(ASTRONAUT)[:, :, 64:192]  # 256 x 128, tall 2:1
    out = fit_and_pad(src, 64, 65)  # width 65: 32 columns of image, 33 of padding -> 16 left, 17 right
    top, left, nh, nw = fit_box(256, 128, 64, 65)
    assert (top, left, nh, nw) == (0, 16, 64, 32)
    assert torch.all(out[:, :, :, :16] == -1) and torch.all(out[:, :, :, 48:] == -1)  # black padding = -1
    ref = np.asarray(Image.fromarray(src[0].numpy()).resize((32, 64), Image.LANCZOS))
    assert torch.equal(out[:, 0, :, 16:48], to_model_range(torch.from_numpy(ref.copy())[None])[:, 0])


def test_fit_and_pad_identity_and_upscale():
    src = load_media(ASTRONAUT)
    assert torch.equal(fit_and_pad(src, 256, 256), to_model_range(src))
    up = fit_and_pad(src, 300, 600, pad_value=255)
    assert up.shape == (3, 1, 300, 600) and fit_box(256, 256, 300, 600) == (0, 150, 300, 300)
    assert torch.all(up[:, :, :, :150] == 1) and torch.all(up[:, :, :, 450:] == 1)
    assert up.min() >= -1 and up.max() <= 1


def test_fit_and_pad_errors():
    ok = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(MediaError, match="uint8"):
        fit_and_pad(ok.float(), 8, 8)
    with pytest.raises(MediaError, match=r"\[T, H, W, 3\]"):
        fit_and_pad(ok[0], 8, 8)
    with pytest.raises(ValueError, match="pad_value"):
        fit_and_pad(ok, 8, 8, pad_value=(0, 0, 300))
    with pytest.raises(ValueError, match="height and width"):
        fit_and_pad(ok, 0, 8)


def test_to_model_range_matches_to_tensor_formula():
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    y = to_model_range(x)
    ref = (x.permute(3, 0, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.equal(y, ref) and y[0, 0, 0, 0] == -1 and y[0, 0, -1, -1] == 1


# --------------------------------------------------------------------------------------------------------------
# 4n+1
# --------------------------------------------------------------------------------------------------------------

def test_to_4n_plus_1_rule():
    def clip(t):
        return torch.arange(t).view(t, 1, 1, 1).expand(t, 2, 2, 3).to(torch.uint8)

    assert to_4n_plus_1(clip(1), 121).shape[0] == 1
    for t, expect in ((2, 1), (4, 1), (5, 5), (8, 5), (9, 9), (12, 9), (121, 121)):
        out = to_4n_plus_1(clip(t), 121)
        assert out.shape[0] == expect and torch.equal(out, clip(t)[:expect])  # trimmed from the end
    out = to_4n_plus_1(clip(200), 121)  # subsampled uniformly, ends kept
    idx = out[:, 0, 0, 0].long()
    assert out.shape[0] == 121 and idx[0] == 0 and idx[-1] == 199
    steps = idx.diff()
    assert steps.min() >= 1 and steps.max() - steps.min() <= 1
    out = to_4n_plus_1(clip(30), 10)  # max_frames not 4n+1: at most 9
    assert out.shape[0] == 9 and out[0, 0, 0, 0] == 0 and out[-1, 0, 0, 0] == 29
    assert to_4n_plus_1(clip(30), 4).shape[0] == 1
    npc = clip(14).numpy()
    assert isinstance(to_4n_plus_1(npc, 121), np.ndarray) and to_4n_plus_1(npc, 121).shape[0] == 13
    assert np.array_equal(to_4n_plus_1(npc, 5)[:, 0, 0, 0], [0, 3, 6, 10, 13])
    with pytest.raises(MediaError, match="zero frames"):
        to_4n_plus_1(clip(0), 9)
    with pytest.raises(ValueError, match="max_frames"):
        to_4n_plus_1(clip(5), 0)


# --------------------------------------------------------------------------------------------------------------
# write_mp4 / read_video
# --------------------------------------------------------------------------------------------------------------

def test_write_mp4_round_trip(tmp_path):
    frames = _smooth(t=11, h=48, w=64)
    p = write_mp4(frames, tmp_path / "sub" / "out.mp4", fps=24)
    v = read_video(p)
    assert v.codec == "h264" and v.frames.shape == (11, 48, 64, 3) and v.fps == pytest.approx(24)
    assert _psnr(v.frames, frames) > 30
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        assert s.codec_context.pix_fmt == "yuv420p" and c.format.name.startswith("mov,mp4")
    data = p.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart
    assert media.h264_encoder() in ("libx264", "h264", "libopenh264")


def test_write_mp4_fractional_fps_single_frame_odd_size(tmp_path):
    frames = _smooth(t=5, h=48, w=64)
    v = read_video(write_mp4(frames, tmp_path / "a.mp4", fps=23.976))
    assert v.fps == pytest.approx(23.976, abs=1e-3) and v.frames.shape[0] == 5
    one = read_video(write_mp4(frames[:1].numpy(), tmp_path / "b.mp4", fps=8))
    assert one.frames.shape == (1, 48, 64, 3)
    odd = _smooth(t=3, h=33, w=47)
    v = read_video(write_mp4(odd, tmp_path / "c.mp4", fps=8))
    assert v.frames.shape == (3, 34, 48, 3)  # padded to even by repeating the last row / column
    assert _psnr(v.frames[:, :33, :47], odd) > 30
    assert _psnr(v.frames[:, 33, :47], odd[:, 32]) > 25


def test_write_mp4_errors(tmp_path):
    ok = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(MediaError, match="uint8"):
        write_mp4(ok.float(), tmp_path / "x.mp4", fps=8)
    with pytest.raises(MediaError, match=r"\[T, H, W, 3\]"):
        write_mp4(ok[..., :2], tmp_path / "x.mp4", fps=8)
    with pytest.raises(MediaError, match="empty"):
        write_mp4(ok[:0], tmp_path / "x.mp4", fps=8)
    for fps in (0, -1, float("nan"), "24"):
        with pytest.raises(ValueError, match="fps"):
            write_mp4(ok, tmp_path / "x.mp4", fps=fps)
    assert not (tmp_path / "x.mp4").exists()
    with pytest.raises(MediaError, match="file not found"):
        read_video(tmp_path / "x.mp4")


# --------------------------------------------------------------------------------------------------------------
# load_clip / read_frames: reference clips decoded streaming
# --------------------------------------------------------------------------------------------------------------

def _numbered(t, h=48, w=80):
    """A clip whose frames all differ (a moving bar and a changing level), so that a wrong frame shows."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (i * 7) % 256
        frames[i, :, (2 * i) % w:(2 * i) % w + 6, 1] = 255
    return torch.from_numpy(frames)


def _stated(path):
    with av.open(str(path)) as c:
        return c.streams.video[0].frames


def _count_passes(monkeypatch):
    passes = []
    decode = media._decode

    def counted(*args, **kwargs):
        passes.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(media, "_decode", counted)
    return passes


@pytest.mark.parametrize("t", [1, 6, 37])
def test_load_clip_selects_what_the_whole_decode_selects(tmp_path, monkeypatch, t):
    """The streaming path keeps exactly the frames `to_4n_plus_1` keeps of the whole decoded clip (trimmed or
    subsampled), and fitting each frame as it arrives gives `fit_and_pad`'s pixels bit for bit."""
    p = tmp_path / "n.mp4"
    _write_with_pyav(p, _numbered(t), "libx264", "yuv420p")
    assert _stated(p) == t  # the container states the count: one decoding pass
    whole = load_media(p)
    for m in (1, 5, 9, 13, 29, 37, 121):
        old = to_4n_plus_1(whole, m)
        passes = _count_passes(monkeypatch)
        assert torch.equal(load_clip(p, m), old), m
        assert len(passes) == 1
        fitted = load_clip(p, m, (64, 64), (10, 20, 30))  # 80x48 letterboxed into 64x64
        assert fitted.shape == (old.shape[0], 64, 64, 3)
        assert torch.equal(to_model_range(fitted), fit_and_pad(old, 64, 64, (10, 20, 30))), m
        data = p.read_bytes()  # a file's bytes, as a server receives them, in each in-memory form
        for form in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
            assert torch.equal(load_clip(form, m, (64, 64), (10, 20, 30)), fitted)
    assert torch.equal(load_clip(whole, 9, (64, 64)), load_clip(p, 9, (64, 64)))  # frames in memory: same rule


def test_load_clip_without_a_stated_frame_count(tmp_path, monkeypatch):
    """Matroska states no frame count: packets are counted first (no decoding), then one pass selects. A wrong
    count (an edit list, a bad header) costs a second pass, never a different frame."""
    frames = _numbered(37)
    mkv, mp4 = tmp_path / "n.mkv", tmp_path / "n.mp4"
    _write_with_pyav(mkv, frames, "libx264", "yuv420p")
    _write_with_pyav(mp4, frames, "libx264", "yuv420p")
    assert _stated(mkv) == 0 and _stated(mp4) == 37
    whole_mkv = load_media(mkv)
    for m in (5, 9, 37, 121):
        passes = _count_passes(monkeypatch)
        assert torch.equal(load_clip(mkv, m), to_4n_plus_1(whole_mkv, m)), m
        assert len(passes) == 1
    whole = load_media(mp4)
    for wrong in (30, 41, 1):  # fewer frames than the clip has, more, and a useless 1
        monkeypatch.setattr(media, "_stated_frames", lambda stream, n=wrong: n)
        for m in (5, 9, 37):
            passes = _count_passes(monkeypatch)
            assert torch.equal(load_clip(mp4, m), to_4n_plus_1(whole, m)), (wrong, m)
            assert len(passes) == 2


def test_load_clip_bounds_the_length(tmp_path, monkeypatch):
    p = tmp_path / "n.mp4"
    _write_with_pyav(p, _numbered(24), "libx264", "yuv420p", fps=8)  # 24 frames, 3 s
    assert load_clip(p, 9, max_source_frames=24, max_seconds=3).shape[0] == 9
    with pytest.raises(media.ClipTooLong, match="more than 23 frames"):
        load_clip(p, 9, max_source_frames=23)
    with pytest.raises(media.ClipTooLong, match=r"lasts 3 s, longer than the limit of 2.5 s"):
        load_clip(p.read_bytes(), 9, max_seconds=2.5)
    # a container that states nothing is bounded while it is read (packets counted, frames decoded)
    monkeypatch.setattr(media, "_stated_frames", lambda stream: 0)
    monkeypatch.setattr(media, "_stated_seconds", lambda container, stream: None)
    with pytest.raises(media.ClipTooLong, match="more than 23 frames"):
        load_clip(p, 9, max_source_frames=23)
    with pytest.raises(media.ClipTooLong, match="longer than the limit of 2.5 s"):
        load_clip(p, 9, max_seconds=2.5)  # the last frame's time, 23/8 s
    with pytest.raises(media.ClipTooLong, match="more than 4 frames"):
        load_clip(_numbered(5), 9, max_source_frames=4)  # frames in memory too
    assert issubclass(media.ClipTooLong, MediaError)
    for bad in (dict(max_seconds=0), dict(max_source_frames=0), dict(size=(64,))):
        with pytest.raises(ValueError):
            load_clip(p, 9, **bad)


def test_read_frames_keeps_only_the_frames_asked_for(tmp_path):
    frames = _numbered(30)
    p = tmp_path / "n.mp4"
    _write_with_pyav(p, frames, "libx264", "yuv420p")
    whole = load_media(p)
    assert torch.equal(media.read_frames(p, range(20, 27)), whole[20:27])
    assert torch.equal(media.read_frames(p.read_bytes(), [29, 3, 3, 0]), whole[[29, 3, 3, 0]])
    with pytest.raises(MediaError, match="frame 30 asked for, but the clip has 30 frames"):
        media.read_frames(p, [2, 30])
    with pytest.raises(MediaError, match="video file"):
        media.read_frames(ASTRONAUT, [0])
    with pytest.raises(ValueError, match="indices"):
        media.read_frames(p, [])


def test_load_media_from_bytes(tmp_path):
    png = ASTRONAUT.read_bytes()
    assert torch.equal(load_media(png), load_media(ASTRONAUT))
    assert torch.equal(load_media(io.BytesIO(png)), load_media(ASTRONAUT))
    gif = tmp_path / "v.gif"  # GIF bytes are a clip, as a .gif file is
    _write_with_pyav(gif, _smooth(t=5), "gif", "rgb8")
    assert torch.equal(load_media(gif.read_bytes()), load_media(gif))
    assert torch.equal(load_media(CLIP.read_bytes(), max_frames=4), load_media(CLIP)[:4])
    with pytest.raises(MediaError, match="not an image or video"):
        load_media(b"definitely not an image")
    with pytest.raises(MediaError, match="empty"):
        load_media(b"")


PEAK_RSS = """
import sys
from anyid_rt import media
from anyid_rt.conditioning import ConditioningLayout, prepare_reference

def peak_mib():
    # VmHWM, the high-water mark of this process's own memory map. Not getrusage's ru_maxrss: Linux carries the
    # parent's high-water mark over fork + exec into it, so a child of a 1.3 GB pytest process reads 1.3 GB.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB

ref = prepare_reference(sys.argv[1], 64, 64, ConditioningLayout(max_clip_frames=121, long_clip="subsample"), 0)
print(ref.num_frames, peak_mib())
if len(sys.argv) > 2:  # then the whole clip decoded at once, as before streaming (the high-water mark only rises)
    print(media.load_media(sys.argv[1]).shape[0], peak_mib())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc/self/status (Linux)")
def test_reference_memory_does_not_grow_with_clip_length(tmp_path):
    """Peak resident memory of preparing a 640x360 clip as the only reference of a 64x64 generation, each in a
    fresh process: 121 frames (the longest clip kept whole, so the result has the same size) and 481 frames
    (subsampled to 121). Decoding the long clip whole would hold 481 x 675 KiB = 317 MiB."""
    h, w = 360, 640
    base = np.random.default_rng(0).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    for name, t in (("short", 121), ("long", 481)):
        with av.open(str(tmp_path / f"{name}.mp4"), "w") as c:
            s = c.add_stream("libx264", rate=24)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = {"preset": "ultrafast", "crf": "35"}
            for i in range(t):
                c.mux(s.encode(av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")))
            c.mux(s.encode(None))

    def run(*args):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return [tuple(float(v) for v in line.split()) for line in out.stdout.split("\n") if line]

    [(n_short, short)] = run(str(tmp_path / "short.mp4"))
    [(n_long, long), (n_whole, whole)] = run(str(tmp_path / "long.mp4"), "whole")
    assert n_short == n_long == 121 and n_whole == 481
    margin = 8  # MiB, 2.5 % of the long clip decoded
    assert abs(long - short) <= margin, (short, long)
    assert whole - long > 200, (long, whole)  # the measurement sees a whole-clip decode


# --------------------------------------------------------------------------------------------------------------
# Wan i2v preprocessing
# --------------------------------------------------------------------------------------------------------------

def _official_best_output_size(w, h, dw, dh, expected_area):
    # Verbatim from Wan2.2 wan/utils/utils.py (the oracle).
    ratio = w / h
    ow = (expected_area * ratio)**0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    assert ow1 % dw == 0 and oh1 % dh == 0 and ow1 * oh1 <= expected_area
    ratio1 = ow1 / oh1
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    assert oh2 % dh == 0 and ow2 % dw == 0 and ow2 * oh2 <= expected_area
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    else:
        return ow2, oh2


def test_best_output_size_matches_official():
    assert best_output_size(1280, 704) == (1280, 704)
    assert best_output_size(704, 1280) == (704, 1280)
    assert best_output_size(1920, 1080) == (1248, 704)
    assert best_output_size(512, 512) == (960, 928)
    rng = np.random.default_rng(0)
    sizes = [(w, h) for w in (64, 256, 480, 720, 1024, 1080, 1280, 1920, 3840) for h in (64, 360, 720, 1080, 2160)]
    sizes += [tuple(int(v) for v in rng.integers(16, 4000, 2)) for _ in range(200)]
    for w, h in sizes:
        for area in (1280 * 704, 832 * 480, 256 * 256):
            got = best_output_size(w, h, 32, 32, area)
            try:
                ref = _official_best_output_size(w, h, 32, 32, area)
            except ZeroDivisionError:
                ref = (area // 32 // 32 * 32, 32) if w > h else (32, area // 32 // 32 * 32)
            assert got == ref, (w, h, area)
            assert got[0] % 32 == 0 and got[1] % 32 == 0 and got[0] * got[1] <= area
    # where the official code divides by zero (both candidates round to 0), one 32-pixel row / column is used
    assert best_output_size(10000, 10) == (1280 * 704 // 32 // 32 * 32, 32)
    assert best_output_size(26, 2688, 32, 32, 256 * 256) == (32, 2048)
    with pytest.raises(ValueError):
        best_output_size(0, 10)


def test_crop_center_to_matches_official_steps():
    src = load_media(ASTRONAUT)[:, 10:230, :]  # 220 x 256
    img = Image.fromarray(src[0].numpy())
    ow, oh = best_output_size(img.width, img.height, 32, 32, 160 * 128)
    # the official preprocessing, step by step
    iw, ih = img.width, img.height
    scale = max(ow / iw, oh / ih)
    r = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (r.width - ow) // 2, (r.height - oh) // 2
    ref = np.asarray(r.crop((x1, y1, x1 + ow, y1 + oh)))
    out = crop_center_to(img, ow, oh)
    assert out.shape == (1, oh, ow, 3) and np.array_equal(out[0].numpy(), ref)
    t = wan_i2v_image(img, max_area=160 * 128)
    assert t.shape == (3, 1, oh, ow) and torch.equal(t, to_model_range(torch.from_numpy(ref.copy())[None]))


def test_crop_center_keeps_the_centre():
    bands = np.zeros((100, 300, 3), np.uint8)
    bands[:, :100, 0] = 255
    bands[:, 100:200, 1] = 255
    bands[:, 200:, 2] = 255
    out = crop_center_to(bands, 64, 64)[0].float()
    assert out.shape == (64, 64, 3)
    assert out[:, 4:60, 1].mean() > 250 and out[:, 4:60, 0].mean() < 5 and out[:, 4:60, 2].mean() < 5
