"""Hydra configs: every group composes into the typed schema; typos and wrong types name the key."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from smat_dist.config.hydra import ConfigError, compose, config_dir, load_yaml, to_yaml
from smat_dist.config.schema import Config
from smat_dist.launch.env import StopFlag, last_error_line
from smat_dist.launch.slurm import executor_parameters

SRC = ["data.sources=[shards/a]"]
GROUPS = {g: sorted(p.stem for p in (Path(config_dir()) / g).glob("*.yaml"))
          for g in ("model", "data", "method", "dist", "launcher", "eval")}


def test_groups_present():
    dinov2 = [f"dinov2_{s}{r}" for s in ("small", "base", "large", "giant") for r in ("", "_reg")]
    assert GROUPS["model"] == sorted(["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant",
                                      "efficientnet_lite0", "user_checkpoint", *dinov2])
    assert GROUPS["data"] == ["imagefolder", "metadataset", "offline"]
    assert GROUPS["method"] == ["pmf", "pretrained", "smat", "smat_structured", "smat_top_teacher"]
    assert GROUPS["dist"] == ["zero0", "zero1", "zero2", "zero3"]
    assert GROUPS["launcher"] == ["local", "slurm"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    cfg = compose("train", SRC + [f"{group}={option}"])
    assert isinstance(cfg, Config)
    if group == "dist":
        assert cfg.dist.zero_stage == int(option[-1])
    if group in ("launcher", "method"):
        assert getattr(cfg, group).name == ("smat" if option.startswith("smat") else option)
    if option == "smat_structured":
        assert cfg.method.sparsity.structured
    if group == "method":
        assert cfg.method.teacher.top_fraction == (0.25 if option == "smat_top_teacher" else 1.0)


def test_defaults_and_overrides():
    cfg = compose("train", SRC + ["method.experts=16", "method.sparsity.target=0.8", "launcher=slurm",
                                  "launcher.partition=gpu", "model=vit_small"])
    assert (cfg.method.experts, cfg.method.sparsity.target) == (16, 0.8)
    assert (cfg.launcher.name, cfg.launcher.partition, cfg.launcher.tasks_per_node) == ("slurm", "gpu", 2)
    assert cfg.model.name == "vit_small_patch16_224" and cfg.model.patch_size == 12
    assert cfg.logging.wandb_mode == "offline"
    assert compose("eval", SRC).launcher.nproc == 1


@pytest.mark.parametrize("override,key", [("method.expert=4", "method.expert"),
                                          ("train.tasks=abc", "train.tasks"),
                                          ("launcher.mem_gb=lots", "launcher.mem_gb"),
                                          ("dist.zero_stage=[1]", "dist.zero_stage")])
def test_typo_or_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose("train", SRC + [override])


def test_unknown_group_option_is_an_error():
    with pytest.raises(ConfigError, match="model/vit_huge"):
        compose("train", SRC + ["model=vit_huge"])


def test_typo_inside_a_group_file_names_the_key(tmp_path, monkeypatch):
    d = tmp_path / "configs"
    shutil.copytree(config_dir(), d)
    (d / "method" / "bad.yaml").write_text("name: smat\nsparsity:\n  targte: 0.5\n")
    monkeypatch.setenv("SMAT_DIST_CONFIG_DIR", str(d))
    with pytest.raises(ConfigError, match="targte"):
        compose("train", SRC + ["method=bad"])


def test_saved_config_round_trips(tmp_path):
    cfg = compose("train", SRC + ["method.experts=3", "launcher=slurm"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_yaml(tmp_path / "config.yaml") == cfg
    (tmp_path / "bad.yaml").write_text(to_yaml(cfg).replace("experts: 3", "experts: three"))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*method\.experts"):
        load_yaml(tmp_path / "bad.yaml")


def test_slurm_executor_parameters_carry_every_launcher_field():
    lc = compose("train", SRC + ["launcher=slurm", "launcher.partition=p", "launcher.account=acc",
                                 "launcher.qos=high", "launcher.constraint=a100", "launcher.nodes=2",
                                 "launcher.gpus_per_node=4", "launcher.tasks_per_node=4",
                                 "launcher.cpus_per_task=8", "launcher.mem_gb=64", "launcher.timeout_min=120",
                                 "launcher.signal_delay_s=90"]).launcher
    p = executor_parameters(lc, "n")
    assert p == {"name": "n", "nodes": 2, "tasks_per_node": 4, "cpus_per_task": 8, "mem_gb": 64.0,
                 "timeout_min": 120, "slurm_signal_delay_s": 90, "gpus_per_node": 4, "slurm_partition": "p",
                 "slurm_account": "acc", "slurm_qos": "high", "slurm_constraint": "a100",
                 "slurm_additional_parameters": {"requeue": True}}


def test_stop_flag_only_records_the_signal():
    flag = StopFlag()
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        flag.install((signal.SIGUSR2, signal.SIGTERM))
        assert not flag()
        signal.raise_signal(signal.SIGTERM)
        assert flag() and flag.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGUSR2)   # a timeout notice after TERM still means "requeue"
        assert flag.signal_name == "SIGUSR2"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_last_error_line():
    tb = ("Traceback (most recent call last):\n  File \"x\", line 1\n    raise ValueError('bad shard 3')\n"
          "ValueError: bad shard 3\n")
    assert last_error_line(tb) == "ValueError: bad shard 3"
