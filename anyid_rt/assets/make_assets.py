"""Regenerate the bundled assets (run from the repo root: python anyid_rt/assets/make_assets.py).

* astronaut.png: scikit-image's `data.astronaut()` (Eileen Collins, NASA photo, public domain), 512x512 downscaled
  to 256x256 with LANCZOS.
* astronaut_clip.mp4: 9 frames, 128x128, 8 fps, H.264: a slow zoom from the whole picture towards the face
  (crop boxes interpolated linearly, each resized with LANCZOS), written with `anyid_rt.media.write_mp4`.
Both are deterministic inputs; the mp4 bytes may differ across x264 versions, the PNG should not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGE_SIZE = 256
CLIP_SIZE = 128
CLIP_FRAMES = 9
CLIP_FPS = 8
# Face centre and final crop size in the 256x256 image (x, y, side).
FACE_BOX_END = (112, 80, 144)


def make_image() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def make_clip(img: Image.Image) -> np.ndarray:
    cx1, cy1, side1 = FACE_BOX_END
    frames = []
    for i in range(CLIP_FRAMES):
        a = i / (CLIP_FRAMES - 1)
        side = IMAGE_SIZE + a * (side1 - IMAGE_SIZE)
        cx = IMAGE_SIZE / 2 + a * (cx1 - IMAGE_SIZE / 2)
        cy = IMAGE_SIZE / 2 + a * (cy1 - IMAGE_SIZE / 2)
        x0 = min(max(cx - side / 2, 0), IMAGE_SIZE - side)
        y0 = min(max(cy - side / 2, 0), IMAGE_SIZE - side)
        box = (x0, y0, x0 + side, y0 + side)
        frames.append(np.asarray(img.resize((CLIP_SIZE, CLIP_SIZE), Image.LANCZOS, box=box)))
    return np.stack(frames)


def main() -> None:
    import torch

    from anyid_rt.media import write_mp4

    img = make_image()
    img.save(HERE / "astronaut.png", optimize=True)
    write_mp4(torch.from_numpy(make_clip(img)), HERE / "astronaut_clip.mp4", fps=CLIP_FPS, crf=20)
    for p in sorted(HERE.iterdir()):
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
