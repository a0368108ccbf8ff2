"""CLIP score (Hessel et al. 2021: ``100 * max(cos(image, text), 0)``) from a CLIP model on
disk, for ``gie-guard evaluate --clip PATH``. Nothing is downloaded.

``PATH`` is a folder holding either

- an open_clip model (``open_clip_config.json`` and its weights, the layout open_clip saves and
  the hub serves), loaded with ``open_clip.create_model_and_transforms("local-dir:PATH")``;
  needs ``open-clip-torch`` and ``torchvision``; or
- a transformers CLIP model (``config.json`` of ``model_type`` ``clip``, with its tokenizer
  files), e.g. ``openai/clip-vit-large-patch14`` saved with ``save_pretrained``. Images are
  resized (bicubic, shorter side), centre-cropped and normalised here, so torchvision is not
  needed.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigurationError

__all__ = ["ClipScorer", "clip_kind", "load_clip"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    def __init__(self, kind: str, model: Any, encode_images: Any, encode_texts: Any, path: str) -> None:
        self.kind, self.model, self.path = kind, model, path
        self._images, self._texts = encode_images, encode_texts

    def __call__(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        import torch

        scores = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                im = self._images(images[i : i + batch_size])
                tx = self._texts(list(prompts[i : i + batch_size]))
                im = im / im.norm(dim=-1, keepdim=True)
                tx = tx / tx.norm(dim=-1, keepdim=True)
                scores.append((100.0 * (im * tx).sum(-1).clamp(min=0)).float().cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0)


def clip_kind(path: str) -> str:
    """``open_clip`` or ``transformers``: what the folder holds, checked without loading it
    (so a wrong ``--clip`` fails before any image is generated)."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ConfigurationError(f"--clip {path}: no such folder (a local open_clip or transformers CLIP model)")
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    config = folder / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise ConfigurationError(f"{config}: not valid JSON") from None
        if model_type == "clip":
            return "transformers"
        raise ConfigurationError(f"--clip {path}: config.json has model_type {model_type!r}, not 'clip'")
    raise ConfigurationError(
        f"--clip {path}: neither an open_clip model (open_clip_config.json) nor a transformers CLIP model (config.json)"
    )


def load_clip(path: str, device: str = "cpu") -> ClipScorer:
    folder = pathlib.Path(path)
    if clip_kind(path) == "open_clip":
        return _open_clip(folder, device)
    return _transformers_clip(folder, device)


def _open_clip(folder: pathlib.Path, device: str) -> ClipScorer:
    try:
        import open_clip
    except Exception as exc:  # ImportError, or torchvision's operator errors at import
        raise ConfigurationError(
            f"--clip {folder}: an open_clip model needs open-clip-torch with torchvision importable "
            f"({type(exc).__name__}: {exc}); or pass a transformers CLIP folder"
        ) from None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except Exception as exc:
        raise ConfigurationError(f"--clip {folder}: open_clip cannot load it: {type(exc).__name__}: {exc}") from None
    model.eval()
    import torch
    from PIL import Image

    def images(batch: np.ndarray) -> Any:
        x = torch.stack([preprocess(Image.fromarray(a)) for a in batch]).to(device)
        return model.encode_image(x)

    def texts(prompts: list[str]) -> Any:
        return model.encode_text(tokenizer(prompts).to(device))

    return ClipScorer("open_clip", model, images, texts, str(folder))


def _transformers_clip(folder: pathlib.Path, device: str) -> ClipScorer:
    import torch
    from transformers import AutoTokenizer, CLIPModel

    try:
        # transformers' decorator on PreTrainedModel.to hides its signature from type checkers
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ConfigurationError(f"--clip {folder}: cannot load the CLIP model: {type(exc).__name__}: {exc}") from None
    size = int(model.config.vision_config.image_size)
    mean, std = _CLIP_MEAN, _CLIP_STD
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        try:
            meta = json.loads(pre.read_text(encoding="utf-8"))
            mean, std = tuple(meta.get("image_mean", mean)), tuple(meta.get("image_std", std))
        except ValueError:
            pass
    max_len = int(model.config.text_config.max_position_embeddings)

    def images(batch: np.ndarray) -> Any:
        x = torch.from_numpy(np.stack([_preprocess(a, size) for a in batch])).to(device)
        x = (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)
        return model.get_image_features(pixel_values=x)

    def texts(prompts: list[str]) -> Any:
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        return model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))

    return ClipScorer("transformers", model, _features(images), _features(texts), str(folder))


def _features(fn: Any) -> Any:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    def call(x: Any) -> Any:
        out = fn(x)
        return out if hasattr(out, "norm") else getattr(out, "pooler_output", out[0])
    return call


def _preprocess(array: np.ndarray, size: int) -> np.ndarray:
    """CLIP's preprocessing: bicubic resize of the shorter side to ``size``, centre crop,
    scaled to [0, 1]; (3, size, size) float32."""
    from PIL import Image

    im = Image.fromarray(array).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return (np.asarray(im, dtype=np.float32) / 255.0).transpose(2, 0, 1)
