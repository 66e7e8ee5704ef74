"""The toy identity world: sprite "persons" whose identity is never in a prompt (design: toy-identity.md section 2).

An identity is (head shape, skin colour, eyes, forehead marking); the elements a prompt names are background,
action, shot size and expression. Sprites are drawn at the codec's effective resolution (H/4 x W/4) and
upsampled 4x with nearest neighbours, and frame i shows latent frame ceil(i/4)'s position, so `ToyCodec` is exact
on every clip. `write_world` writes the trainer's own ID-group format (mp4 + meta.json with exact face and person
boxes, so no detector runs) for the training identities and for the unseen ones, plus the evaluation cases.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "diamond", "triangle")
SKINS = {"white": (245, 245, 245), "cyan": (60, 220, 220), "pink": (250, 130, 200), "orange": (255, 120, 0),
         "brown": (120, 70, 30), "lime": (170, 250, 120)}
EYES = ("small", "slit", "bars", "big")  # not "wide": that is a shot word in every prompt
MARKS = ("none", "stripe", "spots")
BACKGROUNDS = {"red": (200, 40, 40), "green": (40, 160, 40), "blue": (40, 60, 200), "yellow": (220, 200, 40),
               "purple": (140, 40, 160), "gray": (128, 128, 128)}
ACTIONS = ("moving left", "moving right", "moving up", "moving down", "still")
SHOTS = ("close", "wide")
EXPRESSIONS = ("smiling", "frown", "surprised")
ATTRIBUTES = ("shape", "skin", "eyes", "mark")  # identity: from the references only
ELEMENT_HEADS = ("background", "shot", "expression")  # per frame; action comes from the displacement
_DIRS = {"moving left": (-1, 0), "moving right": (1, 0), "moving up": (0, -1), "moving down": (0, 1), "still": (0, 0)}
# mouth dark blue and mark red: far from the black outline, from each other and from every skin colour
_OUTLINE, _FEATURE, _MARK = (0, 0, 0), (0, 0, 170), (230, 0, 0)
_RADIUS = {"close": 0.29, "wide": 0.22}  # head radius as a share of the frame
STEP = 1 / 7  # motion per latent frame, as a share of the frame


@dataclass(frozen=True)
class WorldConfig:
    """size: clip height = width in pixels (a multiple of 32); frames: 4n+1. The attribute counts take the first
    values of each list (the smoke world keeps 1 eye style and no marking: 16x16 effective pixels)."""

    size: int = 96
    frames: int = 5
    clips_per_identity: int = 4
    shapes: int = 4
    skins: int = 6
    eyes: int = 4
    marks: int = 3
    unseen_share: float = 0.25
    min_per_value: int = 10  # every attribute value at least this often among the training identities
    seed: int = 0
    fps: int = 8
    crf: int = 0  # lossless H.264: sprite edges sit on 4x4 blocks, so yuv420's 2x2 chroma keeps the colours

    def __post_init__(self) -> None:
        if self.size % 32 or self.size < 64:
            raise ValueError(f"WorldConfig.size must be a multiple of 32, at least 64, got {self.size}")
        if self.frames < 5 or (self.frames - 1) % 4:
            raise ValueError(f"WorldConfig.frames must be 4n+1 >= 5, got {self.frames}")
        counts = (self.shapes, self.skins, self.eyes, self.marks)
        if not all(1 <= n <= len(v) for n, v in zip(counts, (SHAPES, SKINS, EYES, MARKS))):
            raise ValueError(f"WorldConfig attribute counts {counts} must lie in 1..{(4, 6, 4, 3)}")
        if not 0 < self.unseen_share < 1 or self.clips_per_identity < 3:
            raise ValueError("WorldConfig needs 0 < unseen_share < 1 and clips_per_identity >= 3")

    @property
    def counts(self) -> tuple[int, int, int, int]:
        return self.shapes, self.skins, self.eyes, self.marks

    @property
    def effective(self) -> int:
        return self.size // 4


@dataclass(frozen=True)
class Elements:
    background: int
    action: int
    shot: int
    expression: int

    def description(self) -> dict[str, str]:  # hairstyle, clothes, accessory empty: similarity("", "") = 1 drops them
        return {"shot type": f"{SHOTS[self.shot]} shot", "hairstyle": "", "clothes": "", "accessory": "",
                "expression": EXPRESSIONS[self.expression], "action": ACTIONS[self.action],
                "background": list(BACKGROUNDS)[self.background]}


def identities(cfg: WorldConfig) -> list[tuple[int, int, int, int]]:
    """Every identity as (shape, skin, eyes, mark) value indices."""
    return list(itertools.product(*(range(n) for n in cfg.counts)))


def split(cfg: WorldConfig) -> tuple[list[int], list[int]]:
    """(training, unseen) identity indices: a seeded random share held out, redrawn until every attribute value
    occurs at least `min_per_value` times (capped by what is possible) among the training identities."""
    ids = identities(cfg)
    rng = np.random.default_rng([cfg.seed, 1])
    n_unseen = max(1, round(cfg.unseen_share * len(ids)))
    for _ in range(1000):
        perm = rng.permutation(len(ids))
        unseen, train = sorted(perm[:n_unseen].tolist()), sorted(perm[n_unseen:].tolist())
        ok = True
        for a, n in enumerate(cfg.counts):
            need = min(cfg.min_per_value, len(train) // n)
            ok &= all(sum(ids[i][a] == v for i in train) >= need for v in range(n))
        if ok:
            return train, unseen
    raise ValueError(f"no split of {len(ids)} identities keeps every attribute value in training")


def random_elements(rng: np.random.Generator) -> Elements:  # uniform over every element's values
    return Elements(int(rng.integers(len(BACKGROUNDS))), int(rng.integers(len(ACTIONS))),
                    int(rng.integers(len(SHOTS))), int(rng.integers(len(EXPRESSIONS))))


def start_position(rng: np.random.Generator, e: Elements, E: int) -> tuple[float, float]:
    """Head centre at latent frame 0 (effective pixels), such that the head stays inside the frame after the move."""
    r = _RADIUS[SHOTS[e.shot]] * E
    dx, dy = _DIRS[ACTIONS[e.action]]
    lo, hi = r + 1.5, E - r - 1.5
    step = STEP * E
    x = rng.uniform(lo - min(dx, 0) * step, hi - max(dx, 0) * step)
    y = rng.uniform(lo - min(dy, 0) * step, hi - max(dy, 0) * step)
    return float(x), float(y)


def render_sprites(E: int, ident: np.ndarray, bg: np.ndarray, shot: np.ndarray, expr: np.ndarray,
                   cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """N frames at effective resolution, vectorised: ident [N, 4] value indices, the others [N]. uint8 [N, E, E, 3]."""
    N, r = len(cx), np.array([_RADIUS[s] for s in SHOTS])[shot] * E  # head radius per frame
    py, px = np.mgrid[0:E, 0:E]
    px, py = px[None] + 0.5, py[None] + 0.5  # pixel centres [1, E, E]
    dx, dy = (px - cx[:, None, None]) / r[:, None, None], (py - cy[:, None, None]) / r[:, None, None]
    shape = ident[:, 0][:, None, None]
    head = np.select([shape == 0, shape == 1, shape == 2],
                     [dx ** 2 + dy ** 2 <= 1, np.maximum(abs(dx), abs(dy)) <= 0.85, abs(dx) + abs(dy) <= 1.1],
                     (dy >= -0.8) & (dy <= 1.2) & (abs(dx) <= 1.1 * (1.2 - dy) / 2.0))  # triangle, apex down
    grown = head.copy()  # 1-pixel outline: the head dilated by one pixel (8-neighbourhood) minus the head
    for sy, sx in itertools.product((-1, 0, 1), repeat=2):
        grown |= np.roll(np.roll(head, sy, 1), sx, 2)
    img = np.empty((N, E, E, 3), np.uint8)
    img[:] = np.array(list(BACKGROUNDS.values()), np.uint8)[bg][:, None, None]
    img[grown & ~head] = _OUTLINE
    skin = np.array(list(SKINS.values()), np.uint8)[ident[:, 1]]
    img[head] = np.broadcast_to(skin[:, None, None], img.shape)[head]
    # features sit at integer pixel offsets from snapped centres, so every style has a fixed pixel pattern
    ix, iy = np.floor(px).astype(int), np.floor(py).astype(int)
    col = np.floor(cx).astype(int)[:, None, None]
    ox = np.maximum(np.round(0.38 * r), 2).astype(int)[:, None, None]
    eye_row = np.floor(cy - 0.15 * r).astype(int)[:, None, None]  # >= 2 rows below the mark row
    oy = iy - eye_row
    for side in (-1, 1):
        ex = ix - (col + side * ox)
        style = ident[:, 2][:, None, None]
        eye = np.select([style == 0, style == 1, style == 2],
                        [(ex == 0) & (oy == 0), (abs(ex) <= 1) & (oy == 0), (ex == 0) & (abs(oy) <= 1)],
                        (abs(ex) <= 1) & (abs(oy) <= 1))
        img[eye] = _OUTLINE
    mark = ident[:, 3][:, None, None]
    mark_row = np.floor(cy - 0.55 * r).astype(int)[:, None, None]  # wide enough on a diamond's top
    on_row = (iy == mark_row) & head
    spots = on_row & (abs(ix - col) <= 2) & ((ix - col) % 2 == 0)
    img[np.where(mark == 1, on_row, np.where(mark == 2, spots, False))] = _MARK
    mx, my = ix - col, iy - np.floor(cy + 0.45 * r).astype(int)[:, None, None]
    e_ = expr[:, None, None]
    mouth = np.select([e_ == 0, e_ == 1],
                      [((abs(mx) == 2) & (my == 0)) | ((abs(mx) <= 1) & (my == 1)),
                       ((abs(mx) == 2) & (my == 1)) | ((abs(mx) <= 1) & (my == 0))],
                      (abs(mx) <= 1) & (abs(my) <= 1))  # surprised: an open mouth, a filled 3x3 block
    img[mouth] = _FEATURE
    return img


def render_clips(cfg: WorldConfig, ident: np.ndarray, elems: list[Elements], starts: np.ndarray) -> np.ndarray:
    """N clips: ident [N, 4], starts [N, 2] (head centre at latent frame 0). uint8 [N, T, H, W, 3]; frame i shows
    latent frame ceil(i/4)'s position (constant inside each causal chunk, so the codec is exact)."""
    E, N = cfg.effective, len(elems)
    n_lat = 1 + (cfg.frames - 1) // 4
    d = np.array([_DIRS[ACTIONS[e.action]] for e in elems], float) * STEP * E  # [N, 2]
    k = np.repeat(np.arange(n_lat), N)  # latent frame of each rendered row, rows ordered (k, n)
    pos = np.tile(starts, (n_lat, 1)) + k[:, None] * np.tile(d, (n_lat, 1))
    lat = render_sprites(E, np.tile(ident, (n_lat, 1)), np.tile([e.background for e in elems], n_lat),
                         np.tile([e.shot for e in elems], n_lat), np.tile([e.expression for e in elems], n_lat),
                         pos[:, 0], pos[:, 1]).reshape(n_lat, N, E, E, 3)
    frame_lat = np.ceil(np.arange(cfg.frames) / 4).astype(int)
    clips = lat[frame_lat].transpose(1, 0, 2, 3, 4)  # [N, T, E, E, 3]
    return clips.repeat(4, axis=2).repeat(4, axis=3)


def head_box(cfg: WorldConfig, e: Elements, pos: tuple[float, float], shape: int) -> list[float]:
    """The head's box (x0, y0, x1, y1) in full-resolution pixels, outline included."""
    r = _RADIUS[SHOTS[e.shot]] * cfg.effective
    top, bottom = (0.8, 1.2) if SHAPES[shape] == "triangle" else (1.1, 1.1)
    x, y = pos
    box = [x - 1.1 * r - 1, y - top * r - 1, x + 1.1 * r + 1, y + bottom * r + 1]
    return [float(np.clip(v * 4, 0, cfg.size)) for v in box]


def person_box(cfg: WorldConfig, face: list[float]) -> list[float]:
    """The head box grown 1.6x about its centre (the sprite has no body: a portrait is a wider crop)."""
    x0, y0, x1, y1 = face
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, 0.8 * (x1 - x0), 0.8 * (y1 - y0)
    return [float(np.clip(v, 0, cfg.size)) for v in (cx - hw, cy - hh, cx + hw, cy + hh)]


@dataclass(frozen=True)
class Case:
    """One generation input: an identity's references (primary first), the target's elements and prompts, the seed.
    `swap` is the index of a case of another identity whose references the swapped-reference arm uses."""

    index: int
    split: str  # "unseen" (evaluation) or "train" (preference-pair inputs)
    identity: tuple[int, int, int, int]
    references: tuple[str, ...]  # relative to the world folder
    elements: Elements
    prompt: str  # the full prompt (the base, which never saw references)
    differential: str  # relative to the primary reference's clip (face form), as the trainer builds it
    seed: int
    swap: int
    primary_background: int  # the primary reference's background (copy-paste guard)


def _crop_png(frames: np.ndarray, box, path: Path) -> None:
    from PIL import Image

    x0, y0, x1, y1 = (int(v) for v in box)
    Image.fromarray(np.ascontiguousarray(frames[y0:y1, x0:x1])).save(path)


def write_world(root: str | Path, cfg: WorldConfig, eval_cases: int, pair_inputs: int) -> dict:
    """ID groups under root/train and root/unseen (mp4 + meta.json, exact boxes), reference crops under
    root/refs and root/cases.jsonl; returns a summary. Deterministic in cfg.seed."""
    from ... import media
    from ...person_crop import face_crop_box, portrait_box
    from ..prompts import differential_prompt, format_prompt, make_similarity

    root = Path(root)
    train, unseen = split(cfg)
    ids = identities(cfg)
    rng = np.random.default_rng([cfg.seed, 2])
    descriptions: dict[int, list[tuple[Elements, list[float], np.ndarray]]] = {}
    for part, members in (("train", train), ("unseen", unseen)):
        for i in members:
            elems = [random_elements(rng) for _ in range(cfg.clips_per_identity)]
            starts = np.array([start_position(rng, e, cfg.effective) for e in elems])
            clips = render_clips(cfg, np.array([ids[i]] * len(elems)), elems, starts)
            folder = root / part / f"id_{i:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            meta, descriptions[i] = [], []
            for j, (e, clip) in enumerate(zip(elems, clips)):
                media.write_mp4(clip, folder / f"clip_{j}.mp4", cfg.fps, crf=cfg.crf)
                lat = np.ceil(np.arange(cfg.frames) / 4)
                d = np.array(_DIRS[ACTIONS[e.action]], float) * STEP * cfg.effective
                faces = [head_box(cfg, e, tuple(starts[j] + k * d), ids[i][0]) for k in lat]
                meta.append({"file": f"clip_{j}.mp4", "description": e.description(), "face_boxes": faces,
                             "person_boxes": [person_box(cfg, f) for f in faces], "num_frames": cfg.frames,
                             "height": cfg.size, "width": cfg.size, "fps": cfg.fps, "toy_elements": asdict(e)})
                descriptions[i].append((e, faces[0], clip[0]))
            (folder / "meta.json").write_text(json.dumps({"id": f"id_{i:03d}", "clips": meta}, indent=1))
    similarity = make_similarity("jaccard")
    refs = root / "refs"
    refs.mkdir(exist_ok=True)
    cases = []
    for split_name, members, n in (("unseen", unseen, eval_cases), ("train", train, pair_inputs)):
        first = len(cases)
        for c in range(n):
            i = members[c % len(members)]
            a, b = rng.choice(len(descriptions[i]), 2, replace=False)
            (ea, fa, frame_a), (_, fb, frame_b) = descriptions[i][a], descriptions[i][b]
            names = (f"refs/case_{len(cases):04d}_face.png", f"refs/case_{len(cases):04d}_portrait.png")
            _crop_png(frame_a, face_crop_box(fa, 0.35, cfg.size, cfg.size), root / names[0])
            _crop_png(frame_b, portrait_box(None, person_box(cfg, fb), 1.0, cfg.size, cfg.size), root / names[1])
            target = random_elements(rng)
            other = first + (c + 1 + int(rng.integers(n - 1))) % n if n > 1 else first + c
            if n > 1 and members[(other - first) % len(members)] == i:  # a different identity for the swap
                other = first + (c + 1) % n
            cases.append(Case(len(cases), split_name, ids[i], names, target, format_prompt(target.description()),
                              differential_prompt(ea.description(), target.description(), similarity, None, "face"),
                              int(rng.integers(2 ** 31)), other, ea.background))
    lines = [json.dumps({**asdict(c), "identity_index": ids.index(c.identity)}) for c in cases]
    (root / "cases.jsonl").write_text("".join(x + "\n" for x in lines))
    return {"identities": len(ids), "train": len(train), "unseen": len(unseen), "cases": len(cases)}


def read_cases(root: str | Path, split_name: str) -> list[Case]:
    """The cases of one split ("unseen" or "train") from root/cases.jsonl."""
    out = []
    for line in (Path(root) / "cases.jsonl").read_text().splitlines():
        d = json.loads(line)
        if d["split"] == split_name:
            d.pop("identity_index")
            out.append(Case(**{**d, "identity": tuple(d["identity"]), "references": tuple(d["references"]),
                               "elements": Elements(**d["elements"])}))
    return out


__all__ = ["WorldConfig", "Elements", "SHAPES", "SKINS", "EYES", "MARKS", "BACKGROUNDS", "ACTIONS", "SHOTS",
           "EXPRESSIONS", "ATTRIBUTES", "ELEMENT_HEADS", "identities", "split", "random_elements", "start_position",
           "render_sprites", "render_clips", "head_box", "person_box", "write_world", "read_cases", "Case"]
