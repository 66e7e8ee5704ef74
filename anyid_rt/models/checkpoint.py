"""Reading checkpoints: single files, sharded folders, `.pth`, with lazy per-tensor access.

Tensors are read one at a time from memory-mapped safetensors (or an mmapped `torch.load`), cast to the
target dtype and assigned into a model built on the meta device, so that loading never holds a second
full-size copy of the weights. Key-layout conversion happens here, at load time, so forwards have no
branches.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: wrong keys, wrong shapes, or an unreadable file."""


SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Name pieces that training wrappers (FSDP, activation checkpointing, torch.compile) insert into a module path and
# that a checkpoint saved from a wrapped model keeps, e.g. Wan2.2-TI2V-5B-Turbo's model.pt (its repository's
# convert_checkpoint.py removes the same three): never part of a real parameter name, so removed from every key.
WRAPPER_PIECES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def describe_keys(keys: Iterable[str]) -> str:
    """What a checkpoint holds, judged from its key names: for errors that say what a wrong file is."""
    keys = set(keys)
    if any(k.startswith(("blocks.0.self_attn.", "blocks.0.attn1.")) for k in keys) or "patch_embedding.weight" in keys:
        return "a Wan DiT (transformer) checkpoint"
    if "shared.weight" in keys or "token_embedding.weight" in keys or any(".block.0.layer." in k for k in keys):
        return "a (u)mT5 text-encoder checkpoint"
    if any(k.startswith(("first_stage_model.", "vae.")) for k in keys):
        return "a full-pipeline single file"
    if "encoder.conv1.weight" in keys or "encoder.conv_in.weight" in keys or any(
            k.startswith(("decoder.upsamples.", "decoder.up_blocks.")) for k in keys):
        return "a Wan VAE checkpoint"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "an autoencoder of another kind (no Wan VAE key names)"
    return "an unknown model"


class CheckpointReader:
    """Lazy access to the tensors of a checkpoint: `keys()`, `shape(key)`, `get(key)`.

    `path` may be a `.safetensors` file, a `.pth` / `.pt` / `.bin` file (read with
    `torch.load(weights_only=True, mmap=True)`), a `*.safetensors.index.json`, or a folder holding one index
    json, exactly one safetensors file or exactly one torch file (e.g. transformers' `pytorch_model.bin`).
    `strip_prefixes` removes single-file repack prefixes such as `model.diffusion_model.` from every key, and the
    pieces of `WRAPPER_PIECES` are removed wherever they occur.
    """

    def __init__(self, path: str | Path, strip_prefixes: Iterable[str] = SINGLE_FILE_PREFIXES):
        self.path = Path(path)
        self._files: dict[str, Path] = {}  # key -> file (safetensors)
        self._handles: dict[Path, object] = {}
        self._torch_sd: dict[str, torch.Tensor] | None = None
        self._raw: dict[str, str] = {}  # public key -> key stored in the file
        self.metadata: dict[str, str] = {}
        self.file = self._resolve(self.path)  # the file read first (the index json of a sharded folder)
        raw_keys = self._index(self.file)
        prefixes = tuple(strip_prefixes)
        for k in raw_keys:
            pk = k
            for p in prefixes:
                if pk.startswith(p):
                    pk = pk[len(p):]
                    break
            for piece in WRAPPER_PIECES:
                pk = pk.replace(piece, "")
            if pk in self._raw:
                raise CheckpointError(f"{self.path}: key {pk!r} appears twice (with and without a prefix)")
            self._raw[pk] = k

    @staticmethod
    def _resolve(path: Path) -> Path:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_file():
            return path
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return indexes[0]
        if len(indexes) > 1:
            raise CheckpointError(f"{path} holds several index files {[p.name for p in indexes]}; pass one of them")
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise CheckpointError(f"{path} holds several safetensors files and no index json; pass one file")
        pth = sorted(p for ext in ("pth", "pt", "bin") for p in path.glob(f"*.{ext}"))
        if len(pth) == 1:
            return pth[0]
        if len(pth) > 1:
            raise CheckpointError(f"{path} holds several torch checkpoints {[p.name for p in pth]}; pass one file")
        raise CheckpointError(f"{path} holds no checkpoint (*.safetensors, *.safetensors.index.json or one "
                              "*.pth / *.pt / *.bin)")

    def _index(self, file: Path) -> list[str]:
        name = file.name
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{file}: not a safetensors index (needs a 'weight_map'): {e}") from e
            for key, shard in weight_map.items():
                shard_path = file.parent / shard
                if not shard_path.exists():
                    raise CheckpointError(f"{file}: shard {shard} named in the index is missing")
                self._files[key] = shard_path
            return list(weight_map)
        if name.endswith(".safetensors"):
            keys = list(self._open(file).keys())
            self.metadata = dict(self._open(file).metadata() or {})
            for k in keys:
                self._files[k] = file
            return keys
        if file.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # only the legacy (pre-zip) format cannot be memory-mapped
                    raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True): {e}") from e
                sd = _load_legacy(file)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
                raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True): {e}") from e
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{file}: expected a dict of tensors")
            self._torch_sd = sd
            return list(sd)
        raise CheckpointError(f"{file}: unsupported checkpoint format (use .safetensors, an index json or .pth)")

    def _open(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{file}: not a readable safetensors file: {e}") from e
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self._raw)

    def __contains__(self, key: str) -> bool:
        return key in self._raw

    def shape(self, key: str) -> tuple[int, ...]:
        raw = self._raw[key]
        if self._torch_sd is not None:
            return tuple(self._torch_sd[raw].shape)
        return tuple(self._open(self._files[raw]).get_slice(raw).get_shape())

    def file_of(self, key: str) -> str:
        return str(self._files.get(self._raw[key], self.path))

    def close(self, file: str) -> None:
        """Drop the mmap of one file so its pages leave the process (used after a shard is consumed)."""
        self._handles.pop(Path(file), None)

    def get(self, key: str) -> torch.Tensor:
        raw = self._raw[key]
        if self._torch_sd is not None:
            return self._torch_sd[raw]
        return self._open(self._files[raw]).get_tensor(raw)


def load_into(module: nn.Module, reader: CheckpointReader, key_map: Callable[[str], str] | None,
              dtype: torch.dtype, device: torch.device | str = "cpu",
              keep_fp32: Callable[[str], bool] = lambda name: False, what: str = "model",
              progress: bool = False) -> None:
    """Assign every parameter/buffer of `module` (possibly on the meta device) from `reader`.

    `key_map` maps a checkpoint key to the module's name (identity when None). Each tensor is read,
    cast to `dtype` (or kept fp32 where `keep_fp32(name)`), moved to `device` and assigned, one at a time
    (`progress`: a progress bar over the bytes read, named after `what`).
    Raises CheckpointError listing missing and unexpected keys and any shape mismatch.
    """
    targets = dict(module.named_parameters())
    targets.update(dict(module.named_buffers()))
    persistent = {n for n, _ in module.named_parameters()}
    for mod_name, mod in module.named_modules():
        for b in mod._buffers:
            if b not in mod._non_persistent_buffers_set:
                persistent.add(f"{mod_name}.{b}" if mod_name else b)
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for ck in reader.keys():
        name = key_map(ck) if key_map else ck
        if name in persistent:
            mapping[name] = ck
        else:
            unexpected.append(ck)
    missing = sorted(persistent - set(mapping))
    if missing or unexpected:
        raise CheckpointError(_key_report(what, reader.path, missing, unexpected))
    bad_shapes = []
    for name, ck in mapping.items():
        if tuple(reader.shape(ck)) != tuple(targets[name].shape):
            bad_shapes.append(f"{ck}: checkpoint {tuple(reader.shape(ck))} vs model {tuple(targets[name].shape)}")
    if bad_shapes:
        raise CheckpointError(f"{what} checkpoint {reader.path} has tensors of the wrong shape "
                              f"(a checkpoint of another model or config?):\n  " + "\n  ".join(bad_shapes[:20]))
    from tqdm.auto import tqdm

    current = None
    # bytes as loaded: every tensor ends in `dtype`, or fp32 where keep_fp32 says so
    total = sum(targets[n].numel() * (4 if keep_fp32(n) else dtype.itemsize) for n in mapping)
    with tqdm(total=total, desc=f"loading {what}", unit="B", unit_scale=True, disable=not progress) as bar:
        for name, ck in sorted(mapping.items(), key=lambda kv: reader.file_of(kv[1])):  # shard by shard
            if reader.file_of(ck) != current:
                if current is not None:
                    reader.close(current)
                current = reader.file_of(ck)
            t = reader.get(ck)
            t = t.to(device=device, dtype=torch.float32 if keep_fp32(name) else dtype)
            _assign(module, name, t)
            bar.update(t.numel() * t.element_size())
    if current is not None:
        reader.close(current)


def _load_legacy(file: Path) -> dict:
    """A .pth in torch's legacy (non-zip) format cannot be memory-mapped: it is read whole, once."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True): {e}") from e


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module
    for p in path:
        owner = getattr(owner, p)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = tensor


def _key_report(what: str, path: Path, missing: list[str], unexpected: list[str], limit: int = 25) -> str:
    lines = [f"{what} checkpoint {path} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:limit])
                     + (" ..." if len(missing) > limit else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:limit])
                     + (" ..." if len(unexpected) > limit else ""))
    return "\n".join(lines)
