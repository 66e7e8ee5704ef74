"""Element consistency and prompt following with image / text embeddings from a local transformers folder.

* `--clip DIR`: a CLIPModel folder (config.json with model_type "clip", weights, preprocessor_config.json
  and a tokenizer). Image features are the projected pooled outputs (`get_image_features`); text features
  likewise (`get_text_features`, prompts truncated to the model's context, 77 tokens for OpenAI CLIP).
* `--dino DIR`: a DINOv2 (or DINOv3 / ViT) folder; the feature is the pooled output (the layer-normed CLS
  token), the feature DINO-based consistency metrics compare.
Scores are cosines of L2-normalised features: `elements.<model>` is the mean over sampled frames of the
frame-vs-primary-reference cosine (the AnyID paper first segments the preserved elements with Grounded-SAM;
this compares whole frames, see docs/evaluation.md); `prompt.clip_text` is the mean frame-vs-prompt cosine.
Nothing is downloaded: the folder must hold the files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import EvalError, require

CLIP_TYPES = ("clip",)
DINO_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit")


def check_model_folder(folder: str | Path, kind: str) -> Path:
    """Files and packages of a --clip / --dino folder, checked before anything is loaded."""
    require("transformers", "transformers", f"--{kind}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EvalError(f"--{kind} {folder}: folder not found (give a local transformers model folder; nothing is "
                        f"downloaded)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise EvalError(f"--{kind} {folder}: no config.json; not a transformers model folder")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"--{kind} {folder}: config.json is not valid JSON ({e})") from e
    allowed = CLIP_TYPES if kind == "clip" else DINO_TYPES
    if model_type not in allowed:
        raise EvalError(f"--{kind} {folder}: model_type {model_type!r} is not one of {allowed}")
    if not (folder / "preprocessor_config.json").is_file():
        raise EvalError(f"--{kind} {folder}: no preprocessor_config.json (save the image processor with the model)")
    return folder


def _normalise(x) -> np.ndarray:
    x = x.float().cpu().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _pooled(out):
    """transformers 4.x returns a tensor from get_*_features, 5.x an output whose pooler_output is projected."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageEmbedder:
    """A CLIP or DINO model from a local folder: `images(frames)` -> [N, D] and, for CLIP, `text(prompt)` -> [D]."""

    def __init__(self, folder: str | Path, kind: str, device: str = "cpu", batch: int = 16):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.folder, self.kind, self.batch = check_model_folder(folder, kind), kind, batch
        self.device = torch.device(device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.folder)
            if kind == "clip":
                from transformers import AutoTokenizer, CLIPModel

                self.model = CLIPModel.from_pretrained(self.folder)
                self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
            else:
                self.model = AutoModel.from_pretrained(self.folder)
        except (OSError, ValueError, KeyError) as e:
            raise EvalError(f"--{kind} {self.folder}: could not load ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:200]})") from e
        self.model.eval().to(self.device)

    def images(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> L2-normalised [N, D]."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(frames), self.batch):
                pix = self.processor(images=list(frames[i:i + self.batch]), return_tensors="pt")["pixel_values"]
                pix = pix.to(self.device)
                if self.kind == "clip":
                    feats = _pooled(self.model.get_image_features(pixel_values=pix))
                else:
                    feats = self.model(pixel_values=pix).pooler_output
                out.append(_normalise(feats))
        return np.concatenate(out)

    def text(self, prompt: str) -> np.ndarray:
        import torch

        if self.kind != "clip":
            raise EvalError("text features need a CLIP model (--clip)")
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        tok = self.tokenizer([prompt], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            return _normalise(_pooled(self.model.get_text_features(**tok)))[0]


__all__ = ["ImageEmbedder", "check_model_folder", "CLIP_TYPES", "DINO_TYPES"]
