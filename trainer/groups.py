"""ID groups: the training data on disk, one folder per identity, read from its meta.json.

Format (one folder per identity under the data root)
----------------------------------------------------
    root/
      person_a/
        meta.json
        clip_000.mp4
        clip_001.mp4
      person_b/ ...

`meta.json`:

    {"clips": [
       {"file": "clip_000.mp4",
        "description": {"shot type": "Static close-up shot.", "hairstyle": "...", "clothes": "...",
                        "accessory": "...", "expression": "...", "action": "...", "background": "..."},
        "face_boxes": [[x0, y0, x1, y1], null, ...],      # optional: per frame (list) or {"3": [...]} (dict)
        "person_boxes": [[x0, y0, x1, y1], ...],         # optional, same forms; used for portraits / clips
        "num_frames": 121, "height": 720, "width": 1280,  # optional; read from the file when absent
        "fps": 30.0}                                      # optional; read from the file's header when needed
     ]}

Boxes are in pixels of the clip's frames. The seven description elements are the paper's (section 4.3):
shot type, hairstyle, clothes, accessory, expression, action, background ("shot", "clothing",
"accessories" are accepted spellings). Faces and persons without boxes are found by the face detector
(`references.py`) when a reference is cut.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import ELEMENT_ALIASES as _ALIASES, ELEMENTS

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


class DataError(ValueError):
    """The dataset on disk is not usable; the message names the file and what to fix."""


@dataclass(frozen=True)
class ClipMeta:
    path: Path
    description: dict[str, str]
    num_frames: int
    height: int
    width: int
    face_boxes: dict[int, Box] = field(default_factory=dict)
    person_boxes: dict[int, Box] = field(default_factory=dict)
    fps: float | None = None  # None: not in meta.json (and the file not opened); `probe_fps` reads it


@dataclass(frozen=True)
class IDGroup:
    name: str
    clips: tuple[ClipMeta, ...]


def normalize_description(desc: dict, where: str) -> dict[str, str]:
    """The seven elements, keys normalised ("Shot_Type" -> "shot type"); all seven are required."""
    if not isinstance(desc, dict):
        raise DataError(f"{where}: description must be an object with the seven elements {list(ELEMENTS)}")
    out = {}
    for k, v in desc.items():
        key = re.sub(r"[\s_]+", " ", str(k).strip().lower())
        key = _ALIASES.get(key, key)
        if key not in ELEMENTS:
            raise DataError(f"{where}: unknown description element {k!r}; the elements are {list(ELEMENTS)}")
        if not isinstance(v, str):
            raise DataError(f"{where}: description[{k!r}] must be a string")
        out[key] = v.strip()
    missing = [e for e in ELEMENTS if e not in out]
    if missing:
        raise DataError(f"{where}: description lacks {missing} (use \"\" for an element with nothing to say)")
    return out


def _parse_boxes(raw, n_frames: int, where: str) -> dict[int, Box]:
    if raw is None:
        return {}
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else None
    if items is None:
        raise DataError(f"{where}: boxes must be a list (one per frame, null allowed) or an object frame -> box")
    out = {}
    for k, box in items:
        if box is None:
            continue
        try:
            i = int(k)
        except ValueError:
            raise DataError(f"{where}: frame index {k!r} is not an integer") from None
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(c, (int, float)) for c in box)):
            raise DataError(f"{where}: frame {i}: a box is [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = map(float, box)
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{where}: frame {i}: box {box} is empty (need x1 > x0 and y1 > y0)")
        if not 0 <= i < n_frames:
            raise DataError(f"{where}: box for frame {i}, but the clip has {n_frames} frames")
        out[i] = (x0, y0, x1, y1)
    return out


def probe_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a clip; the frame count is decoded when the container does not say."""
    import av

    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            n, h, w = s.frames, s.codec_context.height, s.codec_context.width
            if n <= 0:
                n = sum(1 for _ in c.decode(s))
    except (av.FFmpegError, OSError, IndexError) as e:
        raise DataError(f"{path}: not a readable video ({e})") from e
    return int(n), int(h), int(w)


def probe_fps(path: Path) -> float | None:
    """A clip's frame rate as its container states it (the header only, nothing decoded); None if unstated."""
    import av

    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
    except (av.FFmpegError, OSError, IndexError) as e:
        raise DataError(f"{path}: not a readable video ({e})") from e
    return float(rate) if rate else None


def _fps(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DataError(f"{where}: fps must be a positive number, got {value!r}")
    return float(value)


def load_group(folder: str | Path) -> IDGroup:
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{folder}: no meta.json (an ID group is a folder of clips plus meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise DataError(f"{meta_path}: invalid JSON: {e}") from e
    clips_raw = meta.get("clips") if isinstance(meta, dict) else None
    if not isinstance(clips_raw, list) or not clips_raw:
        raise DataError(f"{meta_path}: needs a non-empty \"clips\" list")
    clips = []
    for j, c in enumerate(clips_raw):
        where = f"{meta_path} clips[{j}]"
        if not isinstance(c, dict) or "file" not in c or "description" not in c:
            raise DataError(f"{where}: each clip needs \"file\" and \"description\"")
        path = folder / c["file"]
        if not path.is_file():
            raise DataError(f"{where}: file {path} not found")
        sizes = [c.get(k) for k in ("num_frames", "height", "width")]
        fps = _fps(c.get("fps"), where)
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            n, h, w = sizes  # given in meta.json: no need to open the file (large datasets)
        else:
            n, h, w = probe_video(path)
            fps = fps or probe_fps(path)
        clips.append(ClipMeta(path, normalize_description(c["description"], where), n, h, w,
                              _parse_boxes(c.get("face_boxes"), n, f"{where} face_boxes"),
                              _parse_boxes(c.get("person_boxes"), n, f"{where} person_boxes"), fps))
    return IDGroup(str(meta.get("id", folder.name)), tuple(clips))


def load_groups(root: str | Path) -> list[IDGroup]:
    """Every sub-folder of `root` holding a meta.json, sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    groups = [load_group(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "meta.json").exists()]
    if not groups:
        raise DataError(f"{root}: no ID-group folders (sub-folders with a meta.json)")
    return groups


__all__ = ["Box", "DataError", "ClipMeta", "IDGroup", "normalize_description", "probe_video", "probe_fps", "load_group",
           "load_groups"]
