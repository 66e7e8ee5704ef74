"""A small synthetic ID-group dataset made from the bundled astronaut image, for tests and smoke runs.

    anyid-rt train synth-data --out configs/data      (the tiny data set of configs/sft-tiny.toml, dpo-tiny.toml)
    python -c "from anyid_rt.trainer.synthetic import make_id_groups; make_id_groups('data/synthetic')"

Each clip is a slow pan / zoom over the image (so the face moves and changes size), with a per-clip colour
cast, written as H.264 mp4. Every clip has a full seven-element description. `face_boxes` says which clips get
their (exact, geometric) face boxes in meta.json: "none" (all rely on the face detector), "first" (the first
clip of each group) or "all".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import media

# four full seven-element descriptions (ELEMENTS order), shared by the clips of every group in turn
DESCRIPTIONS: list[dict[str, str]] = json.loads(Path(__file__).with_name("synthetic_descriptions.json").read_text())


def astronaut() -> np.ndarray:
    with Image.open(media.ASSET_DIR / "astronaut.png") as im:
        return np.array(im.convert("RGB"))


# The face in astronaut.png (256 x 256), x0, y0, x1, y1: OpenCV's Haar cascade finds (86, 30, 139, 83).
FACE_BOX = (86.0, 30.0, 139.0, 83.0)


def make_clip(seed: int, frames: int = 9, size: tuple[int, int] = (128, 128), tint=(1.0, 1.0, 1.0),
              with_boxes: bool = False):
    """uint8 [T, H, W, 3]: a pan / zoom over the astronaut image, the face kept in view; with `with_boxes`
    also the face box of every frame (the image's face box carried through each frame's crop and resize)."""
    img = astronaut().astype(np.float32)
    S = img.shape[0]
    rng = np.random.default_rng(seed)
    z0, z1 = rng.uniform(0.55, 0.8), rng.uniform(0.55, 0.8)  # window side as a fraction of the image
    cx0, cx1 = rng.uniform(0.42, 0.52, 2)
    cy0, cy1 = rng.uniform(0.3, 0.4, 2)
    h, w = size
    out, boxes = [], []
    for i in range(frames):
        a = i / max(1, frames - 1)
        side = S * ((1 - a) * z0 + a * z1)
        cx, cy = S * ((1 - a) * cx0 + a * cx1), S * ((1 - a) * cy0 + a * cy1)
        sw, sh = side, side * h / w
        x0, y0 = min(max(cx - sw / 2, 0), S - sw), min(max(cy - sh / 2, 0), S - sh)
        crop = Image.fromarray(img.astype(np.uint8)).resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + sw, y0 + sh))
        f = np.asarray(crop, dtype=np.float32) * np.asarray(tint, dtype=np.float32)
        out.append(np.clip(f, 0, 255).astype(np.uint8))
        fx0, fy0, fx1, fy1 = FACE_BOX
        boxes.append([round((fx0 - x0) * w / sw, 2), round((fy0 - y0) * h / sh, 2),
                      round((fx1 - x0) * w / sw, 2), round((fy1 - y0) * h / sh, 2)])
    return (np.stack(out), boxes) if with_boxes else np.stack(out)


def make_id_groups(root: str | Path, groups: int = 1, clips: int = 3, frames: int = 9,
                   size: tuple[int, int] = (128, 128), face_boxes: str = "none", seed: int = 0, crf: int = 12) -> Path:
    """Write `groups` ID-group folders of `clips` mp4 clips each (with meta.json) under `root`; `crf` is the
    H.264 quality (higher: smaller files)."""
    if face_boxes not in ("none", "first", "all"):
        raise ValueError(f"face_boxes must be none, first or all, got {face_boxes!r}")
    root = Path(root)
    tints = [(1.0, 1.0, 1.0), (1.1, 0.95, 0.9), (0.9, 1.0, 1.1), (1.0, 1.1, 0.95)]
    for g in range(groups):
        folder = root / f"person_{g:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"id": f"person_{g:02d}", "clips": []}
        for c in range(clips):
            arr, boxes = make_clip(seed * 1000 + g * 100 + c, frames, size, tints[(g + c) % len(tints)], True)
            name = f"clip_{c:03d}.mp4"
            media.write_mp4(torch.from_numpy(arr), folder / name, fps=8, crf=crf)
            entry = {"file": name, "description": DESCRIPTIONS[(g + c) % len(DESCRIPTIONS)]}
            if face_boxes == "all" or (face_boxes == "first" and c == 0):
                entry["face_boxes"] = boxes
            meta["clips"].append(entry)
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


def degrade(clip: np.ndarray, seed: int, noise: float = 60.0) -> np.ndarray:
    """A worse version of a clip (a DPO loser): blurred, colour-shifted and noisy."""
    rng = np.random.default_rng(seed)
    out = []
    for f in clip:
        g = np.asarray(Image.fromarray(f).resize((f.shape[1] // 4, f.shape[0] // 4), Image.BILINEAR)
                       .resize((f.shape[1], f.shape[0]), Image.BILINEAR), dtype=np.float32)
        g = g * np.array([0.7, 1.0, 1.3], dtype=np.float32) + rng.normal(0, noise, g.shape)
        out.append(np.clip(g, 0, 255).astype(np.uint8))
    return np.stack(out)


def make_preference_pairs(root: str | Path, pairs: int = 4, frames: int = 9, size: tuple[int, int] = (64, 64),
                          seed: int = 0, dominated: int = 2) -> Path:
    """Write winner / loser clips, reference images and `pairs.jsonl` under `root`; returns the JSONL path.

    The winner is a clean pan over the astronaut image, the loser the same clip degraded, so the preference is
    learnable. `dominated` extra pairs carry labels that fail the Pareto filter (a win on one track and a
    loss on the other, and a tie on both)."""
    from .pairs import PreferencePair, write_pairs

    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    img = astronaut()
    Image.fromarray(img[20:100, 76:150]).save(root / "refs" / "face.png")
    Image.fromarray(img[:, 40:200]).save(root / "refs" / "portrait.png")
    media.write_mp4(torch.from_numpy(make_clip(seed * 1000 + 499, frames, (96, 96))), root / "refs" / "clip.mp4",
                    fps=8, crf=12)
    out = []
    for i in range(pairs + dominated):
        clip = make_clip(seed * 1000 + 500 + i, frames, size)
        media.write_mp4(torch.from_numpy(clip), root / "clips" / f"win_{i:03d}.mp4", fps=8, crf=12)
        media.write_mp4(torch.from_numpy(degrade(clip, seed + i)), root / "clips" / f"lose_{i:03d}.mp4", fps=8,
                        crf=12)
        labels = (1, 1) if i < pairs else [(1, -1), (0, 0)][(i - pairs) % 2]
        d = DESCRIPTIONS[i % len(DESCRIPTIONS)]
        prompt = f"Expression: {d['expression']} Action: {d['action']}"
        refs = ("refs/face.png", "refs/clip.mp4") if i % 2 else ("refs/portrait.png",)
        out.append(PreferencePair(prompt, refs, f"clips/win_{i:03d}.mp4", f"clips/lose_{i:03d}.mp4", *labels))
    return write_pairs(root / "pairs.jsonl", out)


def make_tiny_data(root: str | Path, groups: int = 1, clips: int = 3, frames: int = 9, size: int = 64,
                   face_boxes: str = "all", pairs: int = 2, crf: int = 30, seed: int = 0) -> Path:
    """The tiny data set of the ready configs (configs/sft-tiny.toml, dpo-tiny.toml), a few KB:

        root/id_groups/person_00/{meta.json, clip_000.mp4, ...}    ID groups (`make_id_groups`)
        root/pairs/{pairs.jsonl, lose_000.mp4, ..., face.jpg}       preference pairs for Flow-DPO

    Pair i's winner is clip i of the first group (cycled), its loser that clip degraded (`degrade`); its
    references are a face crop of the astronaut image and, for odd i, another clip of the group. Paths in
    pairs.jsonl are relative to its folder, so the data set can be moved whole."""
    root = Path(root)
    ids = make_id_groups(root / "id_groups", groups=groups, clips=clips, frames=frames, size=(size, size),
                         face_boxes=face_boxes, seed=seed, crf=crf)
    if pairs <= 0:
        return root
    from .pairs import PreferencePair, write_pairs

    folder = root / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(astronaut()[20:100, 76:150]).save(folder / "face.jpg", quality=85)
    person = ids / "person_00"
    meta = json.loads((person / "meta.json").read_text())["clips"]
    out = []
    for i in range(pairs):
        c = i % len(meta)
        winner = f"../id_groups/person_00/{meta[c]['file']}"
        clip = media.read_video(person / meta[c]["file"]).frames.numpy()
        media.write_mp4(torch.from_numpy(degrade(clip, seed * 1000 + i, noise=20.0)), folder / f"lose_{i:03d}.mp4",
                        fps=8, crf=crf)
        refs = ("face.jpg",) + ((f"../id_groups/person_00/{meta[(c + 1) % len(meta)]['file']}",) if i % 2 else ())
        d = meta[c]["description"]
        out.append(PreferencePair(f"Expression: {d['expression']} Action: {d['action']}", refs, winner,
                                  f"lose_{i:03d}.mp4", 1, 1))
    write_pairs(folder / "pairs.jsonl", out)
    return root


__all__ = ["make_tiny_data", "make_preference_pairs", "degrade", "make_id_groups", "make_clip", "astronaut",
           "DESCRIPTIONS", "FACE_BOX"]
