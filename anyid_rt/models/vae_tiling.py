"""Spatial tiling of the VAE decode: the tile plan (`VAETiling`) and the blending ramps `WanVAE.decode` uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VAETiling:
    """Spatial tiling of decode, in latent pixels: tiles of tile_h x tile_w that overlap by `overlap`.

    The decoder's stem (conv1 and the middle, with its per-frame attention over the whole frame) runs on the
    full latent, which is cheap at latent resolution; only the up-stages and the head, where memory grows
    with the 8x upsampling, are tiled. Each tile streams through all latent frames with its own cache and the
    overlaps are blended with linear ramps, so activation memory scales with the tile area. The tiled part
    is purely convolutional, but its 3x3 convs zero-pad at tile borders where the untiled decode sees
    neighbours: tiling is an approximation within a few latent pixels of each seam (the receptive field of
    the up-stages is about 12 latent pixels at full size), and exact elsewhere up to rounding. The blend
    gives each tile zero weight in the quarter of the overlap nearest its own border and ramps linearly
    over the middle half, so larger overlaps shrink the seam error. A tile that covers the whole latent
    reproduces the untiled decode exactly.
    """

    tile_h: int = 32
    tile_w: int = 32
    overlap: int = 8

    def __post_init__(self) -> None:
        if self.tile_h < 1 or self.tile_w < 1:
            raise ValueError(f"VAETiling tile size must be >= 1, got {self.tile_h}x{self.tile_w}")
        if not 0 <= self.overlap < min(self.tile_h, self.tile_w):
            raise ValueError(f"VAETiling.overlap must be in [0, min(tile_h, tile_w)), got {self.overlap} "
                             f"for tiles of {self.tile_h}x{self.tile_w}")

    @classmethod
    def of(cls, tile) -> "VAETiling":
        """A VAETiling, or a tuple (tile_h, tile_w) / (tile_h, tile_w, overlap). Without an overlap it is
        min(8, min(tile_h, tile_w) // 4)."""
        if isinstance(tile, VAETiling):
            return tile
        if isinstance(tile, (tuple, list)) and len(tile) in (2, 3) and all(isinstance(v, int) for v in tile):
            if len(tile) == 3:
                return cls(*tile)
            return cls(tile[0], tile[1], min(8, min(tile) // 4))
        raise ValueError(f"tile must be a VAETiling or (tile_h, tile_w[, overlap]) in latent pixels, got {tile!r}")


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length `tile` covering [0, size) with at least `overlap` between neighbours; the
    last tile is aligned to the end."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, ramp: int, lead: bool, trail: bool) -> torch.Tensor:
    """1-D blend weights of a tile `length` pixels long whose overlaps with its neighbours are `ramp` pixels.

    On a side shared with a neighbour (`lead`: the start, `trail`: the end) the weight is 0 over the quarter
    of the overlap nearest the tile's border (where zero padding distorts the tile most), rises linearly
    over the middle half and is 1 beyond; a neighbour's mirrored ramp makes the two sum to 1.
    """
    w = torch.ones(length)
    if ramp <= 0:
        return w
    margin = ramp // 4
    i = torch.arange(length, dtype=torch.float32)
    rise = ((i + 0.5 - margin) / (ramp - 2 * margin)).clamp(0.0, 1.0)
    if lead:
        w = torch.minimum(w, rise)
    if trail:
        w = torch.minimum(w, rise.flip(0))
    return w


__all__ = ["VAETiling"]
