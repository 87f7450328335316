"""Official checkpoint layouts (DINOv2 S/B/L/g with and without registers, its training checkpoint, DINOv3,
EVA-02, SigLIP 2 in timm and OpenCLIP form, timm .safetensors, Hugging Face ViT / DINOv2 folders) load through
timm's filters, position embeddings resampled from the native grid; each then runs a SMAT task and a
meta-test episode. Fixtures: tests/unit/official_weights.py (written from the producers' code)."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from smat_dist.build import build_local
from smat_dist.config.schema import EvalConfig, MethodConfig, ModelConfig
from smat_dist.data.episodes import Episode
from smat_dist.eval.protocol import Evaluator
from smat_dist.model.backbone import build_backbone
from smat_dist.model.weights import WeightsError, hf_to_original
from smat_dist.train.step import smat_step
from tests.unit import official_weights as ow


def _episode(size: int, ways: int = 2, shots: int = 2, queries: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(ways).repeat_interleave(shots)
    yq = torch.arange(ways).repeat_interleave(queries)
    base = torch.randn(ways, 3, size, size, generator=g)
    sup = base[ys] + 0.3 * torch.randn(len(ys), 3, size, size, generator=g)
    qry = base[yq] + 0.3 * torch.randn(len(yq), 3, size, size, generator=g)
    return Episode(sup, ys, qry, yq, "synthetic", "test", seed, ways, [str(i) for i in range(ways)])


def smat_task_and_meta_test(cfg: ModelConfig) -> None:
    """One SMAT training task on the loaded backbone, then one meta-test episode (zero-shot and LoRA)."""
    s = build_local(cfg, MethodConfig(experts=2, warmup_tasks=0, total_tasks=100), seed=0)
    before = s.fb.theta_pre.clone()
    out = smat_step(s.method, s.pool, s.hyper, [_episode(cfg.image_size)], 0, 0)
    assert torch.isfinite(torch.tensor(out["loss/task"])), out
    assert 0.0 <= out["acc/query"] <= 1.0 and torch.isfinite(torch.tensor(out["loss/kd_dense"]))
    assert torch.equal(s.fb.theta_pre, before)  # the pre-trained weights stay frozen
    ep = _episode(cfg.image_size, seed=1)
    with Evaluator(s, EvalConfig(finetune_steps=1, lora_rank=2, lora_alpha=4)) as ev:
        for mode in ("zeroshot", "lora"):
            acc = ev.accuracy(ep, mode, 1e-4, seed=0)
            assert 0.0 <= acc <= 1.0


def _resampled(grid: torch.Tensor, size: int) -> torch.Tensor:
    """timm's resample_abs_pos_embed on a [1, n*n, D] grid: bicubic with antialias."""
    n, d = int(grid.shape[1] ** 0.5), grid.shape[-1]
    g = grid.reshape(1, n, n, d).permute(0, 3, 1, 2)
    return F.interpolate(g, size=(size, size), mode="bicubic", antialias=True, align_corners=False
                         ).permute(0, 2, 3, 1).reshape(1, size * size, d)


# ---------------------------------------------------------------- DINOv2


def _dinov2_cfg(path, name="vit_small_patch14_dinov2", dim=32, heads=2, size=28, **kw) -> ModelConfig:
    return ModelConfig(name=name, image_size=size, patch_size=None, pretrained=str(path),
                       kwargs={"depth": 2, "embed_dim": dim, "num_heads": heads, **kw})


def test_dinov2_pretrain_pth_loads_with_pos_embed_resampled_from_518(tmp_path):
    sd = ow.dinov2_state(dim=32)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    cfg = _dinov2_cfg(path, size=56)  # 4 x 4 patches of 14 px
    own = build_backbone(cfg).state_dict()
    assert "mask_token" not in own
    assert own["pos_embed"].shape == (1, 1 + 16, 32)
    assert torch.equal(own["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # the class token's position is kept
    assert torch.allclose(own["pos_embed"][:, 1:], _resampled(sd["pos_embed"][:, 1:], 4), atol=1e-5)
    assert own["patch_embed.proj.weight"].shape == (32, 3, 14, 14)  # the model's own patch size, not re-patched
    for k in ("blocks.1.ls1.gamma", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(own[k], sd[k]), k
    smat_task_and_meta_test(_dinov2_cfg(path))


def test_dinov2_with_registers_loads_into_the_reg4_model(tmp_path):
    sd = ow.dinov2_state(dim=32, registers=4)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, path)
    own = build_backbone(_dinov2_cfg(path, name="vit_small_patch14_reg4_dinov2", size=56)).state_dict()
    # timm's no_embed_class form: the class token absorbs its position, the registers have none
    assert torch.allclose(own["cls_token"], sd["cls_token"] + sd["pos_embed"][:, 0])
    assert torch.equal(own["reg_token"], sd["register_tokens"])
    assert torch.allclose(own["pos_embed"], _resampled(sd["pos_embed"][:, 1:], 4), atol=1e-5)
    smat_task_and_meta_test(_dinov2_cfg(path, name="vit_small_patch14_reg4_dinov2"))


def test_register_mismatch_is_one_clear_error(tmp_path):
    """The issue's case: a register file into the plain model (timm's filter would die in a reshape)."""
    reg, plain = tmp_path / "dinov2_vits14_reg4_pretrain.pth", tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(ow.dinov2_state(registers=4), reg)
    torch.save(ow.dinov2_state(), plain)
    with pytest.raises(WeightsError, match=r"reg4_pretrain\.pth.*unexpected \['register_tokens'\]; .*4 register "
                                           r"tokens.*reg4_dinov2"):
        build_backbone(_dinov2_cfg(reg))
    with pytest.raises(WeightsError, match=r"dinov2_vits14_pretrain\.pth.*model has 4 register tokens"):
        build_backbone(_dinov2_cfg(plain, name="vit_small_patch14_reg4_dinov2"))


def test_dinov2_giant_swiglu_loads(tmp_path):
    sd = ow.dinov2_state(dim=48, swiglu=True)  # SwiGLUFFNFused: hidden (int(4*48*2/3)+7)//8*8 = 128
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(sd, path)
    cfg = _dinov2_cfg(path, name="vit_giant_patch14_dinov2", dim=48)
    own = build_backbone(cfg).state_dict()
    assert torch.equal(own["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.w12.weight"])
    assert torch.equal(own["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.w3.weight"])
    smat_task_and_meta_test(cfg)
    # the same file into the plain-MLP model: refused, naming the keys and what the file is
    msg = r"shape mismatch.*'blocks\.0\.mlp\.fc1\.weight', \(256, 48\), \(192, 48\).*vit_giant_patch14_dinov2"
    with pytest.raises(WeightsError, match=msg):
        build_backbone(_dinov2_cfg(path, dim=48))


@pytest.mark.parametrize("name,dim,heads", [("vit_base_patch14_dinov2", 64, 4), ("vit_large_patch14_dinov2", 64, 4),
                                            ("vit_base_patch14_reg4_dinov2", 64, 4),
                                            ("vit_large_patch14_reg4_dinov2", 64, 4)])
def test_dinov2_base_and_large_layouts_load(tmp_path, name, dim, heads):
    """B and L differ from S only in width/depth: the same layout at their own timm names (narrowed)."""
    sd = ow.dinov2_state(dim=dim, registers=4 if "reg4" in name else 0)
    path = tmp_path / "dinov2.pth"
    torch.save(sd, path)
    own = build_backbone(_dinov2_cfg(path, name=name, dim=dim, heads=heads)).state_dict()
    assert torch.equal(own["blocks.1.attn.proj.weight"], sd["blocks.1.attn.proj.weight"])


def test_dinov2_training_teacher_checkpoint_with_chunked_blocks(tmp_path):
    sd = ow.dinov2_state(dim=32, depth=4)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(ow.dinov2_teacher_checkpoint(sd, chunks=2), path)
    cfg = ModelConfig(name="vit_small_patch14_dinov2", image_size=28, patch_size=None, pretrained=str(path),
                      kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2})
    own = build_backbone(cfg).state_dict()
    for i in range(4):
        assert torch.equal(own[f"blocks.{i}.norm1.weight"], sd[f"blocks.{i}.norm1.weight"]), i


# ---------------------------------------------------------------- DINOv3, EVA-02, SigLIP 2


def test_dinov3_official_pth_loads_and_pools_the_class_token(tmp_path):
    sd = ow.dinov3_state(dim=64, heads=2)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(sd, path)
    cfg = ModelConfig(name="vit_small_patch16_dinov3_qkvb", image_size=32, patch_size=None, pretrained=str(path),
                      kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2})
    bb = build_backbone(cfg)
    own = bb.state_dict()
    assert torch.equal(own["reg_token"], sd["storage_tokens"])
    assert torch.equal(own["blocks.0.gamma_1"], sd["blocks.0.ls1.gamma"])
    q, _, v = sd["blocks.1.attn.qkv.bias"].chunk(3)
    assert torch.equal(own["blocks.1.attn.q_bias"], q) and torch.equal(own["blocks.1.attn.v_bias"], v)
    # the pooled feature is the normalised class token (upstream's x_norm_clstoken), not the storage tokens
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = bb.forward_features(x)
        assert torch.allclose(bb(x), tokens[:, 0], atol=1e-6)
        assert bb.num_prefix_tokens == 5
    smat_task_and_meta_test(cfg)


def test_eva02_mim_checkpoint_loads(tmp_path):
    ck = ow.eva02_mim_checkpoint(dim=48, heads=2)
    path = tmp_path / "eva02_Ti_pt_in21k_p14.pt"
    torch.save(ck, path)
    cfg = ModelConfig(name="eva02_tiny_patch14_224", image_size=28, patch_size=None, pretrained=str(path),
                      kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2})
    own = build_backbone(cfg).state_dict()
    sd = ck["model"]
    assert torch.equal(own["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.w12.weight"])
    assert torch.equal(own["blocks.1.attn.q_bias"], sd["blocks.1.attn.q_bias"])
    assert torch.equal(own["fc_norm.weight"], sd["norm.weight"])  # timm's choice for MIM weights + avg pooling
    assert own["pos_embed"].shape == (1, 1 + 4, 48)
    smat_task_and_meta_test(cfg)


def _siglip_cfg(path, size=32) -> ModelConfig:
    return ModelConfig(name="vit_base_patch16_siglip_224", image_size=size, patch_size=None, pretrained=str(path),
                       kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})


def _siglip_source() -> dict[str, torch.Tensor]:
    """The timm SigLIP 2 release at its native 224 px (196 positions, no class token)."""
    src = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0, depth=2, embed_dim=32,
                            num_heads=2)
    torch.nn.init.normal_(src.pos_embed, std=0.5)
    torch.nn.init.normal_(src.attn_pool.latent, std=0.5)
    return src.state_dict()


def test_siglip2_timm_safetensors_pools_with_its_attention_head(tmp_path):
    from safetensors.torch import save_file

    sd = _siglip_source()
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    bb = build_backbone(_siglip_cfg(path))
    own = bb.state_dict()
    assert torch.equal(own["attn_pool.latent"], sd["attn_pool.latent"])
    assert torch.allclose(own["pos_embed"], _resampled(sd["pos_embed"], 2), atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb(x), bb.attn_pool(bb.forward_features(x)), atol=1e-6)
    smat_task_and_meta_test(_siglip_cfg(path))


def test_siglip2_open_clip_file_loads_its_image_tower(tmp_path):
    sd = _siglip_source()
    ck = {f"visual.trunk.{k}": v for k, v in sd.items()}
    ck.update({"text.token_embedding.weight": torch.zeros(10, 32), "text.transformer.resblocks.0.ln_1.weight":
               torch.ones(32), "logit_scale": torch.tensor(2.3), "logit_bias": torch.tensor(-10.0)})
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ck, path)
    own = build_backbone(_siglip_cfg(path)).state_dict()
    assert torch.equal(own["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


# ---------------------------------------------------------------- timm and Hugging Face files


def test_timm_safetensors_loads(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                            depth=2)
    sd = src.state_dict()  # with its classifier: dropped for the feature extractor
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    cfg = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, pretrained=str(path),
                      kwargs={"depth": 2})
    own = build_backbone(cfg).state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in own)
    smat_task_and_meta_test(cfg)


def test_hf_vit_folder_loads_and_matches_the_original(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=32,
                            num_heads=2)
    torch.nn.init.normal_(src.pos_embed, std=0.5)
    sd = src.state_dict()
    folder = ow.write_hf_folder(tmp_path / "vit-hf", ow.hf_from_original(sd, "vit"),
                                ow.hf_config("vit", 32, 2, 2, 224, 16))
    cfg = ModelConfig(name="vit_tiny_patch16_224", image_size=224, patch_size=None, pretrained=str(folder),
                      kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    bb = build_backbone(cfg)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(bb(x), src(x), atol=1e-5)  # qkv concatenated in timm's q, k, v order
    # ViTForImageClassification nests the model under `vit.` and adds a classifier
    task = ow.hf_from_original(sd, "vit")
    task = {**{"vit." + k: v for k, v in task.items() if not k.startswith("pooler.")},
            "classifier.weight": torch.zeros(5, 32), "classifier.bias": torch.zeros(5)}
    folder2 = ow.write_hf_folder(tmp_path / "vit-cls", task, ow.hf_config("vit", 32, 2, 2, 224, 16))
    cfg2 = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=None, pretrained=str(folder2),
                       kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    assert torch.equal(build_backbone(cfg2).state_dict()["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.weight"])
    smat_task_and_meta_test(cfg2)


@pytest.mark.parametrize("registers,swiglu", [(0, False), (4, False), (0, True)])
def test_hf_dinov2_folder_loads(tmp_path, registers, swiglu):
    dim = 48 if swiglu else 32
    sd = ow.dinov2_state(dim=dim, registers=registers, swiglu=swiglu)
    kind = "dinov2_with_registers" if registers else "dinov2"
    folder = ow.write_hf_folder(tmp_path / "dinov2-hf", ow.hf_from_original(sd, "dinov2"),
                                ow.hf_config(kind, dim, 2, 2, 518, 14, registers, swiglu))
    name = ("vit_giant_patch14_dinov2" if swiglu else
            "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2")
    # the same weights from the original .pth give the same backbone
    pth = tmp_path / "orig.pth"
    torch.save(sd, pth)
    a = build_backbone(_dinov2_cfg(folder, name=name, dim=dim)).state_dict()
    b = build_backbone(_dinov2_cfg(pth, name=name, dim=dim)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not registers and not swiglu:
        smat_task_and_meta_test(_dinov2_cfg(folder, name=name, dim=dim))


def test_hf_folder_errors_name_keys_and_the_model(tmp_path):
    sd = ow.dinov2_state(dim=384, depth=1)
    hf = ow.hf_from_original(sd, "dinov2")
    folder = ow.write_hf_folder(tmp_path / "dinov2-small", hf, ow.hf_config("dinov2", 384, 1, 6, 518, 14))
    with pytest.raises(WeightsError, match=r"dinov2-small.*config\.json describes vit_small_patch14_dinov2"):
        build_backbone(_dinov2_cfg(folder, name="vit_base_patch14_dinov2", dim=768, heads=12))
    with pytest.raises(WeightsError, match=r"no mapping for keys \['encoder\.layer\.0\.attention\.extra"):
        hf_to_original({**hf, "encoder.layer.0.attention.extra.weight": torch.zeros(1)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty.*without model.safetensors"):
        build_backbone(_dinov2_cfg(tmp_path / "empty"))


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match=r"image_size=84 is not a multiple of .*patch size 16.*use 80 or 96"):
        build_backbone(ModelConfig(name="vit_tiny_patch16_224", image_size=84, patch_size=None, kwargs={"depth": 1}))


def test_block_checkpointing_passes_rope_to_eva_blocks():
    """EVA / DINOv3 blocks take rope= from the model: the checkpointing wrapper passes it on, same gradients."""
    from smat_dist.model.backbone import FunctionalBackbone

    base = dict(name="vit_small_patch16_dinov3_qkvb", image_size=32, patch_size=None,
                kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2})
    torch.manual_seed(0)
    plain = FunctionalBackbone(build_backbone(ModelConfig(**base)))
    torch.manual_seed(0)
    ck = FunctionalBackbone(build_backbone(ModelConfig(**base, checkpoint_blocks=True)))
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for fb in (plain, ck):
        theta = fb.theta_pre.clone().requires_grad_(True)
        fb(theta, x).square().sum().backward()
        grads.append(theta.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and float(grads[0].abs().sum()) > 0


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs" / "model").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_model_configs_build_at_their_own_patch_size(path):
    """Every model config names a timm model that builds at its image size (one block, to stay fast); the
    ViT-L/G and DINOv2 configs keep the model's own patch size, so real weights load without re-patching."""
    import yaml

    c = yaml.safe_load(path.read_text())
    if path.stem in ("vit_large", "vit_giant", "user_checkpoint") or path.stem.startswith("dinov2"):
        assert c["patch_size"] is None, c  # build_backbone refuses an image size off the patch grid
    cfg = ModelConfig(name=c["name"], image_size=c["image_size"], patch_size=c["patch_size"],
                      pretrained=c["pretrained"] if str(c["pretrained"]).startswith("package:") else None,
                      kwargs={"depth": 1} if "efficientnet" not in c["name"] else {})
    bb = build_backbone(cfg)
    if path.stem.startswith("dinov2"):
        assert bb.patch_embed.patch_size == (14, 14) and bb.patch_embed.grid_size == (16, 16)
        regs = 4 if path.stem.endswith("_reg") else 0
        assert ("reg4" in c["name"]) == bool(regs) and bb.num_reg_tokens == regs
