"""Warnings for settings that make no sense for the run, and `did you mean` for a mistyped key (issue 29,
item 6): each said before anything starts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data_tools.cli import main as convert_main
from smat_dist.config.hydra import compose
from smat_dist.config.schema import ConfigError
from smat_dist.launch.sense import data_warnings, schedule_warnings
from tests import fixtures_layouts as fx
from tests.data_fixture import make_dataset


def test_warmup_longer_than_the_run_is_said():
    warn = schedule_warnings(compose("train", ["train.tasks=40", "data.sources=[x]"]))
    assert any(w.startswith("method.warmup_tasks=400 is longer than the run (train.tasks=40)") and "10%" in w
               for w in warn), warn
    assert schedule_warnings(compose("train", ["train.tasks=40", "method.warmup_tasks=4", "data.sources=[x]"])) == []


def test_temperature_decay_longer_than_the_run_is_said():
    cfg = compose("train", ["train.tasks=400", "method.warmup_tasks=4", "method.hypernet.t_decay=4000",
                            "data.sources=[x]"])
    warn = schedule_warnings(cfg)
    assert len(warn) == 1 and "only after 18000 tasks, the run has 400" in warn[0], warn
    # the method config ties the decay to train.tasks: nothing to say
    assert schedule_warnings(compose("train", ["train.tasks=400", "method.warmup_tasks=4", "data.sources=[x]"])) == []


def test_eval_domain_with_too_few_test_classes_is_said(tmp_path):
    few = make_dataset(tmp_path, "few", splits={"train": 6, "val": 3, "test": 4}, images=4)
    cfg = compose("train", [f"data.sources=[{few}]", f"data.eval_sources=[{few}]", "data.ways=5"])
    assert data_warnings(cfg) == [f"data.eval_sources[0]={few}: split 'test' has 4 classes, fewer than data.ways=5: "
                                  "evaluating this run there needs data.ways<=4"]
    assert data_warnings(compose("train", [f"data.sources=[{few}]", f"data.eval_sources=[{few}]", "data.ways=4"])) == []


def test_training_source_without_training_classes_is_one_line_naming_splits(tmp_path):
    eval_only = make_dataset(tmp_path, "evalonly", splits={"test": 6}, images=4)
    p = subprocess.run([sys.executable, "-m", "smat_dist.launch.cli", f"data.sources=[{eval_only}]"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "split 'train' has no class" in lines[0] and "--splits" in lines[0] and "data.eval_sources" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_smat_train_warns_before_the_run_starts(tmp_path):
    code = "from smat_dist.launch.cli import main; main(rank_fn='tests.slurm.toy_rank:train')"
    p = subprocess.run([sys.executable, "-c", code, "data.sources=[unused]", "train.tasks=40",
                        "logging.wandb_mode=disabled", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    warned = [i for i, ln in enumerate(lines) if "WARNING" in ln and "method.warmup_tasks=400 is longer" in ln]
    started = [i for i, ln in enumerate(lines) if "run folder" in ln]
    assert warned and started and warned[0] < started[0], p.stderr


def test_imagefolder_without_splits_says_every_class_is_test(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")
    assert convert_main(["imagefolder", "--input", str(inp), "--output", str(tmp_path / "o")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any(w.startswith("imagefolder: no --splits: all 3 classes go to the test split") for w in result["warnings"])


@pytest.mark.parametrize("override,hint", [("method.expert=4", "did you mean method.experts?"),
                                           ("method.sparsity.targt=0.5", "did you mean method.sparsity.target?"),
                                           ("trian.tasks=4", "did you mean train?")])
def test_mistyped_key_gets_did_you_mean(override, hint):
    with pytest.raises(ConfigError, match=hint.replace("?", r"\?")):
        compose("train", [override])
