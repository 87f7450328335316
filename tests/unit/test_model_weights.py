"""Pre-trained weights from local files: the packaged EfficientNet-Lite0, timm-format and DINO-format ViT
checkpoints (with position-embedding / patch-kernel resampling), and clear errors for bad files."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch

from smat_dist.config.schema import ModelConfig
from smat_dist.model.backbone import build_backbone
from smat_dist.model.weights import WeightsError, load_pretrained

# ImageNet-1k classes of buildings: sklearn's china.jpg is a temple roof
BUILDINGS = {442: "bell cote", 497: "church", 538: "dome", 663: "monastery", 668: "mosque", 698: "palace",
             832: "stupa", 483: "castle", 449: "boathouse"}


def _vit(img: int, patch: int, depth: int = 2, **kw):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img,
                             patch_size=patch, depth=depth, dynamic_img_size=False, **kw)


def test_packaged_efficientnet_lite0_predicts_imagenet_classes():
    sk = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    m = timm.create_model("efficientnet_lite0", pretrained=False)  # with its 1000-class classifier
    load_pretrained(m, "package:efficientnet_lite0")
    m.eval()
    img = sk.load_sample_image("china.jpg")
    x = torch.tensor(np.asarray(Image.fromarray(img).resize((224, 224)))).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        p = m(x[None]).softmax(-1)[0]
    top = int(p.argmax())
    assert top in BUILDINGS and float(p[top]) > 0.1, (top, float(p[top]))
    # the backbone the method uses (no classifier) gets the same trunk: its features are the pre-logits
    bb = build_backbone(ModelConfig(name="efficientnet_lite0", image_size=224, patch_size=None,
                                    pretrained="package:efficientnet_lite0"))
    with torch.no_grad():
        assert torch.allclose(bb(x[None]), m.forward_head(m.forward_features(x[None]), pre_logits=True), atol=1e-5)


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "nope" / "dino_vits16.pth"
    with pytest.raises(WeightsError, match="dino_vits16.pth"):
        build_backbone(ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, pretrained=str(path),
                                   kwargs={"depth": 2}))


def test_unreadable_and_non_state_dict_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="corrupt.pth"):
        load_pretrained(_vit(32, 8), str(bad))
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(WeightsError, match="tensor.pth.*state dict"):
        load_pretrained(_vit(32, 8), str(tensor_only))


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "depth2.pth"
    torch.save(_vit(32, 8, depth=2).state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing \['blocks\.2\.") as e:
        load_pretrained(_vit(32, 8, depth=3), str(path))
    assert "depth2.pth" in str(e.value)
    mismatch = r"shape mismatch \(key, file, model\) \[\('cls_token', \(1, 1, 192\), \(1, 1, 96\)\)"
    with pytest.raises(WeightsError, match=mismatch) as e:
        load_pretrained(_vit(32, 8, embed_dim=96, num_heads=3), str(path))
    # a packaged CNN into the wrong backbone: refused, naming the tensor
    with pytest.raises(WeightsError, match="efficientnet-lite0.*247 tensors for a model with"):
        load_pretrained(timm.create_model("efficientnet_lite1", num_classes=0), "package:efficientnet_lite0")
    with pytest.raises(WeightsError, match="package:resnet50"):
        load_pretrained(_vit(32, 8), "package:resnet50")


def test_timm_checkpoint_from_other_patch_and_image_size_is_resampled(tmp_path):
    src = _vit(64, 16)  # 4x4 grid, 16 px kernels
    torch.nn.init.normal_(src.pos_embed, std=0.5)
    sd = src.state_dict()
    path = tmp_path / "vit_64px_p16.pth"
    # timm training checkpoints nest the weights under "state_dict" (DDP adds "module.")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    bb = build_backbone(ModelConfig(name="vit_tiny_patch16_224", image_size=48, patch_size=8, pretrained=str(path),
                                    kwargs={"depth": 2}))  # 6x6 grid, 8 px kernels
    own = bb.state_dict()
    assert own["patch_embed.proj.weight"].shape == (192, 3, 8, 8)
    assert own["pos_embed"].shape == (1, 1 + 36, 192)
    assert torch.equal(own["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # the class token's embedding is kept
    # the grid is interpolated, not re-initialised: its values follow the source's
    grid = own["pos_embed"][0, 1:].reshape(6, 6, 192)
    src_grid = sd["pos_embed"][0, 1:].reshape(4, 4, 192)
    assert torch.allclose(grid[0, 0], src_grid[0, 0], atol=0.35 * float(src_grid.std()) * 3)
    assert float(torch.corrcoef(torch.stack([grid.mean((0, 1)), src_grid.mean((0, 1))]))[0, 1]) > 0.9
    for k in ("cls_token", "patch_embed.proj.bias", "blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "norm.weight"):
        assert torch.equal(own[k], sd[k]), k
    # resampling the kernel keeps the patch projection of a correspondingly downsampled image (PI-resize)
    smooth = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)),
                                             size=16, mode="bilinear", align_corners=False)
    x = smooth  # a smooth image survives 2x downsampling, so both projections see the same content
    x_small = torch.nn.functional.interpolate(x, size=8, mode="bilinear", antialias=True, align_corners=False)
    big = torch.nn.functional.conv2d(x, sd["patch_embed.proj.weight"], stride=16)
    small = torch.nn.functional.conv2d(x_small, own["patch_embed.proj.weight"], stride=8)
    assert float(torch.corrcoef(torch.stack([big.flatten(), small.flatten()]))[0, 1]) > 0.9


def _dino_state(depth: int = 2, dim: int = 192, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys and shapes exactly as DINO's vision_transformer.VisionTransformer (224 px, patch 16)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 197, dim), "patch_embed.proj.weight": (dim, 3, 16, 16),
              "patch_embed.proj.bias": (dim,), "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _tiny_vit_from(path):
    """The 2-block ViT-Ti at 32 px the DINO state dicts above fit, with weights from `path`."""
    return build_backbone(ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, pretrained=str(path),
                                      kwargs={"depth": 2}))


def test_dino_pretrain_pth_loads(tmp_path):
    sd = _dino_state()
    path = tmp_path / "dino_deittiny16_pretrain.pth"
    torch.save(sd, path)
    bb = _tiny_vit_from(path)
    own = bb.state_dict()
    assert torch.equal(own["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    assert torch.equal(own["norm.bias"], sd["norm.bias"])
    assert own["pos_embed"].shape == (1, 17, 192) and own["patch_embed.proj.weight"].shape == (192, 3, 8, 8)


def test_dino_full_training_checkpoint_loads_the_teacher(tmp_path):
    teacher, student = _dino_state(seed=1), _dino_state(seed=2)
    ck = {"teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                      "head.mlp.0.weight": torch.zeros(8, 192), "head.last_layer.weight_g": torch.ones(16, 1)},
          "student": {f"module.backbone.{k}": v for k, v in student.items()},
          "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
          # main_dino.py saves its argparse namespace alongside the weights
          "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005, use_fp16=True,
                                     global_crops_scale=(0.4, 1.0), output_dir="/out")}
    path = tmp_path / "checkpoint.pth"
    torch.save(ck, path)
    bb = _tiny_vit_from(path)
    own = bb.state_dict()
    assert torch.equal(own["blocks.1.mlp.fc1.weight"], teacher["blocks.1.mlp.fc1.weight"])
    assert not torch.equal(own["blocks.1.mlp.fc1.weight"], student["blocks.1.mlp.fc1.weight"])
    assert all(not p.requires_grad for p in bb.parameters()) and not bb.training
