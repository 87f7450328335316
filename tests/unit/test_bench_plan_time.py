"""The planned time per step: exact FLOP count, the methods' work units, and the sum and scaling of its parts."""
from __future__ import annotations

import json

import pytest

from smat_dist.bench.cli import main
from smat_dist.bench.plan import backbone_shape, model_config, plan
from smat_dist.bench.plan_time import PRESETS, device_for, measure_cpu, work_images

TINY = dict(model="vit_tiny_patch16_224", experts=4, image_size=32, patch_size=8, kwargs={"depth": 2})


def test_vit_tiny_flops_equal_the_analytic_count_from_its_shapes():
    # ViT-Ti at 84 px, patch 12: 7 x 7 patches + the class token, width 192, 12 blocks, MLP ratio 4, no head
    shape = backbone_shape(model_config("vit_tiny_patch16_224", 84))
    d, blocks, patches, k = 192, 12, 49, 12
    n = patches + 1
    patch_embed = 2 * patches * d * (3 * k * k)
    qkv, proj, mlp = 2 * n * d * 3 * d, 2 * n * d * d, 2 * 2 * n * d * 4 * d
    attention = 2 * (2 * n * n * d)                 # q k^T and attn v over all heads
    analytic = patch_embed + blocks * (qkv + proj + mlp + attention)
    # The counter counts matmuls, convolutions and attention exactly as derived here (difference 0); the norms,
    # softmax, GELU and residual adds it leaves out are elementwise, not part of either count.
    assert abs(shape["flops_per_image"] - analytic) <= 0.01 * analytic
    assert shape["flops_per_image"] == analytic == 562_010_112


def test_work_units_of_smat_and_pmf():
    assert work_images(50, 100, "smat") == 1000 and work_images(50, 100, "pmf") == 450
    assert work_images(50, 100, "smat", top_fraction=0.25, tasks=2) == 2 * (300 + 4.75 * 100)
    with pytest.raises(ValueError, match="smat or pmf"):
        work_images(50, 100, "maml")


def test_step_time_is_the_sum_of_its_parts_and_scales_with_the_rates():
    a = plan(**TINY, ranks=2, device="h100")
    for path in ("sharded", "gather", "zero3", "pmf"):
        parts = a["plan_compute_s"][path] + a["plan_pool_s"][path] + a["plan_comm_s"][path]
        assert a["plan_step_s"][path] == pytest.approx(parts, rel=1e-12) and a["plan_comm_s"][path] > 0
    assert a["work_images"] == {"smat": 1000, "pmf": 450} and (a["support_images"], a["query_images"]) == (50, 100)
    assert a["plan_compute_s"]["sharded"] == pytest.approx(a["flops_per_image"] * 1000 / (989e12 * 0.4))
    b = plan(**TINY, ranks=2, device="h100", mfu=0.8, mem_gbps=2 * PRESETS["h100"].mem_gbps)
    assert b["plan_compute_s"]["sharded"] == pytest.approx(a["plan_compute_s"]["sharded"] / 2)
    assert b["plan_pool_s"]["sharded"] == pytest.approx(a["plan_pool_s"]["sharded"] / 2)
    assert b["plan_comm_s"] == a["plan_comm_s"]
    # the gathered paths gate all P rows, the sharded one its n = P / R; P>M>F has no pool
    assert a["plan_pool_s"]["gather"] == pytest.approx(2 * a["plan_pool_s"]["sharded"], rel=1e-3)
    assert a["plan_pool_s"]["pmf"] == 0
    one = plan(**TINY, ranks=1, support=25, query=50)
    assert one["batch_images"] == 75 and all(v == 0 for v in one["plan_comm_s"].values())
    assert one["plan_compute_s"]["pmf"] == pytest.approx(a["plan_compute_s"]["pmf"] / 2)
    kept = plan(**TINY, ranks=1, release_masks=False)
    assert kept["plan_pool_s"]["sharded"] == pytest.approx(one["plan_pool_s"]["sharded"] * 30 / 35)


def test_cpu_rates_are_measured_and_arguments_checked():
    d = measure_cpu(seconds=0.1, size=128, copy_mb=8)
    assert d.name == "cpu" and d.mfu == 1.0 and d.peak_tflops > 0 and d.mem_gbps > 0
    with pytest.raises(ValueError, match="device='v100'"):
        device_for("v100")
    with pytest.raises(ValueError, match="mfu"):
        device_for("a100", mfu=1.5)
    with pytest.raises(ValueError, match="support and query together"):
        plan(**TINY, support=50)
    with pytest.raises(ValueError, match="support and query together"):
        plan(**TINY, support=50, query=100, batch_images=120)


def test_cli_plan_takes_the_device_and_rates(capsys):
    assert main(["plan", "model=vit_tiny_patch16_224", "experts=4", "image_size=32", "patch_size=8", "depth=1",
                 "device=a100", "mfu=0.5", "support=10", "query=20"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert (row["device"], row["mfu"], row["peak_tflops"], row["batch_images"]) == ("a100", 0.5, 312.0, 30)
    assert main(["plan", "mfu=high"]) == 2
    assert "mfu=high" in capsys.readouterr().err
