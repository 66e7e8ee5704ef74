"""backend="auto": each op's implementation chosen by measurement (kernels/select.py).

On a CPU `auto` is torch, so the selection logic is driven here with injected candidates, timings and setup
fingerprints: the fastest correct candidate wins, a wrong one never does, choices go to the JSON file and
come back from it without timing, the key follows the setup, an unreadable file is timed again and
rewritten. The real candidates' correctness check runs under the Triton interpreter.
"""
import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from anyid_rt.config import DiTConfig  # noqa: E402
from anyid_rt.kernels import DiTOps, SegmentMap, dit_ops, resolve_backend, select  # noqa: E402
from anyid_rt.kernels import attention as attention_mod  # noqa: E402
from anyid_rt.kernels import modulation, norm  # noqa: E402
from anyid_rt.models.random_weights import random_dit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SETUP = "Fake GPU 80GB | driver 1.0 | torch 0.0 | triton 0.0"


class Bench:
    """Candidates that record their calls, and a timer that answers with fixed times per candidate."""

    def __init__(self, ms: dict[str, float]):
        self.ms = ms
        self.calls: list[str] = []
        self.timed: list[str] = []

    def wrap(self, name, fn):
        def impl(*args):
            self.calls.append(name)
            return fn(*args)
        return impl

    def timer(self, fn, device):
        assert device == torch.device("cpu")
        self.calls.clear()
        fn()
        self.timed.append(self.calls[-1])
        return self.ms[self.calls[-1]]


def _no_timing(_fn, _device):
    raise AssertionError("timed although the choice was known")


def _rms_args(L=7, N=48, dtype=torch.float16):
    return torch.randn(2, L, N).to(dtype), 1 + 0.1 * torch.randn(N), 1e-6


def _fake_rms_candidates(bench: Bench) -> dict:
    ref = norm.rms_norm_ref

    def raises(*_args):
        raise RuntimeError("no kernel for this shape")

    impls = {
        "exact": ref,
        "slow": ref,
        "wrong": lambda x, w, eps: (ref(x, w, eps).float() * 1.01).to(x.dtype),  # 1 %: far over bf16/fp16 noise
        "nan": lambda x, *_: torch.full_like(x, float("nan")),
        "raises": raises,
    }
    return {name: bench.wrap(name, fn) for name, fn in impls.items()}


def _selector(path=None, bench=None, setup=SETUP, log=None):
    return select.Selector(path, timer=bench.timer if bench else _no_timing, fingerprint=lambda _device: setup,
                           log=(log.append if log is not None else lambda _line: None))


def test_fastest_correct_candidate_wins_and_a_wrong_one_never_does():
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    log: list[str] = []
    choice = _selector(bench=bench, log=log).choose("rms_norm", _fake_rms_candidates(bench), _rms_args(),
                                                    {"fa3-like": "not installed"})
    assert choice.name == "exact" and choice.source == "timed"
    assert sorted(bench.timed) == ["exact", "slow"]  # only correct candidates are timed
    assert set(choice.ms) == {"exact", "slow"}
    assert choice.rejected["wrong"].startswith("wrong result: max error")
    assert choice.rejected["nan"].startswith("wrong result: max error nan")
    assert choice.rejected["raises"] == "RuntimeError: no kernel for this shape"
    assert choice.rejected["fa3-like"] == "not installed"
    assert len(log) == 1 and "\n" not in log[0]
    assert "rms_norm(float16[2,7,48], float32[48], 1e-06)" in log[0] and ": exact (5 ms; slow 10 ms" in log[0]


def test_no_correct_candidate_is_an_error_naming_the_fix():
    bench = Bench({"wrong": 1.0})
    impls = {"wrong": bench.wrap("wrong", lambda x, *_: x * 2)}
    with pytest.raises(RuntimeError, match=r"no implementation computes rms_norm.*wrong result.*backend='torch'"):
        _selector(bench=bench).choose("rms_norm", impls, _rms_args())


def test_choice_is_saved_and_read_back_without_timing(tmp_path):
    path = tmp_path / "sub" / "choices.json"
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    args = _rms_args()
    first = _selector(path, bench).choose("rms_norm", _fake_rms_candidates(bench), args)
    assert first.source == f"timed, saved to {path}"
    data = json.loads(path.read_text())
    entry = data["choices"][SETUP][select.shape_class("rms_norm", args)]
    assert data["version"] == select.CACHE_VERSION and entry["choice"] == "exact"
    assert entry["ms"] == {"exact": 5.0, "slow": 10.0} and "wrong" in entry["rejected"]
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # written atomically: no temporary left

    log: list[str] = []  # a later process: the file answers, nothing is run or timed
    again = _selector(path, log=log).choose("rms_norm", _fake_rms_candidates(Bench({})), _rms_args())
    assert again.name == "exact" and again.source == f"from {path}" and again.ms == first.ms
    assert len(log) == 1 and log[0].endswith(f"[from {path}]")


def test_unwritable_file_keeps_the_choice_in_memory(tmp_path):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "a_file" / "choices.json"  # its folder is a file
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    log: list[str] = []
    selector = _selector(path, bench, log=log)
    choice = selector.choose("rms_norm", _fake_rms_candidates(bench), _rms_args())
    assert choice.name == "exact" and choice.source == "timed" and "cannot write" in log[0]
    n = len(bench.timed)
    assert selector.choose("rms_norm", _fake_rms_candidates(bench), _rms_args()) is choice and len(bench.timed) == n


def test_key_follows_the_setup_and_the_candidates(tmp_path):
    path = tmp_path / "choices.json"
    args = _rms_args()
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    _selector(path, bench).choose("rms_norm", _fake_rms_candidates(bench), args)
    other = SETUP.replace("torch 0.0", "torch 0.1")  # another torch: timed again
    bench2 = Bench({"exact": 9.0, "slow": 3.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    assert _selector(path, bench2, setup=other).choose("rms_norm", _fake_rms_candidates(bench2), args).name == "slow"
    assert sorted(bench2.timed) == ["exact", "slow"]
    assert set(json.loads(path.read_text())["choices"]) == {SETUP, other}  # both kept
    # a candidate installed since the timing (here: "new"): timed again, among all of them
    bench3 = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1, "new": 2.0})
    impls = _fake_rms_candidates(bench3) | {"new": bench3.wrap("new", norm.rms_norm_ref)}
    assert _selector(path, bench3).choose("rms_norm", impls, args).name == "new"
    # another shape is another class
    bench4 = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    _selector(path, bench4).choose("rms_norm", _fake_rms_candidates(bench4), _rms_args(L=9))
    assert sorted(bench4.timed) == ["exact", "slow"]


def test_fingerprint_names_device_driver_and_versions(monkeypatch):
    cpu = select.device_fingerprint(torch.device("cpu"))
    assert f"torch {torch.__version__}" in cpu and f"triton {select._version('triton')}" in cpu
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert select.device_fingerprint(torch.device("cpu")) != cpu
    monkeypatch.setattr(select, "_version", lambda _package: "7.7.7")
    assert "triton 7.7.7" in select.device_fingerprint(torch.device("cpu"))


def test_cache_path_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(select.CACHE_ENV, str(tmp_path / "c.json"))
    assert select.cache_path() == tmp_path / "c.json"
    monkeypatch.setenv(select.CACHE_ENV, "")
    assert select.cache_path() is None
    monkeypatch.delenv(select.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert select.cache_path() == tmp_path / "anyid_rt" / "kernel_choices.json"


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "choices": {}}', '{"version": 1, "choices": '
                                     '{"' + SETUP + '": {"rms_norm(float16[2,7,48], float32[48], 1e-06)": '
                                     '{"choice": "exact"}}}}'])
def test_unreadable_file_is_timed_again_and_rewritten(tmp_path, content):
    path = tmp_path / "choices.json"
    path.write_text(content)
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    log: list[str] = []
    choice = _selector(path, bench, log=log).choose("rms_norm", _fake_rms_candidates(bench), _rms_args())
    assert choice.name == "exact" and sorted(bench.timed) == ["exact", "slow"]
    assert any("unreadable" in line or "malformed" in line for line in log), log
    assert json.loads(path.read_text())["choices"][SETUP][choice.shape_class]["choice"] == "exact"


def test_auto_op_decides_once_per_shape_class():
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    op = select.AutoOp("rms_norm", _fake_rms_candidates(bench), _selector(bench=bench), timed_on=("cpu",))
    x, w, eps = _rms_args()
    torch.testing.assert_close(op(x, w, eps), norm.rms_norm_ref(x, w, eps), rtol=0, atol=0)
    n_timed = len(bench.timed)
    op(torch.randn_like(x), w, eps)  # same class: a lookup, nothing timed
    assert len(bench.timed) == n_timed and bench.calls[-1] == "exact"
    op(*_rms_args(L=3))  # a new class: decided again
    assert len(bench.timed) == 2 * n_timed and len(op.chosen) == 2
    assert "exact" in repr(op)


def test_auto_op_runs_the_reference_on_devices_it_does_not_time():
    op = select.AutoOp("rms_norm", {"boom": lambda *_: 1 / 0}, _selector())  # timed_on: CUDA only
    x, w, eps = _rms_args()
    assert torch.equal(op(x, w, eps), norm.rms_norm_ref(x, w, eps))


def test_forced_backends_bypass_the_selection():
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("auto", "cuda") == "auto"
    assert resolve_backend("triton", "cpu") == "triton" and resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("fast", "cuda")
    torch_ops, triton_ops, auto_ops = dit_ops("torch"), dit_ops("triton"), dit_ops("auto")
    fields = ("attention", "layernorm_modulate", "gated_residual", "rms_norm", "rms_norm_rope", "layer_norm")
    for f in fields:
        assert getattr(torch_ops, f) is select.REFERENCES[f]
        assert getattr(triton_ops, f) is select.TRITON[f]
        assert isinstance(getattr(auto_ops, f), select.AutoOp) and getattr(auto_ops, f).op == f
    assert isinstance(auto_ops, DiTOps) and auto_ops.backend == "auto"
    assert set(auto_ops.attention.impls) >= {"triton", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"}
    assert set(auto_ops.rms_norm.impls) == {"triton", "torch"}
    assert set(dit_ops("auto", compiled=True).rms_norm.impls) == {"triton", "torch-compile"}
    assert "fa3" in auto_ops.attention.impls or "fa3" in auto_ops.attention.not_available
    assert not isinstance(dit_ops("auto", "int8").attention, select.AutoOp)  # one implementation per device


def test_auto_dit_on_a_cpu_is_the_torch_backend():
    cfg = DiTConfig.preset("tiny")
    auto, ref = (random_dit(cfg, seed=3, backend=b) for b in ("auto", "torch"))
    assert auto.backend == "auto"
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, cfg.in_dim, 2, 4, 6, generator=g)
    t, ctx = torch.tensor([500.0]), [torch.randn(5, cfg.text_dim, generator=g)]
    with torch.no_grad():
        assert torch.equal(auto(latent, t, ctx), ref(latent, t, ctx))


def test_real_candidates_pass_the_check_and_the_fastest_is_called():
    """The Triton kernels (interpreter) and the references pass the calibrated check on fp16 inputs; SDPA
    backends that cannot run on this device are rejected with the reason."""
    L, D = 19, 48
    seg = SegmentMap.from_lens((5, 14))
    x = torch.randn(2, L, D).half()
    shift, scale = torch.randn(2, 2, D), 0.1 * torch.randn(2, 2, D)
    bench = Bench({"triton": 1.0, "torch": 2.0})
    impls = {n: bench.wrap(n, f) for n, f in select.candidates("layernorm_modulate").items()}
    op = select.AutoOp("layernorm_modulate", impls, _selector(bench=bench), timed_on=("cpu",))
    out = op(x, shift, scale, seg, 1e-6, torch.float16)
    (choice,) = op.choices.values()
    assert choice.name == "triton" and not choice.rejected and sorted(bench.timed) == ["torch", "triton"]
    assert bench.calls[-1] == "triton"
    assert select.check(out, modulation.layernorm_modulate_ref(x.float(), shift, scale, seg, 1e-6, torch.float32),
                        modulation.layernorm_modulate_ref(x, shift, scale, seg, 1e-6, torch.float16)).ok

    q, k, v = (torch.randn(1, n, 2, 32).half() for n in (37, 50, 50))
    bench = Bench({name: 1.0 + i for i, name in enumerate(select.candidates("attention"))})
    impls = {n: bench.wrap(n, f) for n, f in select.candidates("attention").items()}
    choice = _selector(bench=bench).choose("attention", impls, (q, k, v))
    assert choice.name == "triton" and "triton" not in choice.rejected
    assert "sdpa-cudnn" in choice.rejected and choice.rejected["sdpa-cudnn"].startswith("RuntimeError")
    assert set(choice.ms) | set(choice.rejected) == set(impls)


def test_check_is_the_calibrated_rule():
    ref32 = torch.randn(64, 40)
    low = ref32.half()
    assert select.check(low, ref32, low).ok
    worse = (ref32 + 3 * (low.float() - ref32).abs().max()).half()
    verdict = select.check(worse, ref32, low)
    assert not verdict.ok and verdict.error > verdict.bound and "bound" in verdict.reason
    assert not select.check(torch.full_like(low, float("nan")), ref32, low).ok
    assert "shape" in select.check(low[:3], ref32, low).reason

    class Rows:  # quantised rows with a scale, as kernels.fp8_quant.FP8Rows: compared dequantised
        def __init__(self, t):
            self.t = t

        def dequantize(self):
            return self.t.float()

    assert select.check(Rows(low), ref32, Rows(low)).ok
    assert not select.check(Rows(worse), ref32, Rows(low)).ok


def test_attention_oracle_compares_a_spread_of_query_rows():
    q, k, v = (torch.randn(1, n, 2, 16) for n in (300, 40, 40))
    o = select.oracle("attention", (q, k, v))
    assert o.rows[0] == 0 and o.rows[-1] == 299 and len(o.rows) == select.CHECK_ROWS
    full = attention_mod.attention_ref(q, k, v)
    torch.testing.assert_close(o.pick(full), o.fp32)


def test_auto_op_under_torch_compile():
    """A graph break at the first call of a shape class (the decision runs eagerly), a lookup after it."""
    bench = Bench({"exact": 5.0, "slow": 10.0, "wrong": 1.0, "nan": 0.5, "raises": 0.1})
    op = select.AutoOp("rms_norm", _fake_rms_candidates(bench), _selector(bench=bench), timed_on=("cpu",))

    def f(x, w):
        return op(x * 2, w, 1e-6) + 1

    x, w, _ = _rms_args()
    compiled = torch.compile(f, backend="eager")
    torch.testing.assert_close(compiled(x, w), norm.rms_norm_ref(x * 2, w, 1e-6) + 1, rtol=0, atol=0)
    n = len(bench.timed)
    compiled(torch.randn_like(x), w)
    assert len(bench.timed) == n
