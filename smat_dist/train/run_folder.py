"""A training run's folder and the checks made before any rank starts (torch-free, fast).

`check(cfg)` is the pre-flight: the config names data, and every training source's train split can give the
configured episodes (enough classes for the ways, enough images for shots + queries). It reads only each
source's spec.json, so a dataset that cannot work is reported in well under a second, before a run folder,
a rank or a wandb run exists. `prepare_run_dir` writes the resolved config; `resumed_config` rebuilds the
config of `resume=RUN_DIR`; `checkpoint_config` reads the config a checkpoint was trained with (evaluation and
export both need it, and neither should import the other for it).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from smat_dist.config.checks import t_decay_for
from smat_dist.config.hydra import load_yaml, to_config, to_yaml
from smat_dist.config.schema import Config, ConfigError, EpisodeMode

CONFIG_FILE = "config.yaml"


def resumed_config(run_dir: str, composed: Config, overrides: list[str]) -> Config:
    """The saved config of `run_dir`, with the launcher group and the explicit `key=value` overrides of
    this command line applied on top (so a run can go on elsewhere, e.g. locally after SLURM, or longer).

    A schedule that followed the run's length (method.total_tasks = train.tasks, the temperature decay derived
    from train.tasks) follows a new `train.tasks=` too, unless that command line sets it explicitly."""
    saved_path = Path(run_dir) / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"resume={run_dir}: no {CONFIG_FILE} there (not a smat-train run folder)")
    saved = load_yaml(saved_path)
    base = OmegaConf.structured(saved)
    new = OmegaConf.structured(composed)
    keys = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in ("resume", "run_dir") or key.startswith("hydra"):
            continue
        keys.append(key)
        # a group choice (launcher=slurm) replaces the whole section; a dotted key one value
        OmegaConf.update(base, key, OmegaConf.select(new, key), merge=False)
    cfg = to_config(base)
    if cfg.train.tasks != saved.train.tasks:
        m, h = saved.method, saved.method.hypernet
        if "method.total_tasks" not in keys and m.total_tasks == saved.train.tasks:
            cfg.method.total_tasks = cfg.train.tasks
        if ("method.hypernet.t_decay" not in keys
                and abs(h.t_decay - t_decay_for(saved.train.tasks, h.t_start, h.t_min)) <= 1e-9 * max(1.0, h.t_decay)):
            cfg.method.hypernet.t_decay = t_decay_for(cfg.train.tasks, cfg.method.hypernet.t_start,
                                                      cfg.method.hypernet.t_min)
    cfg.resume = None
    return cfg


def same_config(path: Path, text: str) -> bool:
    """Whether the config saved at `path` is the resolved config `text`. A config saved before a key was added
    to the schema reads back with that key's default (which is what the code that wrote it did), so a run folder
    stays usable after an upgrade that only adds keys; a removed or retyped key makes it different."""
    old = path.read_text()
    if old == text:
        return True
    try:
        return to_yaml(load_yaml(path)) == text
    except Exception:  # noqa: BLE001 - any config that no longer loads is a different run
        return False


def checkpoint_config(ck: Path) -> Config:
    """The config a checkpoint was written with: its own config.yaml, else its run folder's (the checkpoint is
    <run>/checkpoints/<step>/). FileNotFoundError, naming both places, when neither is there."""
    for p in (ck / CONFIG_FILE, ck.parent.parent / CONFIG_FILE):
        if p.is_file():
            return load_yaml(p)
    raise FileNotFoundError(f"no {CONFIG_FILE} in {ck} or its run folder")


def prepare_run_dir(cfg: Config, run_dir: str, resuming: bool) -> None:
    """Create the run folder and save the resolved config. A fresh run may not reuse a folder that holds a
    different run (it would silently resume someone else's checkpoint); resuming keeps the previous
    config as config.<time>.yaml when it changed."""
    d = Path(run_dir)
    path = d / CONFIG_FILE
    text = to_yaml(cfg)
    if path.is_file() and not same_config(path, text) and not resuming:
        raise ConfigError(f"run_dir={run_dir} already holds a run with a different {CONFIG_FILE}: "
                          f"continue it with resume={run_dir}, or choose another run_dir")
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{CONFIG_FILE}.tmp"
    tmp.write_text(text)
    if path.is_file() and path.read_text() != text:   # the previous config is kept beside the new one
        shutil.copy2(path, d / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    os.replace(tmp, path)   # last and atomic: config.yaml is always one whole config, the old or the new


def unused(run_dir: str) -> bool:
    """Whether `run_dir` holds nothing of a run yet: absent, or only Hydra's `.hydra/` record of this command."""
    d = Path(run_dir)
    return not d.exists() or all(p.name == ".hydra" for p in d.iterdir())


def check(cfg: Config, data: bool = True) -> None:
    """Pre-flight before anything is created: data named, and (`data`) each training source able to give the
    trainer's episodes."""
    if not cfg.data.sources:
        raise ConfigError("data.sources is empty: name the converted dataset folders, "
                          "e.g. smat-train data.sources=[shards/ilsvrc_2012,shards/omniglot]")
    if data:
        check_data(cfg)


def check_data(cfg: Config) -> None:
    """Each data.sources entry's train split (and val split when validating) can give the configured episodes:
    one line naming the source, the split, and the class or count at fault (the rank's own sampler rules)."""
    from smat_dist.data.remote import RemotePolicy
    from smat_dist.data.sampler import EpisodeSampler, SamplerConfig
    from smat_dist.data.spec import SpecError, load_spec

    d = cfg.data
    try:
        sc = SamplerConfig(mode=str(d.mode), ways=d.ways, shots=d.shots, queries=d.queries,
                           max_ways_upper_bound=d.max_ways, max_support_set_size=d.max_support)
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    splits = ["train"] + (["val"] if cfg.train.val_every_tasks else [])
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}]={src}"
        try:
            spec = load_spec(src, RemotePolicy.of(d))
        except (SpecError, OSError) as e:
            raise ConfigError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        for split in splits:
            if split == "train" and not spec.splits.get("train"):
                raise ConfigError(f"{where}: split 'train' has no class, a dataset to evaluate on, not to train on "
                                  "(smat-convert imagefolder without --splits puts every class in test): name it in "
                                  "data.eval_sources, or convert it with --splits train=0.7,val=0.15,test=0.15")
            if split == "val" and not spec.splits.get("val"):
                raise ConfigError(f"{where}: split 'val' has no class, but train.val_every_tasks="
                                  f"{cfg.train.val_every_tasks} validates on it (set train.val_every_tasks=0)")
            try:
                EpisodeSampler(spec, split, sc)
            except (SpecError, ValueError) as e:
                hint = (f" (data.ways={d.ways}, data.shots={d.shots}, data.queries={d.queries})"
                        if d.mode == EpisodeMode.fixed else " (data.mode=variable)")
                raise ConfigError(f"{where}: {str(e).splitlines()[0]}{hint}") from None
