"""Tests for anyid_rt.sampling (CPU, a few seconds).

Oracles:
- The official schedules, re-derived here with numpy from the formulas in shared/reference/wan22-ti2v-5b.md §8.2 and
  the official 50-step / shift-5 timestep list.
- diffusers' schedulers (test-only dependency) for the update rules, over full trajectories driven by a fixed,
  state-dependent random velocity field. diffusers' UniPC and DPM-Solver++ flow updates are the same algorithm as
  the official Wan schedulers (which were derived from them); their default *schedules* differ from the official
  ones, and the tests below pin down exactly how.
- An analytic flow (Gaussian data, exact velocity known in closed form) for flow consistency and order of accuracy.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anyid_rt.sampling import (
    SAMPLERS,
    FlowDPMpp2M,
    FlowEuler,
    FlowUniPC,
    make_sampler,
    sample_training_timesteps,
)

# the ODE solvers built from (steps, shift); "dmd" runs a listed few-step grid (tests/test_few_step.py)
ODE_SAMPLERS = tuple(s for s in SAMPLERS if s != "dmd")
OFFICIAL_50_SHIFT5_FIRST5 = [999, 995, 991, 987, 982]
OFFICIAL_50_SHIFT5_LAST3 = [241, 172, 92]
TRAJ_RTOL = 1e-5  # relative L2 error over a whole trajectory against diffusers


# --------------------------------------------------------------------------------------------------------------
# Independent re-derivation of the official schedules (numpy, float64)
# --------------------------------------------------------------------------------------------------------------

def _shift(sig: np.ndarray, s: float) -> np.ndarray:
    return s * sig / (1.0 + (s - 1.0) * sig)


def _ref_unipc_sigmas(steps: int, s: float) -> np.ndarray:
    # Training grid: 1 - linspace(1, 1/1000, 1000) reversed, stored in float32 -> sigma_max = float32(0.999).
    train = (1.0 - np.linspace(1.0, 1.0 / 1000, 1000)[::-1]).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    assert sigma_min == 0.0
    return _shift(np.linspace(sigma_max, sigma_min, steps + 1)[:-1], s)


def _ref_dpmpp_sigmas(steps: int, s: float) -> np.ndarray:
    return _shift(np.linspace(1.0, 0.0, steps + 1)[:steps], s)


def _ref_timesteps(sig: np.ndarray) -> list[int]:
    return [int(math.floor(v * 1000.0)) for v in sig]  # int64 cast of positive floats truncates


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------

def test_official_unipc_timesteps_50_steps_shift5():
    s = make_sampler("unipc", 50, 5.0)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.shape == (50,)
    assert s.timesteps[:5].tolist() == OFFICIAL_50_SHIFT5_FIRST5
    assert s.timesteps[-3:].tolist() == OFFICIAL_50_SHIFT5_LAST3
    assert s.sigmas.shape == (51,)
    assert s.sigmas[-1].item() == 0.0
    assert abs(s.sigmas[-2].item() - 0.0925) < 5e-4
    assert make_sampler("unipc", 50, 5.0).timesteps.tolist() == make_sampler(steps=50, shift=5.0).timesteps.tolist()


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (40, 5.0), (30, 3.0), (10, 1.0), (3, 1.0), (1, 5.0), (97, 7.5)])
def test_unipc_and_euler_schedule_match_rederived_formula(steps, shift):
    ref = _ref_unipc_sigmas(steps, shift)
    for name in ("unipc", "euler"):
        s = make_sampler(name, steps, shift)
        assert s.timesteps.tolist() == _ref_timesteps(ref)
        np.testing.assert_array_equal(s.sigmas.numpy(), np.append(ref, 0.0).astype(np.float32))


def test_unipc_sigma_max_is_float32_rounded():
    """The official σ_max is float32(0.999) = 0.99900001..., which shows in truncated timesteps: 3 steps at shift 1
    give 999, 666, 333 (an exact 0.999 would give 999, 665, 332)."""
    assert make_sampler("unipc", 3, 1.0).timesteps.tolist() == [999, 666, 333]
    exact = np.linspace(0.999, 0.0, 4)[:-1]
    assert _ref_timesteps(exact) == [999, 665, 332]


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (20, 3.0), (7, 1.0), (1, 5.0)])
def test_dpmpp_schedule_matches_rederived_formula(steps, shift):
    ref = _ref_dpmpp_sigmas(steps, shift)
    s = make_sampler("dpm++", steps, shift)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == _ref_timesteps(ref)
    np.testing.assert_array_equal(s.sigmas.numpy(), np.append(ref, 0.0).astype(np.float32))
    assert s.sigmas[0].item() == 1.0 and s.timesteps[0].item() == 1000


def test_dpmpp_50_steps_shift5_values():
    t = make_sampler("dpm++", 50, 5.0).timesteps.tolist()
    assert t[:5] == [1000, 995, 991, 987, 982]
    assert t[-3:] == OFFICIAL_50_SHIFT5_LAST3
    assert len(t) == 50


def test_device_argument_places_schedule():
    s = make_sampler("unipc", 4, 5.0, device="cpu")
    assert s.timesteps.device.type == "cpu" and s.sigmas.device.type == "cpu"


# --------------------------------------------------------------------------------------------------------------
# Trajectories against diffusers
# --------------------------------------------------------------------------------------------------------------

class LinearField:
    """A fixed, state-dependent velocity field v(x, σ) = A·x + b + σ·c (A, b, c random, seeded)."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n = int(np.prod(shape[1:]))
        self.A = torch.randn(n, n, generator=g) * (0.5 / math.sqrt(n))
        self.b = torch.randn(n, generator=g)
        self.c = torch.randn(n, generator=g)
        self.x_init = torch.randn(shape, generator=g)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        f = x.reshape(x.shape[0], -1)
        return (f @ self.A.T + self.b + sigma * self.c).reshape(x.shape)


SHAPE = (2, 4, 3, 5, 6)  # [B, C, F, h, w]


def _run_ours(sampler, field: LinearField) -> torch.Tensor:
    x = field.x_init.clone()
    for i in range(sampler.num_steps):
        x = sampler.step(field(x, sampler.sigmas[i].item()), i, x)
    return x


def _run_diffusers(sched, field: LinearField) -> torch.Tensor:
    sched.set_begin_index(0)
    x = field.x_init.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(field(x, sched.sigmas[i].item()), t, x, return_dict=False)[0]
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _diffusers_unipc(flow_shift: float):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero")


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (20, 3.0), (8, 5.0), (2, 5.0), (1, 5.0)])
def test_unipc_matches_diffusers_on_official_schedule(steps, shift):
    """diffusers' UniPC is given the official σ grid (flow_shift=1 leaves custom sigmas unshifted), so the whole
    official sampler (schedule + predictor + corrector + lower-order ends) is compared."""
    ours = make_sampler("unipc", steps, shift)
    ref = _diffusers_unipc(flow_shift=1.0)
    ref.set_timesteps(sigmas=_ref_unipc_sigmas(steps, shift))
    assert torch.equal(ref.sigmas, ours.sigmas)
    assert torch.equal(ref.timesteps, ours.timesteps)
    field = LinearField(SHAPE, seed=steps)
    assert _rel(_run_ours(ours, field), _run_diffusers(ref, field)) < TRAJ_RTOL


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (25, 3.0)])
def test_unipc_update_rule_matches_diffusers_on_its_own_schedule(steps, shift):
    ref = _diffusers_unipc(flow_shift=shift)
    ref.set_timesteps(steps)
    ours = FlowUniPC.from_sigmas(ref.sigmas, timesteps=ref.timesteps)
    field = LinearField(SHAPE, seed=1)
    assert _rel(_run_ours(ours, field), _run_diffusers(ref, field)) < TRAJ_RTOL


def test_unipc_trajectory_comparison_is_sensitive():
    """The comparison can fail: dropping the corrector, using Euler, or scaling σ by 1 - 1e-3 breaks the 1e-5 match."""
    ref = _diffusers_unipc(flow_shift=1.0)
    ref.set_timesteps(sigmas=_ref_unipc_sigmas(20, 5.0))
    field = LinearField(SHAPE, seed=3)
    target = _run_diffusers(ref, field)

    class PredictorOnly(FlowUniPC):  # UniP without the UniC corrector
        def _update(self, v, i, x):
            self._x0_hist = (self._x0_hist + [x - self._sig[i] * v])[-2:]
            return self._predictor(i, x, self._predictor_order(i))

    bad = _run_ours(PredictorOnly(20, 5.0), field)
    assert _rel(bad, target) > 10 * TRAJ_RTOL
    euler = _run_ours(FlowEuler(20, 5.0), field)
    assert _rel(euler, target) > 10 * TRAJ_RTOL
    nudged = FlowUniPC.from_sigmas(np.append(_ref_unipc_sigmas(20, 5.0) * (1 - 1e-3), 0.0))
    assert _rel(_run_ours(nudged, field), target) > 10 * TRAJ_RTOL


def test_diffusers_unipc_default_schedule_differs_from_official():
    """Intended difference: diffusers' flow UniPC builds σ from linspace(1, 1/1000, ·) and nudges σ=1 down by 1e-6;
    the official one uses linspace(float32(0.999), 0, ·). At 50 steps / shift 5 the last timesteps are 244, 175, 96
    (diffusers) against 241, 172, 92 (official, ours)."""
    ref = _diffusers_unipc(flow_shift=5.0)
    ref.set_timesteps(50)
    ours = make_sampler("unipc", 50, 5.0)
    assert ref.timesteps[-3:].tolist() == [244, 175, 96]
    assert ours.timesteps[-3:].tolist() == OFFICIAL_50_SHIFT5_LAST3
    assert abs(ref.sigmas[0].item() - (1.0 - 1e-6)) < 1e-7
    assert abs(ours.sigmas[0].item() - 5 * 0.999 / (1 + 4 * 0.999)) < 1e-7
    assert not torch.equal(ref.sigmas, ours.sigmas)


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (13, 3.0), (1, 5.0)])
def test_euler_matches_diffusers_flow_match_euler(steps, shift):
    """FlowMatchEulerDiscreteScheduler (shift=1, so custom sigmas pass unshifted) on the official UniPC σ grid.
    Intended difference: diffusers feeds float timesteps σ·1000, ours are the official int64 trunc(σ·1000)."""
    diffusers = pytest.importorskip("diffusers")
    ours = make_sampler("euler", steps, shift)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(sigmas=_ref_unipc_sigmas(steps, shift))
    assert torch.equal(ref.sigmas, ours.sigmas)
    assert ref.timesteps.dtype == torch.float32 and ours.timesteps.dtype == torch.int64
    assert torch.equal(ref.timesteps.floor().long(), ours.timesteps)
    field = LinearField(SHAPE, seed=7)
    assert _rel(_run_ours(ours, field), _run_diffusers(ref, field)) < TRAJ_RTOL


def test_diffusers_euler_with_shift_gives_the_official_grid_up_to_float32():
    """The same grid can come from diffusers' own shift (applied in float32 to the unshifted grid)."""
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    ref.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, 51)[:-1].tolist())
    torch.testing.assert_close(ref.sigmas, make_sampler("euler", 50, 5.0).sigmas, rtol=0, atol=1e-6)


def _diffusers_dpm(flow_shift: float):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, lower_order_final=True,
        final_sigmas_type="zero")


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (20, 3.0), (10, 5.0), (2, 5.0)])
def test_dpmpp_update_rule_matches_diffusers_on_its_own_schedule(steps, shift):
    ref = _diffusers_dpm(shift)
    ref.set_timesteps(steps)
    ours = FlowDPMpp2M.from_sigmas(ref.sigmas, timesteps=ref.timesteps)
    field = LinearField(SHAPE, seed=11)
    assert _rel(_run_ours(ours, field), _run_diffusers(ref, field)) < TRAJ_RTOL


@pytest.mark.parametrize("steps,shift", [(50, 5.0), (20, 3.0), (10, 5.0)])
def test_dpmpp_matches_diffusers_on_official_schedule(steps, shift):
    """The official dpm++ schedule starts at σ = 1 (t = 1000). diffusers' DPMSolverMultistepScheduler (0.42) takes no
    custom sigmas and its flow schedule is shift(linspace(0.999, 0, ·)), so its `sigmas`/`timesteps` are overwritten
    with the official ones after set_timesteps. This checks the σ = 1 start (λ = -inf: the first step is
    x_1 = σ_1·x + (1-σ_1)·x0 and the second step's correction term vanishes)."""
    ours = make_sampler("dpm++", steps, shift)
    ref = _diffusers_dpm(1.0)
    ref.set_timesteps(steps)
    ref.sigmas = torch.from_numpy(np.append(_ref_dpmpp_sigmas(steps, shift), 0.0).astype(np.float32))
    ref.timesteps = torch.tensor(_ref_timesteps(_ref_dpmpp_sigmas(steps, shift)), dtype=torch.int64)
    assert torch.equal(ref.sigmas, ours.sigmas) and torch.equal(ref.timesteps, ours.timesteps)
    field = LinearField(SHAPE, seed=13)
    assert _rel(_run_ours(ours, field), _run_diffusers(ref, field)) < TRAJ_RTOL


def test_diffusers_dpm_default_schedule_differs_from_official():
    """Intended difference: diffusers' flow DPM++ grid is shift(linspace(0.999, 0, ·)) (t starts at 999), the official
    dpm++ grid is shift(linspace(1, 0, ·)) (t starts at 1000)."""
    ref = _diffusers_dpm(5.0)
    ref.set_timesteps(50)
    expected = _shift(np.linspace(0.999, 0.0, 51)[:-1], 5.0)
    np.testing.assert_allclose(ref.sigmas[:-1].numpy(), expected, rtol=0, atol=1e-7)
    assert ref.timesteps[0].item() == 999
    assert make_sampler("dpm++", 50, 5.0).timesteps[0].item() == 1000


# --------------------------------------------------------------------------------------------------------------
# Analytic flows (no external oracle)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_single_data_point_is_followed_exactly(name):
    """Data = one point c: the exact velocity is v = (x - c)/σ and the path is x_σ = (1-σ)c + σε. Every sampler
    must land on that path at every σ of its grid and end exactly at c; the x0 prediction is c at every step."""
    g = torch.Generator().manual_seed(5)
    c, eps = torch.randn(3, 48, 2, 4, 4, generator=g), torch.randn(3, 48, 2, 4, 4, generator=g)
    s = make_sampler(name, 12, 5.0)
    sig = s.sigmas.tolist()
    x = (1 - sig[0]) * c + sig[0] * eps
    for i in range(12):
        v = (x - c) / sig[i]
        torch.testing.assert_close(s.x0_prediction(v, i, x), c, rtol=0, atol=2e-5)
        x = s.step(v, i, x)
        torch.testing.assert_close(x, (1 - sig[i + 1]) * c + sig[i + 1] * eps, rtol=0, atol=2e-5)
    torch.testing.assert_close(x, c, rtol=0, atol=2e-5)


def _gaussian_flow_error(cls, n: int) -> float:
    """1-D data N(μ, s²): the flow maps z to m(σ) + sd(σ)·z; integrate σ from 0.95 to 0.2 on a uniform grid."""
    mu, s = 0.7, 0.3

    def m(sig): return (1 - sig) * mu
    def sd(sig): return math.sqrt((1 - sig) ** 2 * s * s + sig * sig)
    def vel(x, sig): return -mu + (sig - (1 - sig) * s * s) / sd(sig) ** 2 * (x - m(sig))

    sampler = cls.from_sigmas(np.append(np.linspace(0.95, 0.2, n + 1), 0.0))
    z = torch.linspace(-3, 3, 101, dtype=torch.float64)
    sig = sampler.sigmas.tolist()
    x = (m(sig[0]) + sd(sig[0]) * z).float()
    for i in range(n):
        x = sampler.step(vel(x, sig[i]), i, x)
    return (x.double() - (m(sig[n]) + sd(sig[n]) * z)).abs().max().item()


def test_order_of_accuracy_on_gaussian_flow():
    e = {cls: [_gaussian_flow_error(cls, n) for n in (10, 20, 40)] for cls in (FlowEuler, FlowDPMpp2M, FlowUniPC)}
    eu, dp, un = e[FlowEuler], e[FlowDPMpp2M], e[FlowUniPC]
    assert 1.8 < eu[0] / eu[1] < 2.2 and 1.8 < eu[1] / eu[2] < 2.2  # first order
    assert 3.5 < dp[0] / dp[1] < 6.5 and 3.5 < dp[1] / dp[2] < 6.5  # second order
    assert un[0] / un[1] > 6.0  # UniP-2 + UniC: third order until the first-order warm-up step dominates
    assert un[1] < 0.25 * dp[1] < 0.25 * eu[1]


# --------------------------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ODE_SAMPLERS)
@pytest.mark.parametrize("shape", [(7,), (2, 48, 3, 4, 6)])
def test_step_shapes_and_dtypes(name, shape):
    g = torch.Generator().manual_seed(0)
    s = make_sampler(name, 4, 5.0)
    x = torch.randn(shape, generator=g)
    for i in range(4):
        x = s.step(torch.randn(shape, generator=g), i, x)
        assert x.shape == shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    s = make_sampler(name, 2, 5.0)
    xb = torch.randn(shape, generator=g).bfloat16()
    out = s.step(torch.randn(shape, generator=g).bfloat16(), 0, xb)
    assert out.dtype == torch.bfloat16 and out.shape == shape


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_step_order_and_reuse_are_checked(name):
    s = make_sampler(name, 3, 5.0)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="in order"):
        s.step(x, 1, x)
    for i in range(3):
        x = s.step(torch.randn(2, 3), i, x)
    with pytest.raises(ValueError, match="new sampler"):
        s.step(x, 3, x)
    with pytest.raises(ValueError, match="shape"):
        make_sampler(name, 3, 5.0).step(torch.randn(2, 4), 0, x)


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_caller_may_modify_tensors_in_place(name):
    """The engine re-pins the first latent frame in place after each step; the sampler's history must not alias
    the tensors it was given or returned."""
    field = LinearField((1, 2, 3, 4), seed=4)
    clean = _run_ours(make_sampler(name, 6, 5.0), field)
    s = make_sampler(name, 6, 5.0)
    x = field.x_init.clone()
    for i in range(6):
        v = field(x, s.sigmas[i].item())
        new = s.step(v, i, x)
        x.fill_(float("nan"))
        v.fill_(float("nan"))
        x = new.clone()
        new.fill_(float("nan"))
    torch.testing.assert_close(x, clean, rtol=0, atol=0)


def test_fresh_samplers_are_independent():
    field = LinearField((1, 2, 3), seed=2)
    a, b = make_sampler("unipc", 10, 5.0), make_sampler("unipc", 10, 5.0)
    torch.testing.assert_close(_run_ours(a, field), _run_ours(b, field), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="ddim"), "unipc, euler, dpm\\+\\+"),
    (dict(name="UniPC"), "choose one of"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(steps=-3), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(steps=True), "steps"),
    (dict(shift=0.0), "shift must be a finite number > 0"),
    (dict(shift=-1.0), "shift"),
    (dict(shift=float("nan")), "shift"),
    (dict(shift=float("inf")), "shift"),
])
def test_make_sampler_rejects_bad_arguments(kwargs, match):
    args = dict(name="unipc", steps=10, shift=5.0) | kwargs
    with pytest.raises(ValueError, match=match):
        make_sampler(**args)


def test_from_sigmas_rejects_bad_schedules():
    with pytest.raises(ValueError, match="last sigma must be 0"):
        FlowEuler.from_sigmas([0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        FlowEuler.from_sigmas([0.9, 0.95, 0.0])
    with pytest.raises(ValueError, match="first sigma"):
        FlowDPMpp2M.from_sigmas([1.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="first sigma must be < 1"):
        FlowUniPC.from_sigmas([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="at least 2"):
        FlowUniPC.from_sigmas([0.0])
    with pytest.raises(ValueError, match="timesteps must have 2"):
        FlowUniPC.from_sigmas([0.9, 0.5, 0.0], timesteps=[900])
    assert FlowDPMpp2M.from_sigmas([1.0, 0.5, 0.0]).timesteps.tolist() == [1000, 500]


# --------------------------------------------------------------------------------------------------------------
# Training timesteps
# --------------------------------------------------------------------------------------------------------------

def test_training_timesteps_range_dtype_and_reproducibility():
    sig, t = sample_training_timesteps(1000, 3.0, torch.Generator().manual_seed(0), "cpu")
    sig2, _ = sample_training_timesteps(1000, 3.0, torch.Generator().manual_seed(0), "cpu")
    assert sig.shape == t.shape == (1000,) and sig.dtype == t.dtype == torch.float32
    assert torch.equal(sig, sig2)
    assert (sig > 0).all() and (sig < 1).all()
    torch.testing.assert_close(t, sig * 1000)


@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_training_timesteps_follow_the_shifted_distribution(shift):
    """σ = shift(u), u ~ U[0,1): P(σ <= y) = y / (s - (s-1)·y). Kolmogorov–Smirnov distance on 200k draws."""
    sig, _ = sample_training_timesteps(200_000, shift, torch.Generator().manual_seed(1))
    y = np.sort(sig.double().numpy())
    cdf = y / (shift - (shift - 1) * y)
    emp = np.arange(1, y.size + 1) / y.size
    assert np.abs(emp - cdf).max() < 0.006
    if shift > 1:
        assert np.median(y) > 0.5  # a larger shift favours high noise


def test_training_timesteps_reject_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        sample_training_timesteps(0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        sample_training_timesteps(4, 0.0)
