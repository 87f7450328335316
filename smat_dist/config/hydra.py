"""Hydra wiring: the typed schema in Hydra's ConfigStore, the configs/ folder, and a compose helper.

The schema (`Config`) is stored as `smat_schema`, the first entry of every primary config's defaults list,
so each group file and each command-line override is merged INTO the dataclass schema: an unknown key or
a wrong type fails with an error that names the full key (e.g. `train.tasks`), before anything runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from smat_dist.config.checks import t_decay_for
from smat_dist.config.schema import Config, ConfigError
from smat_dist.config.suggest import did_you_mean

SCHEMA_NAME = "smat_schema"
__all__ = ["ConfigError", "compose", "config_dir", "load_yaml", "to_config", "to_yaml"]


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent: storing twice replaces the same node)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


register()
# hydra.run.dir picks the first set value of resume / run_dir / a timestamped default (oc.select cannot:
# it returns null for a key that is present but null)
if not OmegaConf.has_resolver("smat_first"):
    OmegaConf.register_new_resolver("smat_first", lambda *vals: next((v for v in vals if v not in (None, "")), None))
# the method configs tie the merge temperature's decay to the run length: ${smat_t_decay:${train.tasks},...}
if not OmegaConf.has_resolver("smat_t_decay"):
    OmegaConf.register_new_resolver("smat_t_decay", t_decay_for)


def config_dir() -> str:
    """The configs/ folder: $SMAT_DIST_CONFIG_DIR if set, else the one beside the package (repo checkout
    or editable install)."""
    explicit = os.environ.get("SMAT_DIST_CONFIG_DIR")
    d = Path(explicit) if explicit else Path(__file__).resolve().parents[2] / "configs"
    if not (d / "train.yaml").is_file():
        raise ConfigError(f"config folder {d} has no train.yaml (set SMAT_DIST_CONFIG_DIR to your configs/ folder)")
    return str(d)


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """A composed DictConfig (or a plain dict, e.g. a loaded config.yaml) -> a validated `Config` object.

    Strips Hydra's own `hydra` node, checks every key and type against the schema (also keys added with
    `+key=...`, which Hydra lets into a composed config), rejects `???` values that were never filled in and
    runs the range checks of `Config.__post_init__`; errors name the key.
    """
    try:
        node = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
        if "hydra" in node:
            OmegaConf.set_struct(node, False)
            node.pop("hydra")
        # a plain container (interpolations kept) merged into a fresh schema: a key the schema lacks is an error
        # here, where merging the composed (already typed) node would keep it
        plain = OmegaConf.to_container(node, resolve=False, enum_to_str=True)
        ck = plain.get("checkpoint")
        if isinstance(ck, dict) and "resume" in ck and ck["resume"] is None:
            del ck["resume"]   # a dead key of configs saved before it was removed (top-level `resume` is the one)
        merged = OmegaConf.merge(OmegaConf.structured(Config), plain)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"config value(s) must be set: {', '.join(missing)} "
                              f"(e.g. smat-train {missing[0]}=...)")
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from e
    assert isinstance(obj, Config)
    return obj


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if key and "not in" in msg and "Key '" in msg:   # ConfigKeyError: say what the schema has instead
        hint = did_you_mean(key)
        msg += f" ({hint + ' ' if hint else ''}a key outside the schema; see smat_dist/config/schema.py)"
    return f"config key {key!r}: {msg}" if key else msg


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> Config:
    """Compose `configs/<config_name>.yaml` with command-line style overrides -> `Config`.

    For tests and the non-Hydra CLIs: `compose("train", ["method.experts=4", "launcher=slurm"])`.
    A typo (`method.expert=4`) or a wrong type (`train.tasks=abc`) raises ConfigError naming the key.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a @hydra.main app
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(hydra_message(e)) from e
    return to_config(cfg)


def hydra_message(e: BaseException) -> str:
    """One line for an error Hydra raised while composing: the OmegaConf cause names the key when there is
    one (Hydra's own first line can be just "ConfigKeyError raised while composing config:")."""
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return _describe(cause)
    if isinstance(e, OmegaConfBaseException):
        return _describe(e)
    text = str(e).split("Config search path")[0]   # Hydra appends its search path to a missing option
    return " ".join(r.strip() for r in text.splitlines() if r.strip() and "_type=" not in r)


def to_yaml(cfg) -> str:
    """The resolved YAML of a Config (dataclass or OmegaConf node): what every run folder saves."""
    return OmegaConf.to_yaml(cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg), resolve=True)


def load_yaml(path: str | os.PathLike) -> Config:
    """Read a saved (resolved) config.yaml back into a validated `Config`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = OmegaConf.load(p)
    except Exception as e:  # malformed YAML
        raise ConfigError(f"{p}: cannot parse ({e})") from e
    try:
        return to_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
