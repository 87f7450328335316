"""Whether `smat-train resume=RUN [overrides]` can continue RUN's checkpoint: checked on the submitting host,
from the run folder's manifest and the checkpoint's own config.yaml, before a run folder is touched, a rank
starts or a SLURM job is queued.

The ranks check the same identity again when they load (Checkpointer.load, reshard); this check exists so a
refused resume costs no queue wait and changes nothing in the run folder (a refusal found by the ranks came
after the new config had been written, so the next plain `resume=RUN` failed as well).
"""
from __future__ import annotations

from pathlib import Path

from smat_dist.config.schema import Config, ConfigError

# config keys that fix the checkpoint's layout: the backbone's flat parameter space (its signature is computed
# from the model's parameter names and shapes, which these decide), the method, the pool's experts and gates
LAYOUT_KEYS = ("model.name", "model.image_size", "model.patch_size", "model.kwargs", "method.name",
               "method.experts", "method.sparsity.structured", "method.sparsity.pattern")


def _get(cfg, key: str):
    v = cfg
    for part in key.split("."):
        v = getattr(v, part)
    return getattr(v, "value", v)


def check_resume(run_dir: str, cfg: Config) -> None:
    """ConfigError naming the key, both values and the checkpoint when `cfg` cannot continue `run_dir`'s newest
    complete checkpoint; a run folder without a checkpoint yet has nothing to contradict."""
    from smat_dist.checkpoint import CheckpointError, find_latest, read_manifest
    from smat_dist.config.hydra import load_yaml

    try:
        ck = find_latest(run_dir)
        if ck is None:
            return
        manifest = read_manifest(ck)
    except CheckpointError:
        return   # an incomplete or foreign checkpoint: the ranks' loader reports it, naming the file
    saved_path = ck / "config.yaml" if (ck / "config.yaml").is_file() else Path(run_dir) / "config.yaml"
    saved = load_yaml(saved_path)
    pooled = saved.method.name == "smat"
    recorded = {k: v for k, v in (("method.name", manifest.get("method")), ("model.name", manifest.get("backbone")))
                if v is not None}
    if "experts" in manifest and pooled:
        recorded["method.experts"] = manifest["experts"]
    for key in LAYOUT_KEYS:
        if key.startswith(("method.experts", "method.sparsity.")) and not (pooled and cfg.method.name == "smat"):
            continue   # a pool setting of a run without a pool (P>M>F) does not shape its checkpoint
        theirs = recorded.get(key, _get(saved, key))
        ours = _get(cfg, key)
        if ours != theirs:
            raise ConfigError(f"resume={run_dir}: its checkpoint {ck.name} was trained with {key}={theirs}, this "
                              f"command has {key}={ours}: drop that override to continue the run (nothing in the "
                              "run folder was changed)")
