"""A run remembers its settings (issue 29): a real 48 px SMAT run trained through smat-train, then evaluated
without repeating its model or episode settings, a contradicting model override refused in one line, and a
refused resume that changes nothing in the run folder and starts no rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.data_fixture import make_dataset

pytestmark = [pytest.mark.e2e]

TRAIN = ["model.image_size=48", "model.patch_size=16", "+model.kwargs.depth=1", "method.experts=2",
         "method.warmup_tasks=1", "train.tasks=2", "checkpoint.every_tasks=2", "checkpoint.async_save=false",
         "launcher.nproc=1", "data.mode=fixed", "data.ways=3", "data.shots=2", "data.queries=2",
         "data.workers=0", "logging.wandb_mode=disabled"]


def _cli(module: str, *args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def run48(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    # 4 test classes: fewer than the eval config's default ways=5, enough for the run's own ways=3
    data = make_dataset(root, "toy", splits={"train": 6, "val": 3, "test": 4}, images=6, size=48)
    p = _cli("smat_dist.launch.cli", f"data.sources=[{data}]", f"run_dir={root / 'run'}", *TRAIN, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root, data


def _one_error_line(p: subprocess.CompletedProcess, prog: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-3000:]
    assert lines and lines[-1].startswith(f"{prog}: error:"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return lines[-1]


def test_eval_of_48px_run_takes_model_and_episodes_from_the_run(run48):
    root, data = run48
    p = _cli("smat_dist.eval.cli", f"eval.checkpoint={root / 'run'}", "eval.methods=[smat,pretrained]",
             "eval.episodes=2", "data.workers=0", "logging.wandb_mode=disabled", f"run_dir={root / 'eval'}")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(summary["averages"]) == {"smat/zeroshot", "pretrained/zeroshot"}
    res = json.loads((root / "eval" / "results.json").read_text())
    assert json.dumps(res).count(data.name) >= 1      # the run's own source, never named on this command line


def test_eval_refuses_a_model_override_that_contradicts_the_checkpoint(run48):
    root, data = run48
    p = _cli("smat_dist.eval.cli", f"eval.checkpoint={root / 'run'}", "model.image_size=84",
             f"data.sources=[{data}]", f"run_dir={root / 'eval_bad'}")
    line = _one_error_line(p, "smat-eval")
    assert "model.image_size=84" in line and "model.image_size=48" in line
    assert not (root / "eval_bad").exists()


def test_eval_command_line_episode_settings_win(run48):
    root, data = run48
    # ways=5 given explicitly: the protocol's key overrides the run's ways=3, so the 4-class test split fails
    p = _cli("smat_dist.eval.cli", f"eval.checkpoint={root / 'run'}", "data.ways=5", "eval.methods=[smat]",
             "eval.episodes=1", "data.workers=0", f"run_dir={root / 'eval_w5'}")
    assert "ways=5" in _one_error_line(p, "smat-eval")


def test_refused_resume_changes_nothing_and_starts_no_rank(run48):
    root, _ = run48
    run = root / "run"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    p = _cli("smat_dist.launch.cli", f"resume={run}", "method.experts=8", cwd=root)
    line = _one_error_line(p, "smat-train")
    assert "method.experts=2" in line and "method.experts=8" in line
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before      # config.yaml byte-identical, no new rank log, no .hydra, no config.<time>.yaml
    # under SLURM the refusal comes before any submission: with no SLURM configuration at all, sbatch would fail
    p = _cli("smat_dist.launch.cli", f"resume={run}", "method.experts=8", "launcher=slurm", cwd=root,
             env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"})
    assert "method.experts=8" in _one_error_line(p, "smat-train")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a plain resume afterwards is not poisoned by the refused one: its check passes (it only has to get past
    # the pre-flight; train.tasks=2 is already reached, so the ranks find nothing left to do)
    p = _cli("smat_dist.launch.cli", f"resume={run}", cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
