"""The planner: exact parameter, pool and hypernetwork counts; the bench CLI's plan and argument errors."""
from __future__ import annotations

import json

import pytest
import torch

from smat_dist.bench.cli import main
from smat_dist.bench.plan import backbone_shape, hypernet_params, parse_kv, plan, sent_bytes_per_task
from smat_dist.build import build_local
from smat_dist.config.schema import HypernetConfig, MethodConfig, ModelConfig
from smat_dist.method.hypernet import HyperNetwork

TINY = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 2})


def test_meta_count_equals_real_model():
    setup = build_local(TINY, MethodConfig(name="smat", experts=5), seed=0)
    shape = backbone_shape(TINY)
    assert shape["params"] == setup.fb.space.numel and shape["feature_dim"] == setup.fb.feature_dim
    assert hypernet_params(shape["feature_dim"], 5) == sum(p.numel() for p in setup.method.hypernet.parameters())
    assert hypernet_params(64, 3) == sum(p.numel() for p in HyperNetwork(64, 3, HypernetConfig()).parameters())
    p = plan(TINY.name, experts=5, ranks=1, image_size=32, patch_size=8, kwargs={"depth": 2})
    pool = setup.pool.shard
    assert p["memory_bytes"]["pool_params"] == 4 * (pool.delta.numel() + pool.log_alpha.numel())


def test_pool_shrinks_with_ranks_and_sharded_bytes_do_not_grow_with_experts():
    a = plan("vit_tiny_patch16_224", experts=64, ranks=1)
    b = plan("vit_tiny_patch16_224", experts=64, ranks=2)
    assert b["memory_bytes"]["pool_params"] <= 0.5001 * a["memory_bytes"]["pool_params"]
    P = a["params"]
    assert sent_bytes_per_task(P, 64, 2, "sharded") / sent_bytes_per_task(P, 4, 2, "sharded") < 1.001
    assert sent_bytes_per_task(P, 64, 2, "gather") / sent_bytes_per_task(P, 4, 2, "gather") > 10


def test_zero3_path_in_the_plan_matches_what_deepspeed_moved():
    # smat-bench scale --paths zero3, ViT-Ti 84 px, 2 ranks: DeepSpeed's comms logger counted these all-gather +
    # reduce-scatter bytes per task (docs/deepspeed.md); the formula gives them to the byte
    for m, measured in ((4, 108_633_600), (16, 369_354_240)):
        assert plan("vit_tiny_patch16_224", experts=m, ranks=2)["sent_bytes_per_task"]["zero3"] == measured
    L = plan("vit_large_patch16_224", experts=256, ranks=64, image_size=224, act_bytes=2, checkpoint_blocks=True)
    sent, peak = L["sent_bytes_per_task"], L["peak_bytes"]
    # per task, zero3 moves every expert's logits twice: ~2(M+1)P*4 against the sharded merge's ~4P
    assert sent["zero3"] > 100 * sent["sharded"]
    # the gathered [P, M] logits alone (4PM bytes) exceed any device: the three paths' peaks in order
    assert peak["zero3"] > peak["gather"] > 4 * L["params"] * 256 > 10 * peak["sharded"]


def test_plan_reaches_vit_giant_without_allocating():
    p = plan("vit_giant_patch14_224", experts=256, ranks=64, zero_stage=3, image_size=224)
    assert 1.0e9 < p["params"] < 1.1e9 and p["mask_logits_total"] == p["params"] * 256
    assert p["peak_bytes"]["gather"] > p["peak_bytes"]["sharded"]
    z0 = plan("vit_giant_patch14_224", experts=256, ranks=64, zero_stage=0, image_size=224)
    assert p["memory_bytes"]["replicated_total"] < z0["memory_bytes"]["replicated_total"]


def test_cli_plan_and_bad_keys(capsys):
    assert main(["plan", "model=vit_tiny_patch16_224", "experts=4", "ranks=2", "zero_stage=1", "image_size=32",
                 "patch_size=8", "depth=1"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["experts"] == 4 and row["ranks"] == 2 and row["depth"] == 1
    assert main(["plan", "modle=vit"]) == 2
    assert "modle" in capsys.readouterr().err
    with pytest.raises(ValueError, match="key=value"):
        parse_kv(["experts"])


def test_scale_auto_depth_sizes_the_sharded_path_and_skips_gather_points_that_do_not_fit():
    from smat_dist.bench.scale import _auto_depth

    kw = dict(image_size=84, batch_images=150)
    sharded = plan("vit_tiny_patch16_224", experts=256, ranks=1, **kw)["peak_bytes"]
    assert sharded["gather"] > sharded["sharded"]
    budget = (sharded["sharded"] + sharded["gather"]) // 2
    # the full model fits on the sharded path: no truncation, although gather at M=256 does not fit
    assert _auto_depth("vit_tiny_patch16_224", 84, [4, 256], [1], ["sharded", "gather"], budget, 150) is None
    # below the sharded path's need, the model is truncated to a depth at which it fits
    d = _auto_depth("vit_tiny_patch16_224", 84, [4, 256], [1], ["sharded", "gather"], sharded["sharded"] // 2, 150)
    assert d is not None and 1 <= d < 12
    assert plan("vit_tiny_patch16_224", experts=256, ranks=1, kwargs={"depth": d}, **kw)["peak_bytes"]["sharded"] \
        <= sharded["sharded"] // 2 or d == 1
    # the lean pool needs less, so it keeps more depth
    dl = _auto_depth("vit_tiny_patch16_224", 84, [4, 256], [1], ["sharded"], sharded["sharded"] // 2, 150, lean=True)
    assert dl is None or dl >= d


@pytest.mark.parametrize("name,kw", [("vit_tiny_patch16_224", {"depth": 3}), ("efficientnet_lite0", {})])
def test_top_teacher_plan_counts_the_tensors_the_teacher_adapts(name, kw):
    from smat_dist.method.teacher import top_layout
    from smat_dist.model.backbone import FunctionalBackbone, build_backbone

    ps = 8 if "vit" in name else None
    fb = FunctionalBackbone(build_backbone(ModelConfig(name=name, image_size=32, patch_size=ps, pretrained=None,
                                                       kwargs=kw)))
    sizes = {i.name: i.numel for i in fb.space.infos}
    common = dict(image_size=32, patch_size=ps, kwargs=kw)
    whole, top = plan(name, **common), plan(name, teacher_top_fraction=0.25, **common)
    adapted = sum(sizes[n] for n in top_layout(fb, 0.25).names)
    assert top["teacher_top_params"] == adapted < whole["teacher_top_params"] == fb.space.numel
    saved = 4 * (whole["padded"] - adapted)
    for key in ("task_weights", "task_grads"):
        assert whole["memory_bytes"][key] - top["memory_bytes"][key] == saved
    assert parse_kv(["teacher_top_fraction=0.25"]) == {"teacher_top_fraction": 0.25}
    with pytest.raises(ValueError, match="choose one"):
        plan(name, teacher_top_fraction=0.25, teacher_blockwise=True, **common)


def test_plan_activations_follow_precision_and_block_checkpointing_and_match_real_saved_tensors():
    """The activations are what autograd keeps (counted on meta); bf16 halves them, checkpointed blocks keep
    only the blocks' inputs; P>M>F is planned beside SMAT; the buffers outside the sums are stated."""
    from smat_dist.bench.plan import backbone_shape, saved_activations
    from smat_dist.bench.step import model_config
    from smat_dist.model.backbone import build_backbone

    kw = dict(model="vit_tiny_patch16_224", experts=4, image_size=32, patch_size=8, kwargs={"depth": 2})
    full, bf16, ckpt = plan(**kw), plan(**kw, precision="bf16"), plan(**kw, checkpoint_blocks=True)
    a = full["memory_bytes"]["activations_per_image"]
    assert bf16["memory_bytes"]["activations_per_image"] == a // 2 and bf16["precision"] == "bf16"
    assert ckpt["memory_bytes"]["activations_per_image"] < a / 3
    assert full["peak_bytes"]["pmf"] < full["peak_bytes"]["sharded"]
    assert full["eval_masks_bytes"] == full["memory_bytes"]["pool_masks"]
    # the meta count against the storages a real CPU forward saves (within 20%: views the meta device cannot
    # tell apart are counted twice there)
    mc = model_config("vit_tiny_patch16_224", 32, 8)
    mc.kwargs = {**mc.kwargs, "depth": 2}
    model = build_backbone(mc)
    for p in model.parameters():
        p.requires_grad_(True)      # the meta count's setting: a graph through every layer
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(1, 3, 32, 32))
    real = sum(seen.values())
    assert real <= backbone_shape(mc)["saved_bytes_per_image"] <= 1.2 * real
    assert saved_activations(model.to("meta"), (32, 32))["saved_bytes_per_image"] == backbone_shape(mc)[
        "saved_bytes_per_image"]
