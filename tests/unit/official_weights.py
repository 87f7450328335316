"""Checkpoint fixtures written in each producer's own layout, random weights, tiny widths and depths.

Key names, shapes and nesting follow the producers' code, not timm's:
- DINOv2 (facebookresearch/dinov2, dinov2/models/vision_transformer.py, layers/*.py, hub/backbones.py): the
  hub's `dinov2_vit*14_pretrain.pth` is `model.state_dict()` of DinoVisionTransformer(img_size=518,
  patch_size=14, init_values=1.0, block_chunks=0): `cls_token` [1,1,D], `pos_embed` [1,1+37*37,D],
  `mask_token` [1,D], `register_tokens` [1,R,D] (the *_reg4 files), `patch_embed.proj`, per block `norm1`,
  `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1/fc2` (ViT-g: SwiGLUFFNFused `mlp.w12/w3` with hidden
  (int(4D*2/3)+7)//8*8), `ls2.gamma`, then `norm`. Training's teacher_checkpoint.pth is {"teacher":
  teacher.state_dict()}: `backbone.`-prefixed, blocks chunked as `blocks.<chunk>.<i>.` (BlockChunk pads with
  Identity, so i is global), `dino_head.*` and `ibot_head.*` beside it.
- DINOv3 (facebookresearch/dinov3, models/vision_transformer.py, layers/*.py, hub/backbones.py dinov3_vits16):
  `cls_token`, `storage_tokens` [1,4,D], `mask_token` [1,D], `rope_embed.periods` [Dh/4] (persistent),
  `patch_embed.proj` (16 px), per block `norm1`, `attn.qkv` with bias and its `attn.qkv.bias_mask` buffer
  (mask_k_bias: 1 for q and v, 0 for k), `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1/fc2`, `ls2.gamma`; `norm`.
- DINO (facebookresearch/dino, main_dino.py, vision_transformer.py): the published *_pretrain.pth is the
  teacher backbone's state dict; checkpoint.pth is {"student": DDP(MultiCropWrapper) -> `module.backbone.*`,
  `module.head.*`; "teacher": `backbone.*`, `head.*`; "optimizer", "epoch", "args": Namespace, "dino_loss"}.
- EVA-02 (baaivision/EVA, EVA-02/asuka/modeling_pretrain.py, modeling_finetune.py, utils.save_model): the MIM
  model eva02_tiny_patch14_xattn_fusedLN_SwiGLU_preln_RoPE saved as {"model": state_dict, ...}: `cls_token`,
  `mask_token` [1,1,D], `pos_embed` [1,1+16*16,D], `patch_embed.proj`, `rope.freqs_cos/sin` (also under every
  block's `attn.rope.`, the module is shared), per block `norm1`, `attn.qkv.weight` (no bias) with
  `attn.q_bias`/`attn.v_bias`, `attn.proj`, `norm2`, xformers SwiGLU `mlp.w12/w3` (hidden int(D*4*2/3)), then
  `norm` and the MIM `lm_head`.
- Hugging Face transformers (modeling_vit.py, modeling_dinov2.py, modeling_dinov2_with_registers.py): a
  save_pretrained folder, config.json + model.safetensors; ViTModel keys `embeddings.{cls_token,
  position_embeddings, patch_embeddings.projection}`, `encoder.layer.N.{layernorm_before, attention.attention.
  {query,key,value}, attention.output.dense, layernorm_after, intermediate.dense, output.dense}`, `layernorm`,
  `pooler.dense`; Dinov2Model `embeddings.{cls_token, mask_token, register_tokens, position_embeddings}`,
  `encoder.layer.N.{norm1, attention..., layer_scale1.lambda1, norm2, mlp.fc1/fc2 | mlp.weights_in/out,
  layer_scale2.lambda1}`, `layernorm`; task models nest the base model under `vit.` / `dinov2.`.
- SigLIP 2: the timm release (`timm/vit_*_siglip_*.v2_webli`) is timm's own state dict (attention-pooling
  head `attn_pool.*`, no class token); the OpenCLIP release puts that tower under `visual.trunk.` beside the
  text tower (`text.*`) and `logit_scale` / `logit_bias`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _rand(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def _ln(prefix: str, d: int) -> dict[str, tuple]:
    return {prefix + "weight": (d,), prefix + "bias": (d,)}


def dinov2_state(dim: int = 32, depth: int = 2, registers: int = 0, swiglu: bool = False, img: int = 518,
                 patch: int = 14, seed: int = 0) -> dict[str, torch.Tensor]:
    n = (img // patch) ** 2
    s = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + n, dim), "mask_token": (1, dim),
         "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    if registers:
        s["register_tokens"] = (1, registers, dim)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        s.update(_ln(b + "norm1.", dim))
        s.update({b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                  b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,)})
        s.update(_ln(b + "norm2.", dim))
        if swiglu:
            s.update({b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                      b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
        else:
            s.update({b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                      b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
        s[b + "ls2.gamma"] = (dim,)
    s.update(_ln("norm.", dim))
    return _rand(s, seed)


def dinov2_teacher_checkpoint(sd: dict[str, torch.Tensor], chunks: int = 2) -> dict:
    """teacher_checkpoint.pth of DINOv2 training: {"teacher": ...} with chunked blocks and the SSL heads."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    per = depth // chunks
    teacher = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // per}.{i}." + k.split(".", 2)[2]
        teacher["backbone." + k] = v
    dim = sd["cls_token"].shape[-1]
    teacher.update({"dino_head.mlp.0.weight": torch.zeros(16, dim), "dino_head.last_layer.weight_g": torch.ones(8, 1),
                    "ibot_head.mlp.0.weight": torch.zeros(16, dim)})
    return {"teacher": teacher}


def dinov3_state(dim: int = 64, heads: int = 2, depth: int = 2, storage: int = 4, patch: int = 16,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    s = {"cls_token": (1, 1, dim), "storage_tokens": (1, storage, dim), "mask_token": (1, dim),
         "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update(_ln(b + "norm1.", dim))
        s.update({b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                  b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,)})
        s.update(_ln(b + "norm2.", dim))
        s.update({b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                  b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
    s.update(_ln("norm.", dim))
    sd = _rand(s, seed)
    head_dim = dim // heads
    sd["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    for i in range(depth):
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0  # LinearKMaskedBias after init_weights: the k bias is masked out
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    order = ["cls_token", "storage_tokens", "mask_token", "rope_embed.periods"]
    return {k: sd[k] for k in order + [k for k in sd if k not in order]}


def eva02_mim_checkpoint(dim: int = 48, heads: int = 2, depth: int = 2, img: int = 224, patch: int = 14,
                         seed: int = 0) -> dict:
    grid = img // patch
    hidden = int(dim * 4 * 2 / 3)
    s = {"cls_token": (1, 1, dim), "mask_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim),
         "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        s.update(_ln(b + "norm1.", dim))
        s.update({b + "attn.q_bias": (dim,), b + "attn.v_bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                  b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)})
        s.update(_ln(b + "norm2.", dim))
        s.update({b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                  b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)})
    s.update(_ln("norm.", dim))
    s.update({"lm_head.weight": (64, dim), "lm_head.bias": (64,)})
    sd = _rand(s, seed)
    rope = {"freqs_cos": torch.rand(grid * grid, dim // heads), "freqs_sin": torch.rand(grid * grid, dim // heads)}
    for k, v in rope.items():
        sd["rope." + k] = v
        for i in range(depth):
            sd[f"blocks.{i}.attn.rope.{k}"] = v
    return {"model": sd, "epoch": 299, "scaler": {"scale": 65536.0}}


def hf_from_original(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """The transformers ViTModel (kind 'vit') / Dinov2Model ('dinov2') keys of an original-layout state dict:
    what `convert_*_to_pytorch.py` in transformers produces, written here from modeling_vit/dinov2.py."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "mask_token" in sd:
        out["embeddings.mask_token"] = sd["mask_token"]
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind_ in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{kind_}"].chunk(3, 0)
            out[h + f"attention.attention.query.{kind_}"] = q
            out[h + f"attention.attention.key.{kind_}"] = k
            out[h + f"attention.attention.value.{kind_}"] = v
            out[h + f"attention.output.dense.{kind_}"] = sd[b + f"attn.proj.{kind_}"]
            if kind == "vit":
                out[h + f"layernorm_before.{kind_}"] = sd[b + f"norm1.{kind_}"]
                out[h + f"layernorm_after.{kind_}"] = sd[b + f"norm2.{kind_}"]
                out[h + f"intermediate.dense.{kind_}"] = sd[b + f"mlp.fc1.{kind_}"]
                out[h + f"output.dense.{kind_}"] = sd[b + f"mlp.fc2.{kind_}"]
            else:
                out[h + f"norm1.{kind_}"] = sd[b + f"norm1.{kind_}"]
                out[h + f"norm2.{kind_}"] = sd[b + f"norm2.{kind_}"]
                if b + "mlp.w12.weight" in sd:
                    out[h + f"mlp.weights_in.{kind_}"] = sd[b + f"mlp.w12.{kind_}"]
                    out[h + f"mlp.weights_out.{kind_}"] = sd[b + f"mlp.w3.{kind_}"]
                else:
                    out[h + f"mlp.fc1.{kind_}"] = sd[b + f"mlp.fc1.{kind_}"]
                    out[h + f"mlp.fc2.{kind_}"] = sd[b + f"mlp.fc2.{kind_}"]
        if kind != "vit":
            out[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
            out[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    if kind == "vit":
        dim = sd["cls_token"].shape[-1]
        out["pooler.dense.weight"], out["pooler.dense.bias"] = torch.zeros(dim, dim), torch.zeros(dim)
    return out


def write_hf_folder(folder: Path, sd: dict[str, torch.Tensor], config: dict, prefix: str = "") -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def hf_config(model_type: str, dim: int, depth: int, heads: int, img: int, patch: int, registers: int = 0,
              swiglu: bool = False) -> dict:
    cfg = {"model_type": model_type, "hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads,
           "image_size": img, "patch_size": patch, "num_channels": 3, "qkv_bias": True,
           "layer_norm_eps": 1e-6 if model_type != "vit" else 1e-12, "hidden_act": "gelu"}
    if model_type == "vit":
        cfg.update({"architectures": ["ViTModel"], "intermediate_size": 4 * dim})
    else:
        cfg.update({"architectures": ["Dinov2Model"], "mlp_ratio": 4, "layerscale_value": 1.0,
                    "use_swiglu_ffn": swiglu})
        if registers:
            cfg.update({"num_register_tokens": registers, "architectures": ["Dinov2WithRegistersModel"]})
    return cfg
