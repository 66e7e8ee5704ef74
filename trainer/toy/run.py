"""The toy identity benchmark's stages, presets and stage cache (design sections 4 and 6).

Stages, each in OUT/<stage>/ with a stage.json naming the hash of its settings and of every stage it reads:
world -> evaluator -> pretrain -> sft -> pairs -> dpo -> eval (-> report). A rerun skips a stage whose hash
matches; a changed setting reruns that stage and everything after it. SFT runs in chunks through the real
`train_sft` (resume="auto" continues an interrupted run) and logs the reliance gap after each chunk.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ...config import DiTConfig
from ...files import write_text_atomic
from .. import dist as dist_utils
from ..config import DataConfig, DPOConfig, LoraConfig, ModelSource, OptimConfig, SFTConfig
from ..data import IDGroupDataset
from ..dpo import build_dpo, evaluate_dpo, train_dpo
from ..lora import load_lora_state_dict_
from ..sft import train_sft
from . import world as W
from .evaluator import EvaluatorConfig, ToyEvaluator, fingerprint, gates, train_evaluator
from . import PRESETS
from .model import SMOKE_DIT, TOY_DIT, TOY_LAYOUT, toy_defaults, toy_engine
from .pairs import PairsConfig, make_pairs
from .pretrain import PretrainConfig, pretrain
from .reliance import held_out, reliance

STAGES = ("world", "evaluator", "pretrain", "sft", "pairs", "dpo", "eval")
VERSION = 3  # bump when a stage's code changes what it writes (invalidates cached stages)


@dataclass(frozen=True)
class SFTSettings:
    steps: int = 3000
    chunk: int = 500  # the reliance gap is logged after each chunk; each chunk resumes the last checkpoint
    batch: int = 8
    rank: int = 64
    lr: float = 1e-3
    null_prob: float = 0.1
    min_references: int = 1
    max_references: int = 3
    form_weights: tuple[float, float, float] = (2.0, 1.0, 1.0)  # face : portrait : clip
    gap_pairs: int = 16
    seed: int = 0


@dataclass(frozen=True)
class DPOSettings:
    steps: int = 400
    batch: int = 4
    rank: int = 32
    lr: float = 1e-4
    beta: float = 500.0
    seed: int = 0


@dataclass(frozen=True)
class EvalSettings:
    cases: int = 256  # unseen-identity cases of SFT and DPO (claim b: N = 256)
    base: int = 128  # the first N of them for the base and claim (a)
    swap: int = 64
    null: int = 64
    steps: int = 16
    guidance: float = 3.0
    sheet: int = 8  # cases on the contact sheet


@dataclass(frozen=True)
class ToyPreset:
    name: str
    world: W.WorldConfig
    dit: DiTConfig
    evaluator: EvaluatorConfig
    pretrain: PretrainConfig
    sft: SFTSettings
    pairs: PairsConfig
    dpo: DPOSettings
    eval: EvalSettings = field(default_factory=EvalSettings)


def preset(name: str) -> ToyPreset:
    """smoke: CI plumbing at 64x64x5 (shape and skin only, 24 identities); no learning is claimed from it.
    bench: the demonstration at 96x96x5 (288 identities); step counts from the calibration (bench/results/toy).
    bench-shift1: bench with train and sample shift 1.0, the design note's first lever for a base that does not
    yet draw clean sprites (shift 1.5 leaves too few low-noise training samples)."""
    if name == "bench-shift1":
        bench = preset("bench")
        return replace(bench, name=name, pretrain=replace(bench.pretrain, shift=1.0))
    if name == "smoke":
        return ToyPreset(
            "smoke", W.WorldConfig(size=64, eyes=1, marks=1, clips_per_identity=3), SMOKE_DIT,
            EvaluatorConfig(steps=500, gate_samples=128, gate_clean=0.8, gate_noisy=0.8),  # CI sanity gates only
            PretrainConfig(steps=200, batch=8, lr=2e-3, warmup=10, shift=1.5),
            SFTSettings(steps=40, chunk=20, batch=4, rank=16, max_references=1, form_weights=(2.0, 1.0, 0.0),
                        gap_pairs=4),
            PairsConfig(inputs=4, candidates=3, id_margin=0.0, prompt_margin=0.0),
            DPOSettings(steps=20, batch=2, rank=8, lr=1e-3),
            EvalSettings(cases=8, base=8, swap=4, null=4, steps=6, sheet=4))
    if name == "bench":
        return ToyPreset("bench", W.WorldConfig(), TOY_DIT, EvaluatorConfig(),
                         PretrainConfig(steps=8000, batch=16, shift=1.5), SFTSettings(steps=1000, chunk=250),
                         PairsConfig(), DPOSettings(steps=300))
    raise ValueError(f"unknown toy preset {name!r}; choose one of {', '.join(PRESETS)}")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ToyRun:
    """Runs stages into OUT/<stage>/, skipping those whose stage.json carries the same hash."""

    def __init__(self, p: ToyPreset, out: str | Path, log: Callable[[str], None] = print):
        self.p, self.out, self.log = p, Path(out), log
        self.hashes: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.skipped: list[str] = []
        self.out.mkdir(parents=True, exist_ok=True)

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def stage(self, name: str, settings, deps: tuple[str, ...], fn: Callable[[Path], dict]) -> dict:
        for d in deps:
            if d not in self.hashes:
                self.results[d] = self.cached(d)
        h = _hash([VERSION, name, asdict(settings) if hasattr(settings, "__dataclass_fields__") else settings,
                   [self.hashes[d] for d in deps]])
        folder, marker = self.dir(name), self.dir(name) / "stage.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done["hash"] == h:
                self.log(f"[toy] {name}: done before (hash {h}), skipped")
                self.hashes[name], self.results[name] = h, done["result"]
                self.skipped.append(name)
                return done["result"]
            shutil.rmtree(folder)  # settings changed: start the stage afresh
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"[toy] {name}: running")
        t0 = time.perf_counter()
        result = fn(folder)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write_text_atomic(marker, json.dumps({"hash": h, "result": result}, indent=1))
        self.hashes[name], self.results[name] = h, result
        return result

    def cached(self, name: str) -> dict:
        marker = self.dir(name) / "stage.json"
        if not marker.is_file():
            raise FileNotFoundError(f"stage {name!r} has not run in {self.out}; run `anyid-rt toy {name}` first")
        done = json.loads(marker.read_text())
        self.hashes[name] = done["hash"]
        return done["result"]

    # -- the stages -------------------------------------------------------------------------------------------
    def world(self) -> dict:
        p = self.p
        return self.stage("world", p.world, (), lambda d: W.write_world(d, p.world, p.eval.cases, p.pairs.inputs))

    def evaluator(self) -> dict:
        p = self.p

        def run(d: Path) -> dict:
            model = train_evaluator(p.world, p.evaluator, self.log)
            g = gates(model, p.world, p.evaluator)
            torch.save(model.state_dict(), d / "evaluator.pt")
            self.log(f"[toy] evaluator gates: worst clean {g['worst_clean']:.3f}, worst noisy "
                     f"{g['worst_noisy']:.3f}, invalid {g['invalid']:.3f} -> {'pass' if g['passed'] else 'FAIL'}")
            return {"gates": g, "fingerprint": fingerprint(model)}
        return self.stage("evaluator", p.evaluator, ("world",), run)

    def load_evaluator(self) -> ToyEvaluator:
        model = ToyEvaluator(self.p.world)
        model.load_state_dict(torch.load(self.dir("evaluator") / "evaluator.pt", weights_only=True))
        return model.eval()

    def defaults(self):
        return toy_defaults(self.p.world.size, self.p.world.frames, self.p.pretrain.shift, self.p.eval.steps,
                            self.p.eval.guidance)

    def engine(self, *loras: Path):
        return toy_engine(self.p.dit, self.defaults(), base=self.dir("pretrain") / "base", loras=loras)

    def pretrain(self, steps: int | None = None, probe=None) -> dict:
        cfg = self.p.pretrain if steps is None else replace(self.p.pretrain, steps=steps)
        settings = {"pretrain": {**asdict(cfg), "probe_every": 0}, "dit": asdict(self.p.dit)}  # probes change no weight
        return self.stage("pretrain", settings, ("world",),
                          lambda d: pretrain(self.p.world, self.p.dit, cfg, d, probe, self.log))

    def sft_config(self, out: Path, max_steps: int) -> SFTConfig:
        p, s = self.p, self.p.sft
        data = DataConfig(root=str(self.dir("world") / "train"), buckets=((p.world.frames, p.world.size, p.world.size),),
                          min_references=s.min_references, max_references=s.max_references,
                          form_weights=s.form_weights, fps=None, similarity="jaccard")
        return SFTConfig(output_dir=str(out), seed=s.seed, batch_size=s.batch, grad_accum=1, max_steps=max_steps,
                         train_shift=p.pretrain.shift, checkpoint_every=s.chunk, keep_checkpoints=1, log_every=10,
                         mixed_precision="fp32", gradient_checkpointing=False, resume="auto", progress=False,
                         model=ModelSource(preset="tiny", device="cpu", backend="torch"), data=data,
                         lora=LoraConfig(rank=s.rank, alpha=float(s.rank), save_dtype="fp32"),
                         optim=OptimConfig(lr=s.lr), layout=TOY_LAYOUT, null_prob=s.null_prob)

    def sft(self, steps: int | None = None) -> dict:
        s = self.p.sft if steps is None else replace(self.p.sft, steps=steps)

        def run(d: Path) -> dict:
            evaluator = self.load_evaluator()
            first = self.sft_config(d, s.chunk)
            dataset = IDGroupDataset.from_config(first.data, TOY_LAYOUT, s.seed)
            unseen = replace(first.data, root=str(self.dir("world") / "unseen"))
            held_ds = IDGroupDataset.from_config(unseen, TOY_LAYOUT, s.seed + 1)
            base = self.engine()
            held = held_out(held_ds, first, base, s.gap_pairs, self.p.world)
            curve = [{"step": 0, **reliance(base.dit, base, held, evaluator, self.p.world)}]
            self.log(f"[toy] sft step 0: reliance gap {curve[-1]['gap']:+.4f}, probe id_acc "
                     f"{curve[-1]['probe_id_acc']:.3f}")
            for upto in range(s.chunk, s.steps + s.chunk, s.chunk):
                engine = self.engine()
                result = train_sft(self.sft_config(d, min(upto, s.steps)), dataset=dataset, engine=engine)
                row = {"step": result.step, **reliance(engine.dit, engine, held, evaluator, self.p.world)}
                curve.append(row)
                self.log(f"[toy] sft step {row['step']}: reliance gap {row['gap']:+.4f}, probe id_acc "
                         f"{row['probe_id_acc']:.3f}")
                write_text_atomic(d / "gap.json", json.dumps(curve, indent=1))
            return {"steps": s.steps, "curve": curve, "lora": "sft/lora.safetensors"}
        return self.stage("sft", s, ("world", "evaluator", "pretrain"), run)

    def pairs(self) -> dict:
        def run(d: Path) -> dict:
            engine = self.engine(self.dir("sft") / "lora.safetensors")
            cases = W.read_cases(self.dir("world"), "train")
            return make_pairs(engine, self.load_evaluator(), self.p.world, self.dir("world"), cases, self.p.pairs, d,
                              self.log)
        sampling = {"steps": self.p.eval.steps, "guidance": self.p.eval.guidance}  # the candidates' sampler
        return self.stage("pairs", {"pairs": asdict(self.p.pairs), **sampling}, ("world", "evaluator", "sft"), run)

    def dpo_config(self, out: Path) -> DPOConfig:
        p, s = self.p, self.p.dpo
        return DPOConfig(output_dir=str(out), seed=s.seed, batch_size=s.batch, grad_accum=1, max_steps=s.steps,
                         train_shift=p.pretrain.shift, checkpoint_every=s.steps, keep_checkpoints=1, log_every=5,
                         mixed_precision="fp32", gradient_checkpointing=False, resume="auto", progress=False,
                         model=ModelSource(preset="tiny", device="cpu", backend="torch"),
                         pairs=str(self.dir("pairs") / "pairs.jsonl"), sft_lora=str(self.dir("sft") / "lora.safetensors"),
                         buckets=((p.world.frames, p.world.size, p.world.size),),
                         lora=LoraConfig(rank=s.rank, alpha=float(s.rank), save_dtype="fp32"),
                         optim=OptimConfig(lr=s.lr), beta=s.beta)

    def dpo(self) -> dict:
        def run(d: Path) -> dict:
            if not (self.dir("pairs") / "pairs.jsonl").is_file():
                return {"skipped": "no Pareto pair survived; DPO did not run", "steps": 0}
            cfg = self.dpo_config(d)
            result = train_dpo(cfg, engine=self.engine())
            engine, layout, _, batcher, _, _ = build_dpo(cfg, dist_utils.init_distributed("cpu"), engine=self.engine())
            load_lora_state_dict_(engine.dit, result.lora_state)
            fit = evaluate_dpo(engine.dit, layout, batcher, cfg.beta)
            self.log(f"[toy] dpo: implicit accuracy on its own pairs {fit['accuracy']:.3f}")
            losses = [r["dpo_loss"] for r in result.history]
            return {"steps": result.step, "fit": fit, "loss_first": losses[0], "loss_last": losses[-1],
                    "lora": "dpo/lora.safetensors"}
        return self.stage("dpo", self.p.dpo, ("world", "evaluator", "sft", "pairs"), run)

    def evaluate(self, arms: tuple[str, ...] = ("oracle", "base", "sft", "null", "swap", "dpo")) -> dict:
        from .arms import run_arms

        return self.stage("eval", {"eval": asdict(self.p.eval), "arms": list(arms)},
                          ("world", "evaluator", "pretrain", "sft", "dpo"), lambda d: run_arms(self, arms, d))

    def all(self) -> dict:
        from .report import write_report

        t0 = time.perf_counter()
        self.world()
        if not self.evaluator()["gates"]["passed"]:  # a metric that fails its gates must not score anything
            self.log("[toy] the evaluator failed its gates: the run stops here (verdicts inconclusive)")
            return write_report(self, time.perf_counter() - t0)
        self.pretrain()
        self.sft()
        self.pairs()
        self.dpo()
        self.evaluate()
        return write_report(self, time.perf_counter() - t0)


__all__ = ["ToyPreset", "preset", "ToyRun", "SFTSettings", "DPOSettings", "EvalSettings", "STAGES"]
