"""One convention for every command: a mistake is one line `<command>: error: ...` on stderr, exit code 2, and
nothing is created (no run folder, no wandb run). smat-train checks its config and its data before Hydra
makes a folder and before any rank starts."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.data_fixture import make_dataset

REPO = Path(__file__).resolve().parents[1].parent


def cli(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def smat_train(*args, cwd):
    return cli("from smat_dist.launch.cli import main; main()", *args, cwd=cwd)


def one_error_line(p: subprocess.CompletedProcess, prog: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), p.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """train 3 classes of 4 images: too few classes for 5 ways, too few images for 5 shots + 10 queries"""
    return make_dataset(tmp_path_factory.mktemp("d"), "small", splits={"train": 3, "val": 2, "test": 2}, images=4)


@pytest.mark.parametrize("args,expected", [
    (["+method.expert=4"], "config key 'method.expert': Key 'expert' not in 'MethodConfig'"),
    (["logging.wandb_mode=offlin"], "expected one of [offline, online, disabled]"),
    (["train.tasks=-5"], "train.tasks=-5: must be >= 1"),
    (["data.ways=1"], "data.ways=1: must be >= 2"),
    (["DATA", "data.mode=fixed", "data.ways=5"], "split 'train' has 3 classes, fewer than ways=5"),
    (["DATA", "data.mode=fixed", "data.ways=3"], "has 4 images, fewer than shots+queries=5+10"),
    (["DATA", "data.mode=variable"], "split 'train' has 3 classes, fewer than min_ways=5"),
    (["data.sources=[nowhere]"], "data.sources[0]=nowhere: nowhere/spec.json: not found"),
    (["-m", "DATA", "data.mode=fixed", "data.shots=1", "data.queries=1", "data.ways=2,5"],
     "fewer than ways=5 (data.ways=5, data.shots=1, data.queries=1) (sweep point"),
])
def test_smat_train_refuses_before_anything_exists(tmp_path, small, args, expected):
    args = [f"data.sources=[{small}]" if a == "DATA" else a for a in args]
    if not any(a.startswith("data.sources") for a in args):
        args.append(f"data.sources=[{small}]")
    t0 = time.monotonic()
    p = smat_train(*args, "logging.wandb_mode=offline" if "offlin" not in " ".join(args) else "train.seed=0",
                   cwd=tmp_path)
    line = one_error_line(p, "smat-train")
    assert expected in line, line
    assert sorted(x.name for x in tmp_path.iterdir()) == [], "no run folder, no wandb run, no cli.log"
    assert time.monotonic() - t0 < 30    # no torch, no rank: ~1-2 s on a loaded 2-core machine


def test_data_preflight_itself_is_fast(small):
    from smat_dist.config.hydra import ConfigError, compose
    from smat_dist.train.run_folder import check

    cfg = compose("train", [f"data.sources=[{small}]"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]=.*small: split 'train' has 3 classes"):
        check(cfg)
    assert time.perf_counter() - t0 < 1.0


def test_smat_train_help_and_cfg(tmp_path):
    p = smat_train("--help", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("smat-train [overrides]: meta-train SMAT"), p.stdout[:300]
    assert "powered by Hydra" not in p.stdout
    p = smat_train("--cfg", "job", "method.experts=3", cwd=tmp_path)
    assert p.returncode == 0 and "experts: 3" in p.stdout
    assert list(tmp_path.iterdir()) == []


def test_smat_eval_errors_and_cfg_job(tmp_path, small):
    ev = "from smat_dist.eval.cli import main; raise SystemExit(main())"
    p = cli(ev, "eval.checkpoint=runs/nope", f"data.sources=[{small}]", "eval.methods=[smat]", cwd=tmp_path)
    line = one_error_line(p, "smat-eval")
    assert "runs/nope" in line and "Traceback" not in p.stderr
    line = one_error_line(cli(ev, "eval.modes=[fulll]", cwd=tmp_path), "smat-eval")
    assert "eval.modes[0]" in line and "zeroshot, full, lora" in line
    p = cli(ev, "--cfg", "job", "eval.episodes=7", cwd=tmp_path)
    assert p.returncode == 0 and "episodes: 7" in p.stdout and "\nmodel:" in "\n" + p.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kv,expected", [("experts=abc", "plan experts=abc: expected an integer"),
                                         ("teacher_top_fraction=x", "plan teacher_top_fraction=x: expected a number"),
                                         ("expert=4", "plan 'expert': unknown key")])
def test_smat_bench_plan_names_the_key(tmp_path, kv, expected):
    line = one_error_line(cli("from smat_dist.bench.cli import main; raise SystemExit(main())", "plan", kv,
                              cwd=tmp_path), "smat-bench")
    assert expected in line, line
