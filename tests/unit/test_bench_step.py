"""The step bench: its timed copy of a SMAT step is the real step, passes are counted, and a row has every field."""
from __future__ import annotations

import pytest
import torch

from smat_dist.bench.step import Timer, bench_model, count_passes, smat_step_breakdown, synthetic_episode
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.method.build import build_local
from smat_dist.train.step import dense_step, smat_step

TINY = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 2})


def _eps():
    return [synthetic_episode(3, 2, 2, 32, seed=1, index=i) for i in range(2)]


def test_breakdown_copy_is_the_real_step():
    """Same losses, same updated pool and hypernetwork as smat_step: the breakdown cannot drift from the method."""
    real = build_local(TINY, MethodConfig(name="smat", experts=3), seed=0)
    copy = build_local(TINY, MethodConfig(name="smat", experts=3), seed=0)
    out = smat_step(real.method, real.merger, real.pool, real.pool_opt, real.hyper_opt, _eps(), 5, 5, 1, lambda t: t)
    timer = Timer(torch.device("cpu"))
    res = smat_step_breakdown(copy, _eps(), 5, 5, timer)
    assert abs(out["loss/task"] - sum(res["losses"]) / 2) < 1e-6
    torch.testing.assert_close(copy.pool.delta, real.pool.delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(copy.pool.log_alpha, real.pool.log_alpha, rtol=0, atol=1e-6)
    for a, b in zip(copy.method.parameters(), real.method.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert {"frozen_pass", "merge", "support_pass", "inner_grad", "query_pass", "teacher_grad", "teacher_eval",
            "outer_backward", "mask_backward", "pool_terms", "optimisers"} <= set(timer.s)


def test_passes_are_counted_not_assumed():
    smat = build_local(TINY, MethodConfig(name="smat", experts=2), seed=0)
    pmf = build_local(TINY, MethodConfig(name="pmf"), seed=0, fb=smat.fb)
    ep = _eps()[:1]
    with count_passes() as c:
        smat_step(smat.method, smat.merger, smat.pool, smat.pool_opt, smat.hyper_opt, ep, 0, 0, 1, lambda t: t)
    # frozen S+Q, student S, student Q, teacher Q; inner, teacher and outer backward (outer traverses S and Q)
    assert (c.forwards, c.backward_calls, c.backward_traversals) == (4, 3, 4)
    assert (c.forward_images, c.backward_images) == (12 + 6 + 6 + 6, 6 + 6 + 6 + 6)
    with count_passes() as c:
        dense_step(pmf.method, pmf.hyper_opt, ep, 0, 0)
    assert (c.forwards, c.backward_calls, c.backward_traversals, c.forward_images) == (1, 1, 1, 12)
    # the top teacher (half of 2 blocks): its backward stops at the tapped block and its evaluation runs the
    # top block only, so the teacher's passes count half the images
    cfg = MethodConfig(name="smat", experts=2)
    cfg.teacher.top_fraction = 0.5
    top = build_local(TINY, cfg, seed=0, fb=smat.fb)
    with count_passes() as c:
        smat_step(top.method, top.merger, top.pool, top.pool_opt, top.hyper_opt, ep, 0, 0, 1, lambda t: t)
    assert (c.forwards, c.backward_calls, c.backward_traversals) == (4, 3, 4)
    assert (c.forward_images, c.backward_images) == (12 + 6 + 6 + 3, 6 + 3 + 6 + 6)
    # the patch is undone
    with count_passes() as c:
        pass
    smat.fb(smat.fb.theta_pre, ep[0].support)
    assert c.forwards == 0


@pytest.mark.slow  # a whole interleaved bench (warm-up + 1 repeat x 4 runs)
def test_bench_row_has_every_field():
    row = bench_model("vit_tiny_patch16_224", 32, ways=3, shots=2, queries=2, repeats=1, experts=2, patch_size=8,
                      kwargs={"depth": 2}, teacher_top_fraction=0.5)
    for key in ("smat_s_per_task", "pmf_s_per_task", "frozen_s_per_task", "smat_over_pmf"):
        assert row[key] > 0, key
    assert row["smat_passes"] == 7 and row["pmf_passes"] == 2
    assert row["smat_top_over_pmf"] > 0 and row["teacher_top_units"] == "0.500 of the blocks"
    # S = 6, Q = 6: SMAT 6S + 7Q = 78, the top teacher 6S + (4 + 3/2)Q = 69, P>M>F 3S + 3Q = 36
    assert row["work_ratio_fwd_images"] == pytest.approx(78 / 36)
    assert row["smat_top_work_ratio_fwd_images"] == pytest.approx(69 / 36)
    assert abs(row["smat_over_pmf"] - row["smat_s_per_task"] / row["pmf_s_per_task"]) < 1e-12
    assert abs(sum(row["breakdown_share"].values()) - 1) < 1e-9
