"""Flow-matching samplers for Wan2.2-TI2V-5B (facts: shared/reference/wan22-ti2v-5b.md §8.2).

The flow
--------
Forward process: ``x_t = (1 - σ)·x0 + σ·ε`` with σ in [0, 1]. The DiT is fed ``t ≈ σ·1000`` and predicts the
velocity ``v ≈ ε - x0``, so the clean-data estimate at a state is ``x0 = x_t - σ·v``. Every sampler below walks
a decreasing σ grid that ends at σ = 0.

Shift
-----
All schedules use the resolution shift ``σ' = s·σ / (1 + (s - 1)·σ)`` (``shift_sigmas``), which spends more steps
at high noise for s > 1. Wan2.2-TI2V-5B samples with 50 steps and s = 5.

The samplers
------------
``FlowUniPC`` ("unipc", the official default)
    UniPC in its data-prediction (x0) form: order-2 multistep predictor UniP with the B(h) = e^h - 1 ("bh2")
    variant, followed at the next step by the UniC corrector, lower order at the first and last steps. Schedule
    (``official_unipc_sigmas``): σ = linspace(σ_max, 0, steps + 1) without its last entry, then shifted, where
    σ_max = 0.999 rounded to float32 (the top of the 1000-entry training grid, as the official scheduler stores
    it); terminal σ = 0. 50 steps at shift 5 give t = 999, 995, 991, 987, 982, ..., 302, 241, 172, 92.
``FlowEuler`` ("euler", not in the official code)
    First-order Euler on the ODE: ``x_next = x + (σ_next - σ)·v``. It uses the official UniPC schedule above, so it
    feeds the DiT exactly the timesteps the default sampler feeds.
``FlowDMD`` ("dmd", few-step distilled models: anyid_rt/few_step.py)
    Consistency sampling on a listed timestep grid: at step i the clean estimate ``x0 = x - σ_i·v`` is re-noised
    to the next listed level, ``x_{i+1} = (1 - σ_{i+1})·x0 + σ_{i+1}·ε`` with fresh ε from the seeded CPU generator;
    the last step returns x0. Schedule (``dmd_sigmas``): σ_i = shift(t_i / 1000) for the listed t_i; the DiT is
    fed 1000·σ_i (a float; FastVideo's warped FastWan steps at shift 5, Turbo's listed steps at shift 1).
``FlowDPMpp2M`` ("dpm++", the official ``--sample_solver dpm++``)
    DPM-Solver++ 2M (multistep, second order, midpoint form, data prediction), first order at the first and last
    steps. Schedule (``official_dpmpp_sigmas``): σ = linspace(1, 0, steps + 1)[:steps] shifted, so it starts at
    σ = 1 (t = 1000); terminal σ = 0.

What is fed to the DiT
----------------------
``sampler.timesteps`` is int64 ``trunc(σ·1000)`` computed from the float64 σ, exactly as the official code
(truncation, not rounding: 50 steps at shift 5 end at 92 for σ ≈ 0.0925). The solver itself uses the float σ,
stored in float32 as the official schedulers store them (``sampler.sigmas``).

Numerics
--------
The per-step scalar coefficients are computed in float64 (Python floats) from those float32 σ values; the
tensor arithmetic is float32. The official schedulers compute the coefficients in float32, which differs from
this only by float32 rounding of the coefficients: trajectories agree to a few 1e-7 relative for 8 to 200
steps. float64 is the more accurate of the two (the float32 UniC coefficients lose digits to cancellation when
the steps are small).

Usage
-----
    sampler = make_sampler("unipc", steps=50, shift=5.0, device="cuda")
    for i, t in enumerate(sampler.timesteps):
        v = dit(latents, t)                      # velocity, e.g. after CFG
        latents = sampler.step(v, i, latents)

A sampler carries multistep state: build a fresh one for every generation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .request import SAMPLERS  # the names; kept with the request so the CLI reads them without torch

NUM_TRAIN_TIMESTEPS = 1000
# Top of the training σ grid (1 - 1/1000) as the official scheduler holds it: a float32 value, read back as a
# Python float (0.9990000128746033). The float32 rounding changes some truncated timesteps, e.g. 3 steps at
# shift 1 give 999, 666, 333 where an exact 0.999 would give 999, 665, 332.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))

# σ range drawn by sample_training_timesteps: both ends are excluded so that no sample is pure noise or clean.
TRAIN_SIGMA_EPS = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------

def _check_steps_shift(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating)) or not math.isfinite(shift) \
            or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The flow shift σ' = s·σ / (1 + (s - 1)·σ), elementwise, in float64. Maps [0, 1] onto itself."""
    s = np.asarray(sigmas, dtype=np.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def official_unipc_sigmas(steps: int, shift: float) -> np.ndarray:
    """The ``steps`` float64 σ values (no terminal 0) of the official flow UniPC schedule."""
    _check_steps_shift(steps, shift)
    grid = np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1]
    return shift_sigmas(grid, shift)


def official_dpmpp_sigmas(steps: int, shift: float) -> np.ndarray:
    """The ``steps`` float64 σ values (no terminal 0) of the official dpm++ schedule (``get_sampling_sigmas``)."""
    _check_steps_shift(steps, shift)
    grid = np.linspace(1.0, 0.0, steps + 1)[:steps]
    return shift_sigmas(grid, shift)


def dmd_sigmas(timesteps: Sequence[float], shift: float) -> np.ndarray:
    """float64 σ = shift(t / 1000) of a few-step list (strictly decreasing, in (0, 1000]), without the final 0."""
    _check_steps_shift(1, shift)
    t = np.asarray(timesteps, dtype=np.float64)
    if t.ndim != 1 or t.size < 1 or not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(t > NUM_TRAIN_TIMESTEPS) \
            or np.any(np.diff(t) >= 0):
        raise ValueError(f"dmd timesteps must be strictly decreasing values in (0, {NUM_TRAIN_TIMESTEPS}], got "
                         f"{list(timesteps)}")
    return shift_sigmas(t / NUM_TRAIN_TIMESTEPS, shift)


def sigmas_to_timesteps(sigmas: np.ndarray) -> torch.Tensor:
    """int64 ``trunc(σ·1000)``: the timestep values the official code feeds the DiT (σ without the terminal 0)."""
    return torch.from_numpy((np.asarray(sigmas, dtype=np.float64) * NUM_TRAIN_TIMESTEPS).astype(np.int64))


def _lambda(sigma: float) -> float:
    """Half log-SNR of the flow, λ = log((1 - σ) / σ); +inf at σ = 0, -inf at σ = 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------

class FlowSampler:
    """Shared schedule handling, checks and stepping. Subclasses implement ``_update`` (and keep their multistep
    state in ``_reset_state``).

    ``FlowX(steps, shift, device)`` builds the official schedule of that sampler; ``FlowX.from_sigmas(sigmas)``
    runs the same update rule on any σ schedule. ``sigmas``: float32 [steps + 1] ending in 0; ``timesteps``: the
    [steps] values fed to the DiT. Steps must be taken in order 0, 1, ..., steps - 1, each exactly once.
    """

    name = ""
    schedule = staticmethod(official_unipc_sigmas)  # (steps, shift) -> the official σ values without the final 0
    _allow_sigma_one = True  # whether the first σ may be exactly 1 (pure noise)

    def __init__(self, steps: int, shift: float, device: str | torch.device | None = None) -> None:
        sig = self.schedule(steps, shift)
        self._setup(np.append(sig, 0.0), sigmas_to_timesteps(sig), device)

    @classmethod
    def from_sigmas(cls, sigmas: Sequence[float] | np.ndarray | torch.Tensor,
                    timesteps: Sequence[int] | np.ndarray | torch.Tensor | None = None,
                    device: str | torch.device | None = None) -> FlowSampler:
        """A sampler on an explicit σ schedule, e.g. another library's: ``steps + 1`` values, strictly decreasing,
        in (0, 1] (UniPC: (0, 1)), ending in 0. ``timesteps`` (``steps`` values) defaults to int64 trunc(σ·1000)."""
        obj = cls.__new__(cls)
        obj._setup(sigmas, timesteps, device)
        return obj

    def _setup(self, sigmas: Sequence[float] | np.ndarray | torch.Tensor,
               timesteps: Sequence[int] | np.ndarray | torch.Tensor | None,
               device: str | torch.device | None) -> None:
        if isinstance(sigmas, torch.Tensor):
            sigmas = sigmas.detach().cpu().double().numpy()
        s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if s.size < 2:
            raise ValueError(f"sigmas needs at least 2 values (one step and the terminal 0), got {s.size}")
        if not np.all(np.isfinite(s)):
            raise ValueError("sigmas must be finite")
        if s[-1] != 0.0:
            raise ValueError(f"the last sigma must be 0 (the clean end of the flow), got {s[-1]}")
        if not np.all(np.diff(s) < 0):
            raise ValueError("sigmas must be strictly decreasing")
        top_ok = s[0] <= 1.0 if self._allow_sigma_one else s[0] < 1.0
        if not top_ok:
            bound = "<= 1" if self._allow_sigma_one else "< 1 (UniPC needs a finite log-SNR at every σ)"
            raise ValueError(f"the first sigma must be {bound}, got {s[0]}")
        steps = s.size - 1
        if timesteps is None:
            ts = sigmas_to_timesteps(s[:-1])
        else:
            ts = torch.as_tensor(timesteps).reshape(-1)
            if ts.numel() != steps:
                raise ValueError(f"timesteps must have {steps} entries (one per step), got {ts.numel()}")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        sig32 = torch.from_numpy(s.astype(np.float32))
        self.num_steps: int = steps
        self.sigmas: torch.Tensor = sig32.to(dev)
        self.timesteps: torch.Tensor = ts.to(dev)
        # The float32 σ values as Python floats: the solver works with these (no device sync per step).
        self._sig: list[float] = [float(v) for v in sig32.tolist()]
        self._reset_state()

    def _reset_state(self) -> None:
        self._next_index = 0

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.num_steps}, sigma_max={self._sig[0]:.6f})"

    def x0_prediction(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - σ·v at step ``step_index`` (fp32), e.g. for previews. Does not advance the sampler."""
        return sample.float() - self._sig[step_index] * velocity.float()

    def step(self, velocity: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` from σ[step_index] to σ[step_index + 1] given the model's velocity at ``sample``.

        Math is float32; the result has the sample's shape and dtype (keep latents in fp32).
        """
        if self._next_index >= self.num_steps:
            raise ValueError(f"all {self.num_steps} steps were already taken; build a new sampler per generation")
        if step_index != self._next_index:
            raise ValueError(f"steps must be taken in order: expected step_index {self._next_index}, got {step_index}")
        if velocity.shape != sample.shape:
            raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
        if not (sample.is_floating_point() and velocity.is_floating_point()):
            raise ValueError("sample and velocity must be floating-point tensors")
        out = self._update(velocity.float(), step_index, sample.float())
        self._next_index += 1
        return out.to(sample.dtype)

    def _update(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FlowEuler(FlowSampler):
    """Plain Euler: x_{i+1} = x_i + (σ_{i+1} - σ_i)·v_i, on the official UniPC σ schedule (see module doc)."""

    name = "euler"
    schedule = staticmethod(official_unipc_sigmas)

    def _update(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return x + (self._sig[i + 1] - self._sig[i]) * v


class FlowDMD(FlowSampler):
    """Few-step consistency sampling (DMD-distilled models): x0 = x - σ_i·v, then re-noise to σ_{i+1} with fresh
    noise, ``x_{i+1} = (1 - σ_{i+1})·x0 + σ_{i+1}·ε``; into σ = 0 (the last step) the result is x0.

    ``FlowDMD.from_timesteps(timesteps, shift, generator)``: σ_i = shift(t_i / 1000), the DiT fed 1000·σ_i (float64).
    ε is drawn on the CPU from ``generator`` in the sample's shape (so that a seed gives the same video on every
    device) and moved to the sample's device.
    """

    name = "dmd"

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError("FlowDMD has no default schedule: use FlowDMD.from_timesteps(timesteps, shift, generator)")

    @classmethod
    def from_timesteps(cls, timesteps: Sequence[float], shift: float, generator: torch.Generator,
                       device: str | torch.device | None = None) -> "FlowDMD":
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise ValueError("FlowDMD needs a CPU torch.Generator for its re-noising")
        sig = dmd_sigmas(timesteps, shift)
        obj = cls.from_sigmas(np.append(sig, 0.0), torch.from_numpy(sig * NUM_TRAIN_TIMESTEPS), device)
        obj.generator = generator
        return obj

    def _update(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x0 = x - self._sig[i] * v
        s_next = self._sig[i + 1]
        if s_next == 0.0:
            return x0
        noise = torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device)
        return (1.0 - s_next) * x0 + s_next * noise


class FlowDPMpp2M(FlowSampler):
    """DPM-Solver++ 2M (data prediction, midpoint form), as the official ``dpm++`` solver.

    With λ = log((1-σ)/σ), h = λ_{i+1} - λ_i, m_i = x0 prediction at step i:
        x_{i+1} = (σ_{i+1}/σ_i)·x_i - (1-σ_{i+1})·(e^{-h} - 1)·(m_i + D/2),
        D = (m_i - m_{i-1})·h / (λ_i - λ_{i-1}),
    with D = 0 at the first step and at the last step (into σ = 0, where the update returns m_i). When the previous
    σ is 1 (λ = -inf, the official schedule's first point) the ratio is 0, so D = 0 as well.
    """

    name = "dpm++"
    schedule = staticmethod(official_dpmpp_sigmas)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._prev_x0: torch.Tensor | None = None

    def _update(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        s_cur, s_next = self._sig[i], self._sig[i + 1]
        x0 = x - s_cur * v
        if s_next == 0.0:
            out = x0  # the update's limit at σ_next = 0 (λ = +inf, e^{-h} = 0): first order, returns m_i
        else:
            lam_cur, lam_next = _lambda(s_cur), _lambda(s_next)
            # coef = (1-σ_next)·(e^{-h} - 1); at σ_cur = 1, λ_cur = -inf and e^{-h} = 0.
            coef = (1.0 - s_next) * math.expm1(lam_cur - lam_next)
            out = (s_next / s_cur) * x - coef * x0
            if self._prev_x0 is not None:
                lam_prev = _lambda(self._sig[i - 1])
                if math.isfinite(lam_prev):  # λ_prev = -inf (σ_prev = 1) makes the correction term 0
                    d = ((lam_next - lam_cur) / (lam_cur - lam_prev)) * (x0 - self._prev_x0)  # h / h_0 · Δm
                    out = out - (0.5 * coef) * d
        self._prev_x0 = x0
        return out


class FlowUniPC(FlowSampler):
    """UniPC (bh2, order 2, data prediction, lower order at the ends), as the official flow UniPC scheduler.

    Notation: λ = log((1-σ)/σ); m_i = x_i - σ_i·v_i; for a step from σ_a to σ_b, h = λ_b - λ_a and
    φ = e^{-h} - 1 (= B(h) for bh2), and the first-order part is  x̂ = (σ_b/σ_a)·x_a - (1-σ_b)·φ·m_a.

    Step i (model output v_i at x_i):
      1. Corrector UniC (i > 0), with the order p used by the previous predictor, a = i-1, b = i:
         x_i ← x̂ - (1-σ_i)·φ·(ρ_1·D_1 + ρ_c·(m_i - m_{i-1})), where for p = 1: ρ_c = 1/2 and no D_1 term;
         for p = 2: r = (λ_{i-2} - λ_{i-1})/h, D_1 = (m_{i-2} - m_{i-1})/r, and (ρ_1, ρ_c) solve
         [[1, 1], [r, 1]]·ρ = g with g_1 = (φ/(-h) - 1)/φ, g_2 = 2·((φ/(-h) - 1)/(-h) - 1/2)/φ.
         x_a = x_{i-1} is step i-1's sample after its own correction; the corrected x_i is kept for step i+1.
      2. Predictor UniP, a = i, b = i+1, order p = 1 at the first and last steps, else 2:
         x_{i+1} = x̂ - (1-σ_{i+1})·φ·(1/2)·D_1, with r = (λ_{i-1} - λ_i)/h and D_1 = (m_{i-1} - m_i)/r
         (the D_1 term only for p = 2).
         Into σ = 0 (last step) this is x_{i+1} = m_i.
    """

    name = "unipc"
    schedule = staticmethod(official_unipc_sigmas)
    _allow_sigma_one = False

    def _reset_state(self) -> None:
        super()._reset_state()
        self._x0_hist: list[torch.Tensor] = []  # last two x0 predictions, oldest first
        self._prev_sample: torch.Tensor | None = None  # the previous step's sample, after its correction
        self._prev_order = 0

    def _predictor_order(self, i: int) -> int:
        return 1 if i == 0 or i == self.num_steps - 1 else 2

    def _corrector(self, i: int, x0_i: torch.Tensor) -> torch.Tensor:
        s_prev, s_cur = self._sig[i - 1], self._sig[i]
        lam_prev, lam_cur = _lambda(s_prev), _lambda(s_cur)
        h = lam_cur - lam_prev
        phi = math.expm1(-h)
        m_prev = self._x0_hist[-1]
        base = (s_cur / s_prev) * self._prev_sample - ((1.0 - s_cur) * phi) * m_prev
        d_t = x0_i - m_prev
        if self._prev_order == 1:
            corr = 0.5 * d_t
        else:
            r = (_lambda(self._sig[i - 2]) - lam_prev) / h
            g1 = (phi / (-h) - 1.0) / phi
            g2 = 2.0 * ((phi / (-h) - 1.0) / (-h) - 0.5) / phi
            # [[1, 1], [r, 1]] @ (rho_1, rho_c) = (g1, g2)
            rho_1 = (g1 - g2) / (1.0 - r)
            rho_c = g1 - rho_1
            d_1 = (self._x0_hist[-2] - m_prev) / r
            corr = rho_1 * d_1 + rho_c * d_t
        return base - ((1.0 - s_cur) * phi) * corr

    def _predictor(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        s_cur, s_next = self._sig[i], self._sig[i + 1]
        m_cur = self._x0_hist[-1]
        if s_next == 0.0:
            return m_cur.clone()  # (σ_b/σ_a)·x = 0 and φ = -1 at λ_b = +inf (the last step is first order)
        lam_cur, lam_next = _lambda(s_cur), _lambda(s_next)
        h = lam_next - lam_cur
        phi = math.expm1(-h)
        out = (s_next / s_cur) * x - ((1.0 - s_next) * phi) * m_cur
        if order == 2:
            r = (_lambda(self._sig[i - 1]) - lam_cur) / h
            d_1 = (self._x0_hist[-2] - m_cur) / r
            out = out - ((1.0 - s_next) * phi * 0.5) * d_1
        return out

    def _update(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x0 = x - self._sig[i] * v
        if i > 0:
            x = self._corrector(i, x0)
        self._x0_hist = (self._x0_hist + [x0])[-2:]
        order = self._predictor_order(i)
        self._prev_sample = x if i > 0 else x.clone()  # at i = 0, x may be the caller's tensor: do not alias it
        self._prev_order = order
        return self._predictor(i, x, order)


# ---------------------------------------------------------------------------------------------------------------
# Factory and training-time σ
# ---------------------------------------------------------------------------------------------------------------

def make_sampler(name: str = "unipc", steps: int = 50, shift: float = 5.0,
                 device: str | torch.device | None = None, timesteps: Sequence[float] | None = None,
                 generator: torch.Generator | None = None) -> FlowSampler:
    """A fresh sampler: ``name`` in SAMPLERS ("unipc" is the official default), ``steps`` >= 1, ``shift`` > 0.
    "dmd" takes its ``timesteps`` list (``steps`` entries) and the CPU ``generator`` of its re-noising."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    _check_steps_shift(steps, shift)
    if name == "dmd":
        if timesteps is None or len(timesteps) != steps or generator is None:
            raise ValueError(f"sampler dmd needs {steps} timesteps and a CPU generator, got timesteps={timesteps}")
        return FlowDMD.from_timesteps(timesteps, shift, generator, device)
    if timesteps is not None:
        raise ValueError(f"timesteps= applies only to sampler dmd, not {name!r}")
    cls = {"unipc": FlowUniPC, "euler": FlowEuler, "dpm++": FlowDPMpp2M}[name]
    return cls(int(steps), float(shift), device=device)


def sample_training_timesteps(batch: int, shift: float, generator: torch.Generator | None = None,
                              device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training noise levels for flow matching.

    Draws u ~ U[0, 1) (float64, from ``generator``, on the generator's device when one is given), maps it through
    the same shift as inference, σ = s·u / (1 + (s-1)·u), and clamps σ to [TRAIN_SIGMA_EPS, 1 - TRAIN_SIGMA_EPS]
    so that σ lies strictly inside (0, 1). Returns ``(sigma, t)``, both float32 [batch] on ``device``, with
    t = σ·1000 (a float, not truncated: it matches the σ used to build x_t = (1-σ)·x0 + σ·ε exactly).
    The training target is v = ε - x0. shift = 1 gives uniform σ; larger shifts favour high noise.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    _check_steps_shift(1, shift)
    draw_device = generator.device if generator is not None else (device or "cpu")
    u = torch.rand(int(batch), generator=generator, dtype=torch.float64, device=draw_device)
    sigma = (shift * u / (1.0 + (shift - 1.0) * u)).clamp(TRAIN_SIGMA_EPS, 1.0 - TRAIN_SIGMA_EPS)
    out_device = torch.device(device) if device is not None else u.device
    sigma = sigma.to(device=out_device, dtype=torch.float32)
    return sigma, sigma * NUM_TRAIN_TIMESTEPS
