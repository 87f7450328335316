"""What smat-eval takes from the run it evaluates, before any rank starts.

The checkpoint fixes the model (its pool has the layout of that backbone at that image size), so the model
section - and with it the image transform, which reads model.image_size - comes from the run's saved config;
an explicit command-line override that disagrees is refused in one line naming both values, instead of a
shape assertion deep inside the backbone. The episode settings (mode, ways, shots, queries, the Meta-Dataset
bounds) and, when the command names no data at all, the data sources default to the run's own; any of them
given on the command line (the benchmark protocol's keys) wins.
"""
from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path

from smat_dist.config.checks import validate
from smat_dist.config.schema import Config, ConfigError, ModelConfig
from smat_dist.utils.log import get_logger

log = get_logger(__name__)

EPISODE_KEYS = ("mode", "ways", "shots", "queries", "max_ways", "max_support")
SOURCE_KEYS = ("sources", "eval_sources")


def override_keys(overrides: list[str]) -> set[str]:
    """The config keys a command line sets (`+a.b=1` -> `a.b`; a group choice `model=vit_small` -> `model`)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o and not o.startswith("-")}


def _given(keys: set[str], key: str) -> bool:
    """Whether `key` (e.g. model.image_size) is set by the command line: itself, its group, or a key below it."""
    group = key.split(".", 1)[0]
    return group in keys or key in keys or any(k.startswith(key + ".") for k in keys)


def _plain(v):
    return getattr(v, "value", v)


def run_config_of(path: str) -> tuple[Config, Path]:
    """(the saved config of the newest complete checkpoint under `path`, that checkpoint's folder)."""
    from smat_dist.checkpoint import CheckpointError, find_latest
    from smat_dist.eval.loading import load_config

    ck = find_latest(path)
    if ck is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no 'latest' file or manifest.json)")
    return load_config(ck), ck


def adopt_run_settings(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with the evaluated run's model and (unless given on the command line) episode settings and data
    sources. No checkpoint named: `cfg` unchanged. ConfigError for a model override that contradicts the run."""
    path = cfg.eval.checkpoint or getattr(cfg.eval, "pmf_checkpoint", None)
    if not path:
        return cfg
    run, ck = run_config_of(path)
    other = getattr(cfg.eval, "pmf_checkpoint", None)
    if cfg.eval.checkpoint and other:
        pmf, pck = run_config_of(other)
        if pmf.model != run.model:
            raise ConfigError(f"eval.checkpoint ({ck}) and eval.pmf_checkpoint ({pck}) were trained with different "
                              f"models ({run.model.name} at {run.model.image_size} px, {pmf.model.name} at "
                              f"{pmf.model.image_size} px): the episodes of one evaluation share one transform")
    keys = override_keys(overrides)
    for f in fields(ModelConfig):
        key = f"model.{f.name}"
        ours, theirs = _plain(getattr(cfg.model, f.name)), _plain(getattr(run.model, f.name))
        if _given(keys, key) and ours != theirs:
            raise ConfigError(f"{key}={ours} conflicts with the checkpoint's {key}={theirs} ({ck}): the model and "
                              f"its preprocessing come from the checkpoint; drop the {key} override")
    out = copy.deepcopy(cfg)
    out.model = copy.deepcopy(run.model)
    taken = []
    for k in EPISODE_KEYS:
        if not _given(keys, f"data.{k}") and _plain(getattr(out.data, k)) != _plain(getattr(run.data, k)):
            setattr(out.data, k, getattr(run.data, k))
            taken.append(f"data.{k}={_plain(getattr(run.data, k))}")
    if not any(_given(keys, f"data.{k}") for k in SOURCE_KEYS) and not (out.data.sources or out.data.eval_sources):
        out.data.sources, out.data.eval_sources = list(run.data.sources), list(run.data.eval_sources)
        taken.append(f"data.sources={list(run.data.sources)} data.eval_sources={list(run.data.eval_sources)}")
    validate(out)   # the adopted episode settings against the rest (e.g. ways <= max_ways)
    log.info("model from the checkpoint %s (%s, %d px)%s", ck, run.model.name, run.model.image_size,
             f"; the run's own {' '.join(taken)}" if taken else "")
    return out
