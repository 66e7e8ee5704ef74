"""The Wan2.2 VAE (`Wan2.2_VAE.pth`): 16x spatial, 4x temporal compression, 48 latent channels.

Facts are in shared/reference/wan22-ti2v-5b.md section 7; module names mirror the original checkpoint keys
(`encoder.downsamples.{i}.downsamples.{j}.residual.{0,2,3,6}`, `decoder.upsamples...`, top-level `conv1` /
`conv2`) so that the released file loads by name. Loading (either layout) is in `models/vae_loader.py`.

Streaming. The encoder sees frame 0 alone, then chunks of 4 frames; the decoder sees one latent frame at a
time (frame 0 -> 1 output frame, later frames -> 4). Between chunks every 3-tap causal conv keeps the last
CACHE_T = 2 frames of its input, the temporal resamplers keep their own state (the "Rep" marker of the
temporal upsampler, the last frame of the temporal downsampler), and the parameter-free shortcuts follow the
first-chunk rules (AvgDown3D front pad, DupUp3D crop). That state lives in a `FeatureCache` object created per
encode / decode call and passed down explicitly: the modules hold no mutable state, so calls are reentrant.

Numerics: everything runs in the module's dtype (fp32 by default, bf16 allowed) except the RMS norms, which
compute in fp32; encode returns fp32 latents and decode fp32 pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .vae_tiling import VAETiling, _ramp, _tile_starts

CACHE_T = 2  # frames of input each causal conv keeps between chunks

# Marker left in a temporal upsampler's cache slot after the first chunk (the original code's "Rep"): the
# second chunk then runs the time conv with zero padding instead of cached frames.
REP = "Rep"


class FeatureCache:
    """Streaming state of one encode or decode call: one slot per cached layer (numbered at build time)."""

    __slots__ = ("slots",)

    def __init__(self, num_slots: int):
        self.slots: list = [None] * num_slots


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding all sits on the past side: padding (t, h, w) becomes
    (left w, right w, top h, bottom h, front 2t, back 0). Frames from a previous chunk (`past`) replace as
    many leading zero frames."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.causal_pad = (pw, pw, ph, ph, 2 * pt, 0)
        # Streaming slot index, assigned by `_number_slots`; None for convs that keep no cache (1x1x1 convs,
        # the resamplers' time convs whose state their Resample owns).
        self.slot: int | None = -1 if pt > 0 else None

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        pad = list(self.causal_pad)
        if past is not None and pad[4] > 0:
            x = torch.cat([past, x], dim=2)
            pad[4] -= past.shape[2]
        if any(pad):
            x = F.pad(x, pad)
        return super().forward(x)

    def stream(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """Forward one chunk and remember the last CACHE_T input frames; a 1-frame chunk keeps the last
        frame of the previous state in front of it."""
        past = cache.slots[self.slot]
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T and past is not None:
            keep = torch.cat([past[:, :, -1:], keep], dim=2)
        else:
            keep = keep.clone()  # do not hold a view of the whole chunk
        out = self(x, past)
        cache.slots[self.slot] = keep
        return out


class RMSNorm(nn.Module):
    """F.normalize over channels * sqrt(C) * gamma, computed in fp32. gamma is [C,1,1,1] for video tensors
    and [C,1,1] for per-frame (image) tensors, as in the checkpoint."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * (2 if images else 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()
        return y.to(x.dtype)


class ResidualBlock(nn.Module):
    """residual = [norm, SiLU, conv3, norm, SiLU, (dropout slot), conv3]; shortcut = 1x1x1 conv if widths
    differ. Indices match the checkpoint (`residual.{0,2,3,6}`, `shortcut`)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        r = self.residual
        h = self.shortcut(x)
        x = r[2].stream(F.silu(r[0](x)), cache)
        x = r[6].stream(F.silu(r[3](x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame over its h*w positions (scale 1/sqrt(C))."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)                       # [bt, C, h, w]
        qkv = self.to_qkv(self.norm(y)).reshape(b * t, 3 * c, h * w)        # [bt, 3C, hw]
        q, k, v = qkv.transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)         # 3 x [bt, 1, hw, C]
        y = F.scaled_dot_product_attention(q, k, v)                         # [bt, 1, hw, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Upsample2x(nn.Module):
    """Nearest-exact x2 in h and w (a copy, so it is exact in any dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial x2 down/up (per frame, `resample.1` is the conv), with a temporal x2 in the 3d modes.

    downsample3d: the first chunk passes through (1 frame stays 1) and its last frame is kept; later chunks
      prepend the kept frame and run `time_conv` (kernel 3, stride 2, no padding): 4 frames -> 2.
    upsample3d: `time_conv` (C -> 2C) runs before the spatial upsample and its two halves interleave in time
      (t -> 2t). First chunk: no time conv, the slot gets the REP marker. Second chunk: time conv with zero
      padding. Later chunks: with the cached frames.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("down"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim, 3, padding=1))
        self.slot: int | None = None
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        if mode.endswith("3d"):
            self.time_conv.slot = None  # this module owns the slot
            self.slot = -1

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        b, c, t, h, w = x.shape
        y = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))        # [bt, C, h', w']
        x = y.reshape(b, t, c, y.shape[-2], y.shape[-1]).transpose(1, 2)    # [b, C, t, h', w']
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        state = cache.slots[self.slot]
        if state is None:  # first chunk
            cache.slots[self.slot] = REP
            return x
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < CACHE_T:
            front = torch.zeros_like(keep) if state is REP else state[:, :, -1:]
            keep = torch.cat([front, keep], dim=2)
        else:
            keep = keep.clone()
        y = self.time_conv(x, None if state is REP else state)             # [b, 2C, t, h, w]
        cache.slots[self.slot] = keep
        b, c2, t, h, w = y.shape
        # channel halves -> even / odd output frames
        return y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _time_down(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        state = cache.slots[self.slot]
        cache.slots[self.slot] = x[:, :, -1:].clone()
        if state is None:  # first chunk
            return x
        return self.time_conv(torch.cat([state, x], dim=2))                 # (1 + t) frames -> t / 2


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of an encoder stage: front-pad T to a multiple of ft, fold (ft, fs, fs) into
    channels (c-major), then average groups of in*ft*fs*fs/out channels."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int):
        super().__init__()
        if (cin * ft * fs * fs) % cout:
            raise ValueError(f"AvgDown3D: {cin}*{ft}*{fs}^2 channels do not split into {cout} groups")
        self.cout, self.ft, self.fs = cout, ft, fs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        pad_t = (-x.shape[2]) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.cout, -1, t // ft, h // fs, w // fs)          # [b, out, group, t', h', w']
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of a decoder up-stage: repeat each channel out*ft*fs*fs/in times, unfold the
    copies into (ft, fs, fs) and interleave them into T, H, W. On the first chunk the first ft-1 frames are
    dropped (1 latent frame -> 1 frame)."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int):
        super().__init__()
        if (cout * ft * fs * fs) % cin:
            raise ValueError(f"DupUp3D: {cout}*{ft}*{fs}^2 channels are not a multiple of {cin}")
        self.cout, self.ft, self.fs = cout, ft, fs
        self.repeats = cout * ft * fs * fs // cin

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).reshape(b, self.cout, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.cout, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first_chunk else x


class DownStage(nn.Module):
    """Encoder stage (original Down_ResidualBlock): `downsamples` = residual blocks (+ Resample at index
    num_res_blocks), plus the AvgDown3D shortcut of the stage input."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(cin, cout, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = [ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks)]
        if spatial:
            blocks.append(Resample(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        y = x
        for block in self.downsamples:
            y = block(y, cache)
        return y + self.avg_shortcut(x)


class UpStage(nn.Module):
    """Decoder stage (original Up_ResidualBlock): `upsamples` = num_res_blocks + 1 residual blocks
    (+ Resample at index num_res_blocks + 1), plus the DupUp3D shortcut when the stage upsamples."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(cin, cout, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = [ResidualBlock(cin if j == 0 else cout, cout) for j in range(num_res_blocks + 1)]
        if spatial:
            blocks.append(Resample(cout, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        if self.avg_shortcut is not None:
            y = y + self.avg_shortcut(x, first_chunk)
        return y


class Encoder(nn.Module):
    """[B, 12, t, H/2, W/2] patchified pixels -> [B, 2*z_dim, t', H/16, W/16] (mu and log_var)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]   # e.g. [160, 160, 320, 640, 640]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(cfg.in_channels * cfg.patch_size ** 2, dims[0], 3, padding=1)
        self.downsamples = nn.ModuleList(
            DownStage(dims[i], dims[i + 1], cfg.num_res_blocks,
                      temporal=i < last and cfg.temporal_downsample[i], spatial=i < last)
            for i in range(len(cfg.dim_mult)))
        width = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(width, width), AttentionBlock(width), ResidualBlock(width, width)])
        self.head = nn.Sequential(RMSNorm(width), nn.SiLU(), CausalConv3d(width, 2 * cfg.z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1.stream(x, cache)
        for stage in self.downsamples:
            x = stage(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        x = self.middle[2](x, cache)
        return self.head[2].stream(F.silu(self.head[0](x)), cache)


class Decoder(nn.Module):
    """One latent frame [B, z_dim, 1, h, w] -> [B, 12, 1 or 4, 8h, 8w] (patchified pixels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]   # e.g. [1024, 1024, 1024, 512, 256]
        temporal_up = cfg.temporal_downsample[::-1]
        last = len(mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        self.upsamples = nn.ModuleList(
            UpStage(dims[i], dims[i + 1], cfg.num_res_blocks,
                    temporal=i < last and temporal_up[i], spatial=i < last)
            for i in range(len(mult)))
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(),
                                  CausalConv3d(dims[-1], cfg.in_channels * cfg.patch_size ** 2, 3, padding=1))

    def stem(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """conv1 and the middle (with the per-frame attention), at latent resolution: [B, z, 1, h, w] ->
        [B, C0, 1, h, w]."""
        x = self.conv1.stream(x, cache)
        x = self.middle[0](x, cache)
        x = self.middle[1](x)
        return self.middle[2](x, cache)

    def body(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        """The up-stages and the head: convolutions only, so a spatial crop of the input decodes to the same
        crop of the output away from its borders. [B, C0, 1, h, w] -> [B, 12, 1 or 4, 8h, 8w]."""
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        return self.head[2].stream(F.silu(self.head[0](x)), cache)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        return self.body(self.stem(x, cache), cache, first_chunk)


def _number_slots(root: nn.Module) -> int:
    """Give every cached layer under `root` its FeatureCache slot index; returns the number of slots."""
    n = 0
    for m in root.modules():
        if getattr(m, "slot", None) is not None:
            m.slot = n
            n += 1
    return n


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p], channel order (c, r = w-offset, q = h-offset)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)                 # b c t h q w r
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `patchify`: [B, C*p*p, T, h, w] -> [B, C, T, h*p, w*p]."""
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)              # b c r q t h w
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


# --------------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------------

class WanVAE(nn.Module):
    """The Wan2.2 VAE. `encode(frames)` -> normalised latent; `decode(latent, tile=None)` -> frames."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)   # -> (mu, log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)           # applied to the whole latent before decoding
        self.decoder = Decoder(cfg)
        self.encoder_slots = _number_slots(self.encoder)
        self.decoder_slots = _number_slots(self.decoder)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, dtype=torch.float32, device=self.device).view(shape)
        std = torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=self.device).view(shape)
        return mean, std

    # ---- encode -----------------------------------------------------------------------------------------

    def _check_frames(self, frames: torch.Tensor) -> None:
        cfg = self.cfg
        s, tc = cfg.spatial_compression, cfg.temporal_compression
        if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
            raise ValueError(f"encode expects a float tensor [B, {cfg.in_channels}, T, H, W] in [-1, 1], "
                             f"got {type(frames).__name__} {getattr(frames, 'dtype', '')}")
        if frames.ndim != 5:
            raise ValueError(f"encode expects [B, {cfg.in_channels}, T, H, W] (5 dims), got shape "
                             f"{tuple(frames.shape)}; add a batch (and for an image a frame) dimension")
        b, c, t, h, w = frames.shape
        if c != cfg.in_channels:
            raise ValueError(f"encode expects {cfg.in_channels} channels in dim 1 of [B, C, T, H, W], got shape "
                             f"{tuple(frames.shape)}")
        if t < 1 or (t - 1) % tc:
            raise ValueError(f"encode needs T = {tc}n+1 frames (1, {1 + tc}, {1 + 2 * tc}, ...), got T={t} in "
                             f"shape {tuple(frames.shape)}")
        if h < s or w < s or h % s or w % s:
            raise ValueError(f"encode needs H and W to be multiples of {s}, got H={h}, W={w} in shape "
                             f"{tuple(frames.shape)}")

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 4n+1, H and W multiples of 16 -> normalised mu, fp32,
        [B, 48, 1 + (T-1)/4, H/16, W/16]. Frame 0 is encoded alone, then chunks of 4 with the cache carried."""
        self._check_frames(frames)
        tc = self.cfg.temporal_compression
        x = patchify(frames.to(device=self.device, dtype=self.dtype), self.cfg.patch_size)  # [B, 12, T, H/2, W/2]
        cache = FeatureCache(self.encoder_slots)
        chunks = [x[:, :, :1]] + [x[:, :, i:i + tc] for i in range(1, x.shape[2], tc)]
        out = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # [B, 2z, F, h, w]
        del cache
        mu = self.conv1(out)[:, : self.cfg.z_dim].float()
        mean, std = self._latent_stats()
        return (mu - mean) * (1.0 / std)

    # ---- decode -----------------------------------------------------------------------------------------

    def _check_latent(self, latent: torch.Tensor) -> None:
        z = self.cfg.z_dim
        if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
            raise ValueError(f"decode expects a float latent [B, {z}, F, h, w], got {type(latent).__name__} "
                             f"{getattr(latent, 'dtype', '')}")
        if latent.ndim != 5:
            raise ValueError(f"decode expects a latent [B, {z}, F, h, w] (5 dims), got shape {tuple(latent.shape)}")
        if latent.shape[1] != z:
            raise ValueError(f"decode expects z_dim={z} latent channels in dim 1 of [B, C, F, h, w], got shape "
                             f"{tuple(latent.shape)}")
        if min(latent.shape[2:]) < 1 or latent.shape[0] < 1:
            raise ValueError(f"decode got an empty latent of shape {tuple(latent.shape)}")

    def decode(self, latent: torch.Tensor, tile: VAETiling | tuple | None = None,
               progress: bool = False) -> torch.Tensor:
        """Normalised latent [B, 48, F, h, w] -> frames [B, 3, 1 + 4(F-1), 16h, 16w], fp32, clamped to [-1, 1].

        `conv2` runs on the whole latent, then the decoder streams one latent frame at a time (the first gives
        1 frame, each later one 4). `tile` (a VAETiling, or (tile_h, tile_w[, overlap]) in latent pixels)
        runs the decoder's stem on the full latent, then its up-stages tile by tile, blending the overlaps;
        see VAETiling for the seams. `progress` shows a progress bar over the latent frames decoded.
        """
        from tqdm.auto import tqdm

        if tile is not None:
            return self.blend_tiles(*self.decode_tiles(latent, tile, progress=progress), tile)
        x, out = self._decode_start(latent)
        with tqdm(total=x.shape[2], desc="VAE decode", unit="latent frame", disable=not progress) as bar:
            self._decode_into(x, out, weight=None, on_frame=bar.update)
        return out.clamp_(-1.0, 1.0)

    def _decode_start(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`conv2` of the denormalised latent [B, z, F, h, w] and the zeroed frames [B, 3, 1 + 4(F-1), 16h, 16w]
        the decode writes into."""
        self._check_latent(latent)
        cfg = self.cfg
        mean, std = self._latent_stats()
        z = latent.to(device=self.device, dtype=torch.float32) * std + mean
        x = self.conv2(z.to(self.dtype))                                     # [B, z, F, h, w]
        b, _, f, h, w = x.shape
        s, tc = cfg.spatial_compression, cfg.temporal_compression
        return x, torch.zeros(b, cfg.in_channels, 1 + tc * (f - 1), h * s, w * s, device=self.device)

    def decode_tiles(self, latent: torch.Tensor, tile: VAETiling | tuple, part: tuple[int, int] = (0, 1),
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiled decode before its division: (sum of weighted tile pixels [B, 3, T, H, W], sum of weights
        [H, W]) over the tiles i with i % part[1] == part[0], in raster order. One process takes every tile;
        under parallel generation (anyid_rt/parallel.py) each rank takes its share and the sums are added
        across ranks before `blend_tiles`."""
        from tqdm.auto import tqdm

        index, parts = part
        if not 0 <= index < parts:
            raise ValueError(f"decode_tiles part {part} must be (index, count) with 0 <= index < count")
        x, out = self._decode_start(latent)
        f, h, w = x.shape[2:]
        s = self.cfg.spatial_compression
        tiling = VAETiling.of(tile)
        # Pass 1: the stem over the full latent, one frame at a time ([B, C0, F, h, w], small).
        stem_cache = FeatureCache(self.decoder_slots)
        feats = torch.cat([self.decoder.stem(x[:, :, i:i + 1], stem_cache) for i in range(f)], dim=2)
        del stem_cache, x
        # Pass 2: each of this part's tiles through the up-stages and head, added into `out` with its weight.
        weight_sum = torch.zeros(h * s, w * s, device=self.device)
        ramp = tiling.overlap * s
        th, tw = min(tiling.tile_h, h), min(tiling.tile_w, w)
        starts = [(r0, c0) for r0 in _tile_starts(h, tiling.tile_h, tiling.overlap)
                  for c0 in _tile_starts(w, tiling.tile_w, tiling.overlap)]
        mine = starts[index::parts]
        bar = tqdm(total=f * len(mine), desc="VAE decode (tiled)", unit="latent frame", disable=not progress)
        for r0, c0 in mine:
            wr = _ramp(th * s, ramp, lead=r0 > 0, trail=r0 + th < h)
            wc = _ramp(tw * s, ramp, lead=c0 > 0, trail=c0 + tw < w)
            weight = (wr[:, None] * wc[None, :]).to(self.device)           # [th*s, tw*s]
            rows, cols = slice(r0 * s, (r0 + th) * s), slice(c0 * s, (c0 + tw) * s)
            self._decode_into(feats[..., r0:r0 + th, c0:c0 + tw], out[..., rows, cols], weight, stem_done=True,
                              on_frame=bar.update)
            weight_sum[rows, cols] += weight
        bar.close()
        return out, weight_sum

    @staticmethod
    def blend_tiles(out: torch.Tensor, weight_sum: torch.Tensor, tile: VAETiling | tuple) -> torch.Tensor:
        """Frames from `decode_tiles`' sums over every tile: divided by the weights, clamped to [-1, 1]."""
        if not bool((weight_sum > 0).all()):
            raise RuntimeError(f"tiling {VAETiling.of(tile)} left pixels without weight on a "
                               f"{tuple(weight_sum.shape)} frame")
        out /= weight_sum
        return out.clamp_(-1.0, 1.0)

    def _decode_into(self, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor | None,
                     stem_done: bool = False, on_frame=None) -> None:
        """Stream the latent frames of `x` (or of the stem's output if `stem_done`) through the decoder and
        write the pixels into `out` (add them times `weight` when blending tiles)."""
        p, tc = self.cfg.patch_size, self.cfg.temporal_compression
        run = self.decoder.body if stem_done else self.decoder
        cache = FeatureCache(self.decoder_slots)
        t0 = 0
        for i in range(x.shape[2]):
            y = unpatchify(run(x[:, :, i:i + 1], cache, first_chunk=i == 0), p).float()  # [B, 3, 1|4, H, W]
            n = y.shape[2]
            if n != (1 if i == 0 else tc):
                raise RuntimeError(f"decoder produced {n} frames for latent frame {i}")
            if weight is None:
                out[:, :, t0:t0 + n] = y
            else:
                out[:, :, t0:t0 + n] += y * weight
            t0 += n
            if on_frame is not None:
                on_frame()


__all__ = ["WanVAE", "VAETiling", "FeatureCache", "patchify", "unpatchify", "CACHE_T"]
