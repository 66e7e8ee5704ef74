"""The reference policy of ConditioningLayout, one rule for the trainer and the engine: the longest clip, the frame
rate (resampled to 24 fps), what a long clip keeps, the optional person crop and the auxiliary order; old LoRA
metadata reads back with the behaviour of its time."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from anyid_rt import conditioning, frame_ops, media
from anyid_rt.conditioning import (LAYOUT_METADATA_KEY, LEGACY_DEFAULTS, ConditioningLayout, load_reference,
                                   prepare_reference)
from anyid_rt.engine import Engine
from anyid_rt.person_crop import DetectorUnavailable, HaarFaceDetector, person_region, portrait_box
from anyid_rt.trainer.data import IDGroupDataset
from anyid_rt.trainer.synthetic import make_id_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def numbered(t: int, h: int = 32, w: int = 48) -> torch.Tensor:
    """uint8 [t, h, w, 3]: frame i is a flat level 8 i (mod 256) in red and a bar at column i, so a wrong frame
    shows even after lossy coding."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, ..., 0] = (8 * i) % 256
        frames[i, :, i % w, 1] = 255
    return torch.from_numpy(frames)


# ---------------------------------------------------------------------------------------------------------
# The selection rule (frame_ops)
# ---------------------------------------------------------------------------------------------------------

def test_resample_indices_pick_the_nearest_frames_of_the_timeline():
    assert np.array_equal(frame_ops.resample_indices(10, 24, 24), np.arange(10))  # same rate: every frame
    r = frame_ops.resample_indices(60, 48, 24)  # twice as fast: every other frame, 1.25 s -> 30 frames
    assert np.array_equal(r, np.arange(0, 60, 2))
    r = frame_ops.resample_indices(300, 30, 24)  # 10 s at 30 fps -> 240 frames at 24 fps
    assert len(r) == 240 and r[0] == 0 and r[-1] == 299 and set(np.diff(r)) == {1, 2}
    assert np.allclose(r / 30, np.arange(240) / 24, atol=0.5 / 30)  # each within half a source frame of its time
    r = frame_ops.resample_indices(9, 8, 24)  # slower than 24 fps: frames repeat (nearest, never blended)
    assert len(r) == 27 and np.all(np.diff(r) >= 0) and set(r) == set(range(9))
    for bad in (0, -1, float("nan"), True):
        with pytest.raises(ValueError, match="positive frame rate"):
            frame_ops.resample_indices(9, bad, 24)


@pytest.mark.parametrize("t", [1, 4, 5, 9, 33, 34, 121, 122, 200])
def test_select_frames_defaults_are_the_old_rule(t):
    assert np.array_equal(frame_ops.select_frames(t, 121), frame_ops.clip_indices(t, 121))
    assert np.array_equal(frame_ops.select_frames(t, 33), frame_ops.clip_indices(t, 33))


def test_select_frames_window_keeps_the_rate():
    # 10 s at 30 fps, at most 33 frames at 24 fps: the centred 33 frames of the 24 fps timeline (1.4 s)
    keep = frame_ops.select_frames(300, 33, src_fps=30, fps=24, long_clip="window")
    timeline = frame_ops.resample_indices(300, 30, 24)
    start = (240 - 33) // 2
    assert np.array_equal(keep, timeline[start:start + 33])
    # "subsample" spreads the same number over the whole clip: 10 s in 33 frames, ~3 source frames apart
    spread = frame_ops.select_frames(300, 33, src_fps=30, fps=24, long_clip="subsample")
    assert len(spread) == 33 and spread[0] == 0 and spread[-1] == 299
    # a short clip is resampled, then trimmed to 4n+1
    short = frame_ops.select_frames(30, 33, src_fps=30, fps=24, long_clip="window")
    assert np.array_equal(short, frame_ops.resample_indices(30, 30, 24)[:21])
    with pytest.raises(ValueError, match="long_clip"):
        frame_ops.select_frames(30, 33, long_clip="middle")


def test_load_clip_resamples_a_video(tmp_path):
    clip = numbered(96)
    path = media.write_mp4(clip, tmp_path / "c48.mp4", fps=48, crf=0)
    whole = media.load_media(path)
    got = media.load_clip(path, 33, fps=24, long_clip="window")
    keep = frame_ops.select_frames(96, 33, src_fps=48, fps=24, long_clip="window")
    assert np.array_equal(keep, np.arange(14, 80, 2))  # every other frame (48 -> 24 fps), the centred 33 of 48
    assert torch.equal(got, whole[torch.from_numpy(keep)])
    # fitted while decoding: the same frames as fitting afterwards
    fitted = media.load_clip(path, 33, (64, 64), (10, 20, 30), fps=24, long_clip="window")
    want = frame_ops.fitted(whole[torch.from_numpy(keep)].numpy(), frame_ops.check_fit(64, 64, (10, 20, 30)),
                            frame_ops.fit_box(32, 48, 64, 64))
    assert torch.equal(fitted, torch.from_numpy(want))
    # a slow clip repeats frames (decoded once, copied)
    slow = media.write_mp4(clip[:9], tmp_path / "c8.mp4", fps=8, crf=0)
    got = media.load_clip(slow, 33, fps=24)
    keep = frame_ops.select_frames(9, 33, src_fps=8, fps=24)
    assert torch.equal(got, media.load_media(slow)[torch.from_numpy(keep)])
    assert got.shape[0] == 25 and torch.equal(got[0], got[1])
    # frames in memory carry no rate: taken as they are
    assert torch.equal(media.load_clip(clip, 33, fps=24, long_clip="window"), clip[31:64])  # (96 - 33) // 2
    with pytest.raises(ValueError, match="fps must be"):
        media.load_clip(path, 33, fps=0)


# ---------------------------------------------------------------------------------------------------------
# The layout: defaults, metadata, old LoRAs
# ---------------------------------------------------------------------------------------------------------

def test_new_layouts_record_the_policy_and_old_metadata_keeps_its_behaviour():
    new = ConditioningLayout()
    assert (new.max_clip_frames, new.clip_fps, new.long_clip, new.person_crop, new.aux_order) == \
        (33, 24.0, "window", False, "length")
    assert ConditioningLayout.from_json(new.to_json()) == new
    assert set(json.loads(new.to_json())) >= {"clip_fps", "long_clip", "person_crop", "aux_order"}
    # metadata written before the policy existed (every field of that time, none of the new ones)
    old_json = json.dumps({"placement": "after", "pad_color": [0, 0, 0], "max_clip_frames": 121,
                           "max_references": 8, "null_reference": "black"})
    old = ConditioningLayout.from_json(old_json)
    assert (old.max_clip_frames, old.clip_fps, old.long_clip, old.person_crop, old.aux_order) == \
        (121, None, "subsample", False, "length")
    assert {k: getattr(old, k) for k in LEGACY_DEFAULTS} == LEGACY_DEFAULTS
    # an old LoRA keeps its clips as it did: every frame of a 200-frame clip spread over 121, at its own rate
    assert np.array_equal(old.clip_indices(200, src_fps=30), frame_ops.clip_indices(200, 121))
    assert len(new.clip_indices(200, src_fps=30)) == 33
    with pytest.raises(ValueError, match="newer anyid_rt"):
        ConditioningLayout.from_json(json.dumps({"placement": "after", "flux": 1}))


@pytest.mark.parametrize("kw, match", [({"clip_fps": 0}, "clip_fps"), ({"clip_fps": True}, "clip_fps"),
                                       ({"long_clip": "middle"}, "long_clip"), ({"person_crop": "yes"}, "person_crop"),
                                       ({"aux_order": "random"}, "aux_order"), ({"max_clip_frames": 32}, "4n\\+1")])
def test_layout_checks_its_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        ConditioningLayout(**kw)


def test_reference_order_is_one_rule():
    counts = [1, 33, 1, 5, 33, 1]  # primary first
    assert ConditioningLayout().reference_order(counts) == [0, 2, 5, 3, 1, 4]  # images, then clips by length
    assert ConditioningLayout(aux_order="given").reference_order(counts) == [0, 1, 2, 3, 4, 5]
    assert ConditioningLayout().reference_order([9]) == [0] and ConditioningLayout().reference_order([]) == []


def test_old_and_new_layouts_prepare_a_long_clip_as_documented(tmp_path):
    path = media.write_mp4(numbered(150), tmp_path / "long.mp4", fps=30, crf=0)
    whole = media.load_media(path)
    old = ConditioningLayout.from_json(json.dumps({"placement": "after", "pad_color": [0, 0, 0],
                                                   "max_clip_frames": 121, "max_references": 8,
                                                   "null_reference": "black"}))
    # the old path, bit for bit: the 4n+1 rule over the native frames, fitted
    want_old = frame_ops.fit_and_pad(frame_ops.to_4n_plus_1(whole, 121), 64, 64, (0, 0, 0))
    assert torch.equal(prepare_reference(str(path), 64, 64, old, 0).pixels, want_old)
    new = ConditioningLayout()
    keep = frame_ops.select_frames(150, 33, src_fps=30, fps=24, long_clip="window")
    want_new = frame_ops.fit_and_pad(whole[torch.from_numpy(keep)], 64, 64, (0, 0, 0))
    assert torch.equal(prepare_reference(str(path), 64, 64, new, 0).pixels, want_new)
    assert np.all(np.diff(keep) <= 2)  # consecutive frames of the 24 fps timeline, not a 121-frame spread


# ---------------------------------------------------------------------------------------------------------
# Person crop at inference
# ---------------------------------------------------------------------------------------------------------

def wide_scene() -> np.ndarray:
    """The astronaut (256 x 256) placed left of centre on a 256 x 512 grey canvas: a photo with room around."""
    from PIL import Image

    with Image.open(media.ASSET_DIR / "astronaut.png") as im:
        face = np.array(im.convert("RGB").resize((256, 256)))
    out = np.full((256, 512, 3), 128, np.uint8)
    out[:, 64:320] = face
    return out


def test_person_crop_cuts_like_training_portraits():
    scene = wide_scene()
    layout = ConditioningLayout(person_crop=True)
    det = HaarFaceDetector()
    face = det(scene)
    assert face is not None and 64 <= face[0] and face[2] <= 320
    box = person_region(scene[None], det)
    assert box == tuple(int(v) for v in portrait_box(face, None, 1.0, 256, 512))  # training's portrait box, zoom 1
    x0, y0, x1, y1 = box
    got = load_reference(scene, 64, 64, layout)
    want = frame_ops.fit_and_pad(torch.from_numpy(np.ascontiguousarray(scene[None, y0:y1, x0:x1])), 64, 64)
    assert torch.equal(frame_ops.to_model_range(got), want)
    uncropped = load_reference(scene, 64, 64, ConditioningLayout())
    assert not torch.equal(got, uncropped)
    # a clip: the union of its frames' boxes
    clip = np.stack([scene, np.roll(scene, 40, axis=1)])
    x0c, _, x1c, _ = person_region(clip, det)
    assert x0c <= x0 and x1c >= x1 + 39
    with pytest.raises(media.MediaError, match=r"reference 2: person_crop is on but no face was found"):
        prepare_reference(np.full((64, 64, 3), 90, np.uint8), 64, 64, layout, 2)


def test_person_crop_without_opencv_is_refused(monkeypatch):
    monkeypatch.setattr(conditioning, "_DETECTOR", [])
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    layout = ConditioningLayout(person_crop=True)
    with pytest.raises(DetectorUnavailable, match=r"person_crop on .*OpenCV.*opencv-python-headless<5"):
        layout.check_requirements()
    with pytest.raises(ValueError, match="person_crop"):  # a ValueError: the CLI's exit code 2
        prepare_reference(wide_scene(), 64, 64, layout, 0)
    ConditioningLayout().check_requirements()  # nothing needed without the crop
    # a request with references is refused when the engine is planned, before any model loads
    from anyid_rt.plan import plan_tiny
    from anyid_rt.request import GenerationRequest

    plan = plan_tiny(layout=layout)
    with pytest.raises(DetectorUnavailable, match="person_crop"):
        plan.check(GenerationRequest(prompt="p", references=[str(media.ASSET_DIR / "astronaut.png")]))
    plan.check(GenerationRequest(prompt="p"))  # no references: nothing to crop


# ---------------------------------------------------------------------------------------------------------
# Training and inference follow the same rule
# ---------------------------------------------------------------------------------------------------------

def test_engine_orders_auxiliaries_by_the_layout():
    eng = Engine.tiny(seed=0)
    img_a, img_b = np.full((32, 32, 3), 40, np.uint8), np.full((32, 32, 3), 200, np.uint8)
    clip9, clip5 = numbered(9), numbered(5)
    refs = [clip9, img_a, clip5, img_b]  # primary = 1 (img_a)
    eng.layout = ConditioningLayout()
    got = eng._prepare_references(refs, 1, 32, 32)
    assert [p.num_frames for p in got] == [1, 1, 5, 9]
    assert torch.equal(got[0].pixels, prepare_reference(img_a, 32, 32, eng.layout, 1).pixels)
    assert torch.equal(got[1].pixels, prepare_reference(img_b, 32, 32, eng.layout, 3).pixels)
    eng.layout = ConditioningLayout(aux_order="given")
    assert [p.num_frames for p in eng._prepare_references(refs, 1, 32, 32)] == [1, 9, 5, 1]


def test_trainer_clips_follow_the_layout_rate(tmp_path):
    root = make_id_groups(tmp_path / "g", groups=1, clips=3, frames=9, face_boxes="all")  # 8 fps clips
    layout = ConditioningLayout(max_clip_frames=9)
    ds = IDGroupDataset(root, [(9, 64, 64)], layout=layout, form_weights=(0, 0, 1), min_references=2,
                        max_references=2, similarity="jaccard")
    clip = ds.groups[0].clips[0]
    assert ds.source_fps(clip) == 8.0
    timeline = frame_ops.resample_indices(9, 8.0, 24.0)  # what the engine resamples the same file to
    assert np.array_equal(ds.reference_timeline(clip), timeline)
    assert np.array_equal(ds.target_timeline(clip), timeline)
    runs = [r.frames for i in range(len(ds)) for r in ds.instance(i).refs]
    assert runs and all(len(f) in (5, 9) for f in runs)
    for f in runs:  # consecutive frames of the 24 fps timeline, as the engine's "window" keeps them
        start = int(np.flatnonzero(timeline == f[0])[0])
        assert any(np.array_equal(timeline[s:s + len(f)], f) for s in range(start, start + 4))
    for i in range(len(ds)):  # the target too
        s = ds.instance(i)
        lens = [len(r.frames) for r in s.refs]
        assert lens[1:] == sorted(lens[1:])
        assert any(np.array_equal(timeline[k:k + 9], s.target_frames) for k in range(len(timeline) - 8))
    # the inference path keeps a window of the same timeline from the same file
    src = ds.groups[0].clips[1]
    engine_frames = layout.clip_indices(src.num_frames, ds.source_fps(src))
    assert len(engine_frames) == 9 and any(np.array_equal(timeline[k:k + 9], engine_frames) for k in range(19))
    # an old layout (no clip_fps) and data.fps None keep the native frames
    native = IDGroupDataset(root, [(9, 64, 64)], layout=ConditioningLayout.from_json(
        json.dumps({"max_clip_frames": 9})), form_weights=(0, 0, 1), fps=None, similarity="jaccard")
    assert native.instance(0).target_frames == tuple(range(9))
    assert all(f == tuple(range(f[0], f[0] + len(f))) for r in [native.instance(0)] for f in [x.frames for x in r.refs])


def test_lora_metadata_carries_the_policy(tmp_path):
    from anyid_rt.lora import read_lora
    from anyid_rt.trainer.lora import inject_lora, lora_metadata, save_trained_lora

    dit = Engine.tiny(seed=0).dit
    inject_lora(dit, 2, 2.0)
    layout = ConditioningLayout(max_clip_frames=17, person_crop=True, aux_order="given")
    path = save_trained_lora(dit, tmp_path / "l.safetensors", lora_metadata(dit, layout=layout, base_model="tiny"))
    assert ConditioningLayout.from_json(read_lora(path).metadata[LAYOUT_METADATA_KEY]) == layout
