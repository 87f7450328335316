"""Hydra configs: every group composes into the typed schema; typos and wrong types name the key."""
from __future__ import annotations

import dataclasses
import re
import shutil
import signal
from pathlib import Path

import pytest

from smat_dist.config.hydra import ConfigError, compose, config_dir, load_yaml, to_yaml
from smat_dist.config.schema import CheckpointConfig, Config
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
    assert GROUPS["method"] == ["pmf", "pretrained", "smat", "smat_magnitude_masks", "smat_random_masks",
                                "smat_structured", "smat_top_teacher"]
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
                 "slurm_additional_parameters": {"requeue": True}, "slurm_srun_args": ["--kill-on-bad-exit=1"]}


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


# ---- mistakes refused with one line naming the key (issue 15) ----------------------------------------------------
@pytest.mark.parametrize("override,expected", [
    ("+method.expert=4", "config key 'method.expert': Key 'expert' not in 'MethodConfig'"),
    ("+foo=1", "config key 'foo': Key 'foo' not in 'Config'"),
    ("logging.wandb_mode=offlin", "config key 'logging.wandb_mode': Invalid value 'offlin', expected one of "
                                  "[offline, online, disabled]"),
    ("dist.pool=shardd", "config key 'dist.pool': Invalid value 'shardd', expected one of [sharded, gather, zero3]"),
    ("data.mode=variabel", "config key 'data.mode': Invalid value 'variabel', expected one of [variable, fixed]"),
    ("dist.precision=fp16", "config key 'dist.precision': Invalid value 'fp16', expected one of [auto, fp32, bf16]"),
    ("launcher.name=k8s", "config key 'launcher.name': Invalid value 'k8s', expected one of [local, slurm]"),
    ("eval.modes=[zeroshot,fulll]", "config key 'eval.modes[1]': Invalid value 'fulll', expected one of "
                                    "[zeroshot, full, lora]"),
    ("method.sparsity.target=1.5", "method.sparsity.target=1.5: must be > 0 and < 1"),
    ("method.experts=0", "method.experts=0: must be >= 1"),
    ("train.tasks=-5", "train.tasks=-5: must be >= 1"),
    ("launcher.nproc=0", "launcher.nproc=0: must be >= 1"),
    ("data.ways=1", "data.ways=1: must be >= 2"),
    ("dist.zero_stage=4", "dist.zero_stage=4: must be one of 0, 1, 2, 3"),
    ("method.teacher.lam=2", "method.teacher.lam=2.0: must be >= 0 and <= 1"),
    ("eval.lr_grid=[]", "eval.lr_grid=[]: must be a non-empty list of numbers > 0"),
    ("method.hypernet.t_min=6", "method.hypernet.t_start=5.0: must be >= method.hypernet.t_min=6.0"),
    ("launcher.signal_delay_s=4000", "launcher.signal_delay_s=4000: must be < launcher.timeout_min * 60 = 3600"),
])
def test_every_mistake_is_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        compose("train", SRC + [override])
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_cross_field_rules():
    for ov, key in ((["method.sparsity.lean=true", "method.sparsity.noise_eps=1e-6"], "method.sparsity.lean"),
                    (["method=smat_structured", "method.sparsity.lean=true"], "method.sparsity.lean"),
                    (["method=smat_structured", "dist.pool=gather"], "dist.pool=gather"),
                    (["method=smat_structured", "dist.pool=zero3", "checkpoint.every_tasks=0"],
                     "dist.pool=zero3: allowed only with"),
                    (["method.sparsity.lean=true", "dist.pool=zero3", "checkpoint.every_tasks=0"],
                     "got method.sparsity.lean"),
                    (["dist.pool=zero3"], "dist.pool=zero3 is a benchmark comparison path: checkpoint.*/resume not "
                                          "supported (set checkpoint.every_tasks=0"),
                    (["method.teacher.blockwise=true", "method=smat_top_teacher"], "method.teacher.blockwise"),
                    (["data.mode=variable", "data.max_ways=3"], "data.max_ways=3")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            compose("train", SRC + ov)


def test_choices_are_enums_that_behave_as_strings():
    import json

    from smat_dist.config.schema import EvalMode, PoolPath

    cfg = compose("train", SRC + ["dist.pool=gather", "eval.modes=[zeroshot,lora]"])
    assert cfg.dist.pool is PoolPath.gather and cfg.dist.pool == "gather" and f"{cfg.dist.pool}" == "gather"
    assert cfg.eval.modes == [EvalMode.zeroshot, EvalMode.lora] and "lora" in cfg.eval.modes
    assert {"gather": 1}[cfg.dist.pool] == 1 and json.dumps({cfg.dist.pool: cfg.method.name}) == '{"gather": "smat"}'
    assert "pool: gather" in to_yaml(cfg)
    # a Config built in code with plain strings is checked and converted the same way
    c = Config()
    c.dist.pool = "gather"
    c2 = dataclasses.replace(c)
    assert c2.dist.pool is PoolPath.gather
    c.dist.pool = "shardd"
    with pytest.raises(ConfigError, match=r"^dist\.pool=shardd: expected one of sharded, gather, zero3$"):
        dataclasses.replace(c)


def test_schedule_follows_the_run_length_unless_set():
    cfg = compose("train", SRC + ["train.tasks=2000"])
    assert cfg.method.total_tasks == 2000
    assert cfg.method.hypernet.t_decay == pytest.approx(0.36 * 2000 / 4.5)   # T at t_min after 36% of the run
    up = compose("train", SRC + ["train.tasks=50000"])
    assert (up.method.total_tasks, up.method.hypernet.t_decay) == (50000, pytest.approx(4000.0))  # upstream's
    own = compose("train", SRC + ["train.tasks=2000", "method.total_tasks=50000", "method.hypernet.t_decay=4000"])
    assert (own.method.total_tasks, own.method.hypernet.t_decay) == (50000, 4000.0)
    for m in GROUPS["method"]:
        assert compose("train", SRC + [f"method={m}", "train.tasks=77"]).method.total_tasks == 77
    assert compose("demo", SRC).method.hypernet.t_decay == 35.0      # the demo sets its own


def test_resumed_run_follows_a_longer_train_tasks(tmp_path):
    from smat_dist.train.run_folder import resumed_config

    (tmp_path / "config.yaml").write_text(to_yaml(compose("train", SRC + ["train.tasks=1000"])))
    longer = resumed_config(str(tmp_path), compose("train", SRC + ["train.tasks=4000"]), ["train.tasks=4000"])
    assert (longer.train.tasks, longer.method.total_tasks) == (4000, 4000)
    assert longer.method.hypernet.t_decay == pytest.approx(0.36 * 4000 / 4.5)
    (tmp_path / "config.yaml").write_text(to_yaml(compose("train", SRC + ["train.tasks=1000",
                                                                          "method.total_tasks=9000"])))
    kept = resumed_config(str(tmp_path), compose("train", SRC + ["train.tasks=4000"]), ["train.tasks=4000"])
    assert kept.method.total_tasks == 9000    # set explicitly: kept


def test_dead_checkpoint_resume_key_is_gone_and_old_configs_still_load(tmp_path):
    assert "resume" not in {f.name for f in dataclasses.fields(CheckpointConfig)}
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        compose("train", SRC + ["checkpoint.resume=runs/x"])
    old = to_yaml(compose("train", SRC)).replace("checkpoint:\n", "checkpoint:\n  resume: null\n")
    (tmp_path / "config.yaml").write_text(old)
    assert load_yaml(tmp_path / "config.yaml") == compose("train", SRC)


def test_run_folder_saved_before_a_new_key_is_the_same_run(tmp_path):
    """A run folder written by code that did not have a key yet (here method.sparsity.pattern) is the same run
    as today's config with that key at its default; any changed value is a different run."""
    from smat_dist.train.run_folder import prepare_run_dir, same_config

    cfg = Config()
    text = to_yaml(cfg)
    old = tmp_path / "config.yaml"
    old.write_text("\n".join(line for line in text.splitlines()
                             if not line.strip().startswith(("pattern:", "pattern_share:"))) + "\n")
    assert old.read_text() != text and same_config(old, text)
    prepare_run_dir(cfg, str(tmp_path), resuming=False)     # accepted, the saved config is brought up to date
    assert old.read_text() == text
    cfg.method.experts = 3
    assert not same_config(old, to_yaml(cfg))
    with pytest.raises(ConfigError, match="different config.yaml"):
        prepare_run_dir(cfg, str(tmp_path), resuming=False)
