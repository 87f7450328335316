"""Every analysis figure from a small real run: a few SMAT training steps on a tiny ViT, then the masks,
expert selection, and a two-run sweep evaluated for real."""
from __future__ import annotations

import json

import numpy as np
import pytest

from smat_dist.analysis import figures
from smat_dist.analysis import sweep as sweep_mod
from smat_dist.analysis.cli import main as analyze_main
from smat_dist.build import build_local
from smat_dist.config.hydra import to_yaml
from smat_dist.config.schema import Config, EvalConfig, MethodConfig, ModelConfig
from smat_dist.data.episodes import EpisodeConfig, EpisodeStream
from smat_dist.data.fixed_sets import fixed_episodes
from smat_dist.eval.protocol import Domain, evaluate
from smat_dist.eval.report import write_results
from smat_dist.pool import gates as hc
from smat_dist.train.step import smat_step
from tests.data_fixture import make_dataset

MODEL = ModelConfig(name="vit_tiny_patch16_224", image_size=32, patch_size=8, kwargs={"depth": 3})
EP_CFG = EpisodeConfig(mode="fixed", ways=3, shots=2, queries=2, image_size=32)
# A large multiplier step and no warmup so the sparsity constraint bites within 3 steps (upstream: 0.002 over
# 12k steps); 100 leaves the experts partly sparse (about 55-65% non-zero), so every figure has content.
LAMBDA_LR = 100.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("andata")
    return [str(make_dataset(root, "alpha", images=8)), str(make_dataset(root, "beta", images=8))]


def trained(data, experts: int, target: float, steps: int = 3, rows: list | None = None):
    mcfg = MethodConfig(experts=experts)
    mcfg.sparsity.target = target
    mcfg.sparsity.lambda_lr = LAMBDA_LR
    mcfg.warmup_tasks = 0
    s = build_local(MODEL, mcfg, seed=0)
    stream = EpisodeStream(data, "train", EP_CFG, seed=0, train_aug=True)
    for step in range(steps):
        eps = [stream.episode(2 * step + j) for j in range(2)]
        m = smat_step(s.method, s.pool, s.hyper, eps, 2 * step, 2 * step)
        if rows is not None:
            rows.append({**m, "tasks": 2 * step + 2, "step": step + 1})
    return s


@pytest.fixture(scope="module")
def run(data):
    return trained(data, experts=4, target=0.9)


def test_mask_figures_from_a_real_run(run, data, tmp_path):
    eps = {name: list(fixed_episodes(src, "test", 3, cfg=EP_CFG)) for name, src in zip(("alpha", "beta"), data)}
    res = figures.analyze_pool(run, tmp_path, eps)
    for key in ("capacity", "overlap", "dendrogram"):
        png = tmp_path / {"capacity": "capacity.png", "overlap": "mask_overlap.png",
                          "dendrogram": "expert_dendrogram.png"}[key]
        assert res["figures"][key] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the numbers behind the figures agree with the eval-mode masks computed directly
    z = run.pool.shard.masks(train=False)[: run.fb.space.numel] > 0
    assert res["capacity"]["overall"] == pytest.approx(z.double().mean(0).tolist())
    assert 0 < min(res["capacity"]["overall"]) and max(res["capacity"]["overall"]) < 1  # a trained, partly sparse pool
    kinds = {i.kind for i in run.fb.space.infos}
    assert set(res["capacity"]["by_kind"]) == kinds
    assert set(res["capacity"]["by_depth"]) == {"-1", "0", "1", "2"}
    qkv = [i for i in run.fb.space.infos if i.kind == "qkv"]
    nz = sum(int(z[i.offset:i.offset + i.numel].sum()) for i in qkv)
    assert res["capacity"]["by_kind"]["qkv"]["mean"] == pytest.approx(nz / (4 * sum(i.numel for i in qkv)))
    iou = np.array(res["overlap"])
    f = z.double()
    inter = f.t() @ f
    c = f.sum(0)
    assert iou[0, 1] == pytest.approx(float(inter[0, 1] / (c[0] + c[1] - inter[0, 1])))
    assert np.allclose(iou, iou.T) and np.allclose(np.diag(iou), 1)
    w = res["selection"]
    assert set(w) == {"alpha", "beta"} and all(abs(sum(v) - 1) < 1e-5 for v in w.values())


def test_masks_use_the_eval_gate(run):
    # eval gate (beta = 1): an entry is non-zero iff log_alpha > -2.398
    la = run.pool.shard.log_alpha.detach()[: run.fb.space.numel]
    cap = figures.capacity(run.fb.space, run.pool.shard)
    expect = (la > -hc.threshold(train=False)).double().mean(0)
    assert cap["overall"] == pytest.approx(expect.tolist(), abs=1e-6)


def test_tradeoff_figure_from_a_real_sweep(data, tmp_path):
    sweep = tmp_path / "sweep"
    domains = [Domain("alpha", data[0], "id"), Domain("beta", data[1], "ood")]
    for k, (experts, target) in enumerate([(4, 0.9), (2, 0.5)]):
        rows: list = []
        s = trained(data, experts, target, steps=2, rows=rows)
        res, per = evaluate({"smat": s}, domains, EvalConfig(episodes=3, modes=["zeroshot"]), EP_CFG)
        d = sweep / str(k)
        write_results(d / "eval", res, per)     # the demo's layout: the run's evaluation in its eval/
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = Config()
        cfg.method.experts, cfg.method.sparsity.target = experts, target
        (d / "config.yaml").write_text(to_yaml(cfg))
    (sweep / "not_a_run").mkdir()
    pts = sweep_mod.collect(sweep_mod.scan(sweep))["points"]
    assert [(p["experts"], p["tau"]) for p in pts] == [(4, 0.9), (2, 0.5)]
    assert all(0 <= p["id_avg"] <= 1 and 0 <= p["ood_avg"] <= 1 for p in pts)
    assert analyze_main([str(sweep)]) == 0
    out = json.loads((sweep / "analysis" / "analysis.json").read_text())
    assert [(p["run"], p["id_avg"], p["ood_avg"]) for p in out["sweep"]["points"]] == [
        (p["run"], p["id_avg"], p["ood_avg"]) for p in pts]
    for fig in ("tradeoff.png", "sparsity_trajectories.png"):
        assert (sweep / "analysis" / fig).read_bytes()[:4] == b"\x89PNG"
    assert "| 0.9 | 4 | learned |" in (sweep / "analysis" / "sweep.md").read_text()
    # the reached sparsity is the last logged step's, the trajectory has one point per step
    assert pts[1]["reached"]["train"] == [rows[-1][f"sparsity/expert{i}"] for i in range(2)]
    assert pts[1]["reached"]["eval"] == [rows[-1][f"sparsity_eval/expert{i}"] for i in range(2)]
    assert pts[1]["trajectory"]["tasks"] == [2, 4] and len(pts[1]["trajectory"]["train"]) == 2

    # paired against a reference evaluation of the pre-trained model on the same episodes: by hand
    ref = tmp_path / "ref"
    pre = build_local(MODEL, MethodConfig(name="pretrained"), seed=0)
    rres, rper = evaluate({"pretrained": pre}, domains, EvalConfig(episodes=3, modes=["zeroshot"]), EP_CFG)
    write_results(ref, rres, rper)
    got = sweep_mod.collect(sweep_mod.scan(sweep), reference=ref)
    per0 = json.loads((sweep / "0" / "eval" / "episodes.json").read_text())["smat"]["zeroshot"]
    for kind, dom in (("id", "alpha"), ("ood", "beta")):
        d = [a - b for a, b in zip(per0[dom], rper["pretrained"]["zeroshot"][dom])]
        c = got["points"][0]["paired"]["pretrained"][kind]
        assert c["diff"] == pytest.approx(sum(d) / len(d))
        sd = float(np.std(d, ddof=1))
        assert c["ci95"] == pytest.approx(4.302653 * sd / 3 ** 0.5, rel=1e-5)  # t(0.975, 2 dof)
    assert got["reference"]["pretrained"]["id_avg"] == rres["results"]["pretrained"]["zeroshot"]["id_avg"]
    assert analyze_main([str(sweep), "--reference", str(ref), "--out", str(tmp_path / "an2")]) == 0
    assert "ID − pretrained" in (tmp_path / "an2" / "sweep.md").read_text()

    # other episodes cannot be paired: refused, naming both evaluations
    other = tmp_path / "other"
    ores, oper = evaluate({"pretrained": pre}, domains, EvalConfig(episodes=2, modes=["zeroshot"]), EP_CFG)
    write_results(other, ores, oper)
    with pytest.raises(ValueError, match="different episodes"):
        sweep_mod.collect(sweep_mod.scan(sweep), reference=other)


def test_cli_rejects_a_folder_that_is_neither(tmp_path, capsys):
    assert analyze_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("smat-analyze: error:") and "neither a run folder" in err[-1]


def test_dendrogram_needs_two_domains(tmp_path):
    with pytest.raises(ValueError, match="at least two domains"):
        figures.plot_dendrogram({"a": np.ones(4) / 4}, tmp_path / "d.png")


def test_curve_refuses_what_is_not_a_pair_of_runs(tmp_path, capsys):
    """--curve on a folder that is not a training run, or with a bad --points, fails in one line naming it."""
    from smat_dist.analysis.curve import parse_points

    assert analyze_main([str(tmp_path), "--curve"]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    assert analyze_main([str(tmp_path), "eval.episodes=3"]) == 2
    assert "for --curve only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--points '160,x'"):
        parse_points("160,x")
    assert parse_points("160, 320") == [160, 320] and parse_points(None) is None
