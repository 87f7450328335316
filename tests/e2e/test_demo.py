"""smat-demo --quick end to end through its console entry point: real offline domains (Noto scripts, textures,
digits) from the package cache, real EfficientNet-Lite0 ImageNet weights, SMAT and P>M>F trained on 2 local
ranks through DeepSpeed, zero-shot meta-testing of three methods, figures and the report; then a rerun that
must skip every finished phase, and --curve on the same folder (about 2 minutes on 2 CPU cores); in the slow tier
also --sweep on it (one more SMAT run)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
SHAPES = ("circle", "square", "triangle", "cross", "bar")


def _shape_tree(root: Path, per_class: int = 6) -> Path:
    """A class-per-folder tree of drawn shapes at random places and sizes (the --extra-ood input)."""
    rng = np.random.default_rng(0)
    for name in SHAPES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(150, 256, 3)))
            d = ImageDraw.Draw(im)
            x, y, r = (int(v) for v in (*rng.integers(14, 34, 2), rng.integers(6, 13)))
            box, fill = [x - r, y - r, x + r, y + r], tuple(int(v) for v in rng.integers(0, 120, 3))
            if name == "circle":
                d.ellipse(box, fill=fill)
            elif name == "square":
                d.rectangle(box, fill=fill)
            elif name == "triangle":
                d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            elif name == "cross":
                d.line([(x - r, y - r), (x + r, y + r)], fill=fill, width=3)
                d.line([(x - r, y + r), (x + r, y - r)], fill=fill, width=3)
            else:
                d.rectangle([x - r, y - 2, x + r, y + 2], fill=fill)
            im.save(root / name / f"{i}.png")
    return root


def _demo(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "smat_dist.demo", "--quick", "--out", str(out), *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return r, time.time() - t0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `smat-demo --quick` for the module: its checks, the rerun and --curve, then (slow tier) --sweep on the
    finished folder."""
    root = tmp_path_factory.mktemp("demo")
    tree = _shape_tree(root / "shapes")
    out = root / "demo"
    r, _ = _demo(out, "--extra-ood", str(tree))
    return tree, out, r


@pytest.mark.e2e
def test_demo_quick_end_to_end_and_rerun_skips(demo_run):
    tree, out, r = demo_run
    assert r.returncode == 0, f"smat-demo failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    report = Path(json.loads(r.stdout.strip().splitlines()[-1])["report"])
    assert report == out / "report.md" and report.is_file()
    # progress was shown per phase and per training step
    for phase in ("data", "smat", "pmf", "eval", "figures", "export"):
        assert f"== phase {phase}" in r.stderr
    assert "smat: 4/4 tasks" in r.stderr and "pmf: 4/4 tasks" in r.stderr

    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["meta"]["methods"] == ["smat", "pretrained", "pmf"]
    kinds = {d["name"]: d["kind"] for d in res["meta"]["domains"]}
    assert kinds == {"noto_scripts": "id", "textures": "id", "digits": "ood", "shapes": "ood"}
    assert res["meta"]["world_size"] == 2
    for m in ("smat", "pretrained", "pmf"):
        r0 = res["results"][m]["zeroshot"]
        assert 0.0 <= r0["id_avg"] <= 1.0 and 0.0 <= r0["ood_avg"] <= 1.0
        assert all(d["n"] == 4 for d in r0["domains"].values()), r0["domains"]

    # both methods trained their 4 tasks from the real ImageNet weights, on 2 ranks
    for name in ("smat", "pmf"):
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["tasks"] == 4
        assert "package:efficientnet_lite0" in (out / name / "config.yaml").read_text()

    text = report.read_text()
    assert "SMAT ≥ P>M>F on OOD" in text and "SMAT > pre-trained on ID" in text
    # 4 tasks barely move the logits: the kept entries are the initial draw's top (pattern_origin.py)
    origin = re.search(r"Mask pattern's origin: of the entries each expert keeps, ([\d.]+)–([\d.]+) were", text)
    assert origin and float(origin.group(1)) > 0.95, text
    for dom in kinds:
        assert f"| {dom} |" in text
    for fig in ("capacity.png", "mask_overlap.png", "expert_dendrogram.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
        assert f"figures/{fig}" in text
    # the SMAT run exported, and smat-predict's contact sheet on one ID test episode in the report
    assert (out / "export" / "smat" / "manifest.json").is_file()
    assert (out / "predict" / "contact_sheet.png").stat().st_size > 1000 and "predict/contact_sheet.png" in text
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"data", "smat", "pmf", "eval", "figures", "export"}
    assert all(t["status"] == "ran" for t in timings.values())

    # a rerun finds every phase done: nothing is converted, trained or evaluated again
    r2, seconds = _demo(out, "--extra-ood", str(tree))
    assert r2.returncode == 0, r2.stderr[-4000:]
    timings = json.loads((out / "timings.json").read_text())
    assert all(t["status"].startswith("skipped") for t in timings.values()), timings
    assert "already trained" in r2.stderr and "launched" not in r2.stderr
    assert seconds < 60
    _check_curve(out, tree)


@pytest.mark.e2e
@pytest.mark.slow   # 30-40 s more on 2 cores (one more training and its evaluation); the sweep's table and figure
# from real runs are also checked in the default tier (tests/unit/test_analysis.py)
def test_demo_sweep_on_the_finished_demo(demo_run):
    tree, out, r = demo_run
    assert r.returncode == 0, f"smat-demo failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    _check_sweep(out, tree)


def _check_curve(out: Path, tree: Path) -> None:
    """smat-demo --quick --curve on the finished demo: both runs kept their checkpoints at 2 and 4 tasks; each is
    evaluated on the eval phase's episodes on 2 ranks, and the last point is the eval phase's own result."""
    r, _ = _demo(out, "--extra-ood", str(tree), "--curve")
    assert r.returncode == 0, f"smat-demo --curve failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert "== phase curve" in r.stderr
    curve = json.loads((out / "curve" / "curve.json").read_text())
    assert [p["tasks"] for p in curve["points"]] == [2, 4]
    last = json.loads((out / "curve" / "points" / "tasks-000000004" / "episodes.json").read_text())
    base = json.loads((out / "eval" / "episodes.json").read_text())
    for m in ("smat", "pmf"):     # the same checkpoint on the same episodes: the same numbers
        assert last[m]["zeroshot"] == base[m]["zeroshot"], m
    assert curve["pretrained"]["ood"] == json.loads((out / "eval" / "results.json").read_text())[
        "results"]["pretrained"]["zeroshot"]["ood_avg"]
    assert all(0.0 <= p["masks"]["kept_from_init"] <= 1.0 for p in curve["points"])
    assert "## Accuracy over meta-training" in (out / "report.md").read_text()
    assert (out / "curve" / "curve.png").stat().st_size > 10_000


def _check_sweep(out: Path, tree: Path) -> None:
    """smat-demo --quick --sweep on a finished demo, at the smallest grid that still has two points: the demo's
    own SMAT run (tau 0.9, M 2, reused) and SMAT with random masks at the same tau and M, trained on 2 ranks and
    evaluated on the demo's episodes; the table pairs each with the demo's P>M>F and pre-trained results. Only
    the sweep phase runs."""
    r, _ = _demo(out, "--extra-ood", str(tree), "--sweep", "--sweep-taus", "0.9", "--sweep-experts", "2",
                 "--sweep-baselines", "random")
    assert r.returncode == 0, f"smat-demo --sweep failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert "== phase sweep" in r.stderr
    # tau=0.9, M=2 is the demo's own SMAT run (not trained twice); the baseline is a new run folder
    assert sorted(p.name for p in (out / "sweep").iterdir() if p.is_dir()) == ["tau0.9_M2_random"]
    assert "tau0.9_M2 is the demo's SMAT run" in r.stderr
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    pts = {p["run"]: p for p in sweep["points"]}
    assert set(pts) == {"smat", "tau0.9_M2_random"}
    assert pts["tau0.9_M2_random"]["from_init"] is None and len(pts["smat"]["from_init"]) == 2
    assert (pts["smat"]["pattern"], pts["tau0.9_M2_random"]["pattern"]) == ("learned", "random")
    # random masks are fixed at tau from the first step, in both gates
    rnd = pts["tau0.9_M2_random"]["reached"]
    assert all(abs(v - 0.9) < 0.01 for v in rnd["train"] + rnd["eval"]), rnd
    assert set(sweep["reference"]) == {"pmf", "pretrained"}
    base = json.loads((out / "eval" / "episodes.json").read_text())
    for name, p in pts.items():
        ev = out / "eval" if name == "smat" else out / "sweep" / name / "eval"
        per = json.loads((ev / "episodes.json").read_text())["smat"]["zeroshot"]
        d = [a - b for a, b in zip(per["digits"], base["pmf"]["zeroshot"]["digits"])]
        assert p["paired"]["pmf"]["domains"]["digits"]["diff"] == pytest.approx(sum(d) / len(d))
        ood = [p["paired"]["pmf"]["domains"][n]["diff"] for n in ("digits", "shapes")]
        assert p["paired"]["pmf"]["ood"]["diff"] == pytest.approx(sum(ood) / 2)   # the OOD average of domains
        assert p["trajectory"]["tasks"] == [2, 4]      # one point per step: 4 tasks, 2 ranks x 1 task per step
    # learned - random at the same tau and M, paired on the same episodes
    lm = pts["tau0.9_M2_random"]["learned_minus_this"]
    own = json.loads((out / "eval" / "episodes.json").read_text())["smat"]["zeroshot"]["digits"]
    rnd_per = json.loads((out / "sweep" / "tau0.9_M2_random" / "eval" / "episodes.json").read_text())
    d = [a - b for a, b in zip(own, rnd_per["smat"]["zeroshot"]["digits"])]
    assert lm["run"] == "smat" and lm["domains"]["digits"]["diff"] == pytest.approx(sum(d) / len(d))
    for fig in ("tradeoff.png", "sparsity_trajectories.png"):
        assert (out / "sweep" / fig).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Sparsity sweep" in report and "sweep/tradeoff.png" in report
    assert "| 0.9 | 2 | learned |" in report and "| 0.9 | 2 | random |" in report
