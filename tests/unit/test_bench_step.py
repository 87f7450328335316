"""The step bench: its breakdown times the real SMAT step, passes are counted, and a row has every field."""
from __future__ import annotations

import pytest
import torch

from smat_dist.bench.step import Timer, bench_model, count_passes, synthetic_episode
from smat_dist.build import build_local
from smat_dist.config.schema import MethodConfig, ModelConfig
from smat_dist.train.step import dense_step, smat_step
from smat_dist.utils.spans import recording

TINY = ModelConfig(image_size=32, patch_size=8, kwargs={"depth": 2})


def _eps():
    return [synthetic_episode(3, 2, 2, 32, seed=1, index=i) for i in range(2)]


def test_breakdown_times_the_real_step():
    """The breakdown's spans sit in the real step: recording them changes nothing, and every phase is timed."""
    real = build_local(TINY, MethodConfig(name="smat", experts=3), seed=0)
    timed = build_local(TINY, MethodConfig(name="smat", experts=3), seed=0)
    out = smat_step(real.method, real.pool, real.hyper, _eps(), 5, 5)
    timer = Timer(torch.device("cpu"))
    with recording(timer):
        res = smat_step(timed.method, timed.pool, timed.hyper, _eps(), 5, 5)
    assert res == out
    torch.testing.assert_close(timed.pool.shard.delta, real.pool.shard.delta, rtol=0, atol=0)
    torch.testing.assert_close(timed.pool.shard.log_alpha, real.pool.shard.log_alpha, rtol=0, atol=0)
    assert {"masks", "frozen_pass", "hypernet", "merge", "support_pass", "inner_grad", "query_pass", "teacher_grad",
            "teacher_eval", "outer_backward", "mask_backward", "pool_terms", "optimisers"} <= set(timer.s)
    assert all(v > 0 for v in timer.s.values())
    # outside a recording the spans are no-ops: the timer sees nothing more
    seen = dict(timer.s)
    smat_step(real.method, real.pool, real.hyper, _eps(), 7, 7)
    assert timer.s == seen


def test_passes_are_counted_not_assumed():
    smat = build_local(TINY, MethodConfig(name="smat", experts=2), seed=0)
    pmf = build_local(TINY, MethodConfig(name="pmf"), seed=0, fb=smat.fb)
    ep = _eps()[:1]
    with count_passes() as c:
        smat_step(smat.method, smat.pool, smat.hyper, ep, 0, 0)
    # frozen S+Q, student S, student Q, teacher Q; inner, teacher and outer backward (outer traverses S and Q)
    assert (c.forwards, c.backward_calls, c.backward_traversals) == (4, 3, 4)
    assert (c.forward_images, c.backward_images) == (12 + 6 + 6 + 6, 6 + 6 + 6 + 6)
    with count_passes() as c:
        dense_step(pmf.method, pmf.hyper, ep, 0, 0)
    assert (c.forwards, c.backward_calls, c.backward_traversals, c.forward_images) == (1, 1, 1, 12)
    # the top teacher (half of 2 blocks): its backward stops at the tapped block and its evaluation runs the
    # top block only, so the teacher's passes count half the images
    cfg = MethodConfig(name="smat", experts=2)
    cfg.teacher.top_fraction = 0.5
    top = build_local(TINY, cfg, seed=0, fb=smat.fb)
    with count_passes() as c:
        smat_step(top.method, top.pool, top.hyper, ep, 0, 0)
    assert (c.forwards, c.backward_calls, c.backward_traversals) == (4, 3, 4)
    assert (c.forward_images, c.backward_images) == (12 + 6 + 6 + 3, 6 + 3 + 6 + 6)
    # the patch is undone
    with count_passes() as c:
        pass
    smat.fb(smat.fb.theta_pre, ep[0].support)
    assert c.forwards == 0


@pytest.mark.slow  # a whole interleaved bench (warm-up + 1 repeat x 4 runs)
def test_bench_row_has_every_field():
    before = torch.get_num_threads()
    row = bench_model("vit_tiny_patch16_224", 32, ways=3, shots=2, queries=2, repeats=1, experts=2, patch_size=8,
                      kwargs={"depth": 2}, teacher_top_fraction=0.5, threads=1)
    # timed at the threads asked for, and the caller's setting given back
    assert row["threads"] == 1 and torch.get_num_threads() == before
    assert row["smat_over_floor_cpu"] == pytest.approx(
        row["smat_cpu_s_per_task"] / row["pmf_cpu_s_per_task"] / (78 / 36))
    for key in ("smat_s_per_task", "pmf_s_per_task", "frozen_s_per_task", "smat_over_pmf"):
        assert row[key] > 0, key
    assert row["smat_passes"] == 7 and row["pmf_passes"] == 2
    assert row["smat_top_over_pmf"] > 0 and row["teacher_top_units"] == "0.500 of the blocks"
    # S = 6, Q = 6: SMAT 6S + 7Q = 78, the top teacher 6S + (4 + 3/2)Q = 69, P>M>F 3S + 3Q = 36
    assert row["work_ratio_fwd_images"] == pytest.approx(78 / 36)
    assert row["smat_top_work_ratio_fwd_images"] == pytest.approx(69 / 36)
    assert abs(row["smat_over_pmf"] - row["smat_s_per_task"] / row["pmf_s_per_task"]) < 1e-12
    assert abs(sum(row["breakdown_share"].values()) - 1) < 1e-9
    # CPU peak memory, each contender measured in its own process
    peaks = row["peak_rss_over_base_bytes"]
    assert peaks["pmf"] > 0 and peaks["smat"] > 0
    assert row["smat_peak_over_pmf"] == pytest.approx(peaks["smat"] / peaks["pmf"])
    # the planner beside the measurement (its accuracy is measured at real sizes: docs/design.md)
    for key in ("smat", "pmf"):
        assert row[f"plan_peak_over_measured_{key}"] == pytest.approx(row["plan_peak_bytes"][key] / peaks[key])
    assert row["smat_over_floor"] == pytest.approx(row["smat_over_pmf"] / (78 / 36))
    assert row["smat_top_over_floor"] == pytest.approx(row["smat_top_over_pmf"] / (69 / 36))
    # the CPU allocator's cost per task, and the glibc settings the peaks ran under (the caller's process: default)
    assert row["smat_minflt_per_task"] >= 0 and row["pmf_minflt_per_task"] >= 0
    assert row["malloc_mmap_threshold"] == 0 and row["malloc_trim_threshold"] == 0


def test_peak_process_measures_the_timed_pool_settings(monkeypatch):
    """The peak of `--keep-masks` / `--compile` is the peak of that pool: the peak process builds SMAT with the
    timed rounds' sparsity settings (it once built the default pool whatever was timed)."""
    import smat_dist.bench.step as step

    built = []

    def spy(mc, cfg, seed, **kw):
        built.append((cfg.name, cfg.sparsity.release_masks, cfg.sparsity.compile))
        return build_local(mc, cfg, seed, **kw)

    monkeypatch.setattr(step, "build_local", spy)
    threads = torch.get_num_threads()
    try:
        for key, release in (("smat", False), ("smat", True)):
            peak = step._peak_rank(0, 1, key, "vit_tiny_patch16_224", 32, 3, 2, 2, 2, 1, 8, {"depth": 2}, 0, (0, 0), 1,
                                   {"release_masks": release, "compile": False})
            assert peak >= 0
    finally:
        torch.set_num_threads(threads)
    assert built == [("smat", False, False), ("smat", True, False)]


def test_cli_refuses_malloc_thresholds_out_of_range(capsys):
    from smat_dist.bench.cli import main
    from smat_dist.utils.malloc import MAX_THRESHOLD, MAX_TRIM

    # refused with one line naming the flag, before any model is built
    assert main(["step", "--trim-threshold", str(MAX_TRIM + 1)]) == 2
    assert f"step --trim-threshold={MAX_TRIM + 1}: expected 0" in capsys.readouterr().err
    assert main(["step", "--mmap-threshold", str(MAX_THRESHOLD + 1)]) == 2
    assert f"step --mmap-threshold={MAX_THRESHOLD + 1}: expected 0" in capsys.readouterr().err
