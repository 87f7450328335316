"""Ranges and cross-field rules of a whole `Config` (run by `Config.__post_init__`, so by every composition,
every loaded config.yaml and every `dataclasses.replace`), and the run-length schedule rule.

Each failure is one line naming the key, the value and what is allowed:
    method.sparsity.target=1.5: must be > 0 and < 1
Sub-configs built alone in code (`MethodConfig(experts=4)`) are not checked here: the code that uses them
checks what it needs.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable

from smat_dist.config.choices import (
    Backend,
    ConfigError,
    EpisodeMode,
    EvalGate,
    EvalMode,
    ExpertWeight,
    LambdaScale,
    LauncherName,
    MethodName,
    OnCorrupt,
    PoolPath,
    Precision,
    SparsityInit,
    SparsityPattern,
    WandbMode,
)

# share of the run over which the merge temperature falls from t_start to t_min (upstream: 18k of 50k tasks)
T_DECAY_SHARE = 0.36


def t_decay_for(tasks: float, t_start: float, t_min: float) -> float:
    """method.hypernet.t_decay that takes T = t_start - tasks / t_decay down to t_min at T_DECAY_SHARE of
    `tasks` (4000 for upstream's 50k tasks, t_start 5, t_min 0.5)."""
    span = float(t_start) - float(t_min)
    if span <= 0:  # validate() reports it, naming the keys
        return 1.0
    return max(1e-9, T_DECAY_SHARE * float(tasks) / span)


# (key, enum, a list of them, may be null)
ENUMS: list[tuple[str, type[Enum], bool, bool]] = [
    ("method.name", MethodName, False, False),
    ("data.mode", EpisodeMode, False, False),
    ("method.sparsity.init", SparsityInit, False, False),
    ("method.sparsity.eval_gate", EvalGate, False, False),
    ("method.sparsity.lambda_lr_scale", LambdaScale, False, False),
    ("method.sparsity.pattern", SparsityPattern, False, False),
    ("method.sparsity.expert_weight", ExpertWeight, False, False),
    ("data.on_corrupt", OnCorrupt, False, False),
    ("dist.pool", PoolPath, False, False),
    ("dist.backend", Backend, False, True),
    ("dist.precision", Precision, False, False),
    ("logging.wandb_mode", WandbMode, False, False),
    ("launcher.name", LauncherName, False, False),
    ("eval.modes", EvalMode, True, False),
    ("eval.methods", MethodName, True, False),
]


def _rule(test: Callable[[Any], bool], allowed: str) -> tuple[Callable[[Any], bool], str]:
    return test, allowed


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ge(lo: float):
    return _rule(lambda v: _num(v) and v >= lo, f"must be >= {lo}")


def gt(lo: float):
    return _rule(lambda v: _num(v) and v > lo, f"must be > {lo}")


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def test(v):
        return (_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
    return _rule(test, f"must be {'>' if lo_open else '>='} {lo} and {'<' if hi_open else '<='} {hi}")


RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.image_size": ge(8),
    "model.patch_size": _rule(lambda v: v is None or (_num(v) and v >= 1), "must be null or >= 1"),
    "method.experts": ge(1),
    "method.sparsity.target": between(0, 1, lo_open=True, hi_open=True),
    "method.sparsity.init_std": ge(0),
    "method.sparsity.clamp": gt(0),
    "method.sparsity.noise_eps": between(0, 0.5, hi_open=True),
    "method.sparsity.lambda_lr": ge(0),
    "method.sparsity.mask_lr": gt(0),
    "method.sparsity.mask_clip": ge(0),
    "method.sparsity.task_grad_scale": gt(0),
    "method.sparsity.schedule_share": between(0, 1),
    "method.sparsity.pattern_share": between(0, 1, lo_open=True, hi_open=True),
    "method.hypernet.tokens": ge(1),
    "method.hypernet.heads": ge(1),
    "method.hypernet.mlp_ratio": gt(0),
    "method.hypernet.t_start": gt(0),
    "method.hypernet.t_min": gt(0),
    "method.hypernet.t_decay": gt(0),
    "method.hypernet.logit_reg": ge(0),
    "method.hypernet.lr": ge(0),
    "method.hypernet.weight_decay": ge(0),
    "method.hypernet.clip": ge(0),
    "method.teacher.lr": ge(0),
    "method.teacher.temperature": gt(0),
    "method.teacher.lam": between(0, 1),
    "method.teacher.top_fraction": between(0, 1, lo_open=True),
    "method.inner_lr": ge(0),
    "method.inner_steps": ge(0),
    "method.logit_scale": gt(0),
    "method.delta_lr": ge(0),
    "method.delta_momentum": between(0, 1, hi_open=True),
    "method.delta_weight_decay": ge(0),
    "method.pmf_lr": ge(0),
    "method.pmf_momentum": between(0, 1, hi_open=True),
    "method.warmup_tasks": ge(0),
    "method.total_tasks": ge(1),
    "data.ways": ge(2),
    "data.shots": ge(1),
    "data.queries": ge(1),
    "data.max_ways": ge(2),
    "data.max_support": ge(1),
    "data.workers": ge(0),
    "data.val_episodes": ge(0),
    "data.remote_timeout_s": gt(0),
    "data.remote_retries": ge(0),
    "dist.zero_stage": _rule(lambda v: v in (0, 1, 2, 3) and not isinstance(v, bool), "must be one of 0, 1, 2, 3"),
    "checkpoint.every_tasks": ge(0),
    "checkpoint.keep": ge(1),
    "checkpoint.keep_every": ge(0),
    "train.tasks": ge(1),
    "train.tasks_per_rank": ge(1),
    "train.seed": ge(0),
    "train.log_every": ge(1),
    "train.val_every_tasks": ge(0),
    "logging.project": _rule(lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty name"),
    "launcher.nproc": ge(1),
    "launcher.threads": ge(0),
    "launcher.malloc_mmap_threshold": between(0, 32 * 1024 * 1024),
    "launcher.nodes": ge(1),
    "launcher.tasks_per_node": ge(1),
    "launcher.gpus_per_node": ge(0),
    "launcher.cpus_per_task": ge(1),
    "launcher.mem_gb": gt(0),
    "launcher.timeout_min": ge(1),
    "launcher.signal_delay_s": ge(0),
    "launcher.max_requeues": ge(0),
    "launcher.max_failures": ge(0),
    "launcher.kill_grace_s": ge(0),
    "dist.timeout_s": gt(0),
    "dist.step_timeout_s": gt(0),
    "eval.episodes": ge(1),
    "eval.ranks": ge(1),
    "eval.finetune_steps": ge(0),
    "eval.lr_grid": _rule(lambda v: len(v) > 0 and all(_num(x) and x > 0 for x in v),
                          "must be a non-empty list of numbers > 0"),
    "eval.val_episodes": ge(1),
    "eval.lora_rank": ge(1),
    "eval.lora_alpha": gt(0),
}


def _get(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(cfg: Any, key: str, value: Any) -> None:
    *head, last = key.split(".")
    obj = cfg
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _show(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v.value)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show(x) for x in v) + "]"
    return "null" if v is None else str(v)


def _choices(enum: type[Enum]) -> str:
    return ", ".join(m.value for m in enum)


def _as_enum(key: str, enum: type[Enum], v: Any) -> Enum:
    if isinstance(v, enum):
        return v
    try:
        return enum(v)
    except ValueError:
        raise ConfigError(f"{key}={_show(v)}: expected one of {_choices(enum)}") from None


def _coerce_enums(cfg: Any) -> None:
    """Plain strings (a Config built in code) -> the enum members OmegaConf would have produced."""
    for key, enum, many, nullable in ENUMS:
        v = _get(cfg, key)
        if v is None and nullable:
            continue
        if many:
            if not isinstance(v, (list, tuple)) or not v:
                raise ConfigError(f"{key}={_show(v)}: expected a non-empty list of {_choices(enum)}")
            _set(cfg, key, [_as_enum(key, enum, x) for x in v])
        else:
            _set(cfg, key, _as_enum(key, enum, v))


def _cross(cfg: Any) -> None:
    m, sp = cfg.method, cfg.method.sparsity
    h = m.hypernet
    if h.t_start < h.t_min:
        raise ConfigError(f"method.hypernet.t_start={h.t_start}: must be >= method.hypernet.t_min={h.t_min}")
    if sp.lean and sp.noise_eps != 0:
        raise ConfigError(f"method.sparsity.lean=true needs method.sparsity.noise_eps=0 (the deterministic gate), "
                          f"got {sp.noise_eps}")
    if sp.init == SparsityInit.hard and sp.init_std <= 0:
        raise ConfigError(f"method.sparsity.init=hard needs method.sparsity.init_std > 0, got {sp.init_std}")
    if sp.pattern != SparsityPattern.learned:
        check_pattern(sp)
    if sp.lean and sp.structured:
        raise ConfigError("method.sparsity.lean=true: allowed only with method.sparsity.structured=false")
    if m.teacher.blockwise and m.teacher.top_fraction < 1:
        raise ConfigError(f"method.teacher.blockwise=true: allowed only with method.teacher.top_fraction=1, "
                          f"got {m.teacher.top_fraction}")
    if cfg.dist.pool == PoolPath.gather and sp.structured:
        raise ConfigError("dist.pool=gather: allowed only with method.sparsity.structured=false "
                          "(use dist.pool=sharded)")
    if cfg.dist.pool in (PoolPath.gather, PoolPath.zero3) and sp.task_grad_scale != 1:
        raise ConfigError(f"dist.pool={cfg.dist.pool}: method.sparsity.task_grad_scale must be 1 (its mask "
                          f"gradient is autograd's; got {sp.task_grad_scale}); use dist.pool=sharded")
    if cfg.dist.pool == PoolPath.zero3:
        _check_zero3(cfg)
    if cfg.data.mode == EpisodeMode.variable and cfg.data.max_ways < 5:
        raise ConfigError(f"data.max_ways={cfg.data.max_ways}: must be >= 5 with data.mode=variable "
                          f"(Meta-Dataset episodes have at least 5 ways)")
    lc = cfg.launcher
    if lc.signal_delay_s >= lc.timeout_min * 60:
        raise ConfigError(f"launcher.signal_delay_s={lc.signal_delay_s}: must be < launcher.timeout_min * 60 = "
                          f"{lc.timeout_min * 60}")
    for key in ("data.sources", "data.eval_sources"):
        bad = [s for s in _get(cfg, key) if not isinstance(s, str) or not s.strip()]
        if bad:
            raise ConfigError(f"{key}: every entry must be a folder or URL, got {bad[0]!r}")


def _check_zero3(cfg: Any) -> None:
    """dist.pool=zero3 (the pool under DeepSpeed ZeRO-3, smat_dist/pool/zero3.py) is a comparison path: learned,
    unstructured, deterministic, stored gates without fused kernels or diagnostics, and no checkpoints."""
    sp = cfg.method.sparsity
    bad = [key for key, on in (("method.sparsity.structured", sp.structured), ("method.sparsity.lean", sp.lean),
                               ("method.sparsity.noise_eps", sp.noise_eps != 0),
                               ("method.sparsity.pattern", sp.pattern != SparsityPattern.learned),
                               ("method.sparsity.compile", sp.compile),
                               ("logging.mask_diagnostics", cfg.logging.mask_diagnostics)) if on]
    if bad:
        raise ConfigError(f"dist.pool=zero3: allowed only with method.sparsity.structured=false, lean=false, "
                          f"noise_eps=0, pattern=learned, compile=false and logging.mask_diagnostics=false "
                          f"(got {', '.join(bad)}; use dist.pool=sharded)")
    ck = [key for key, on in (("checkpoint.every_tasks", cfg.checkpoint.every_tasks),
                              ("checkpoint.keep_every", cfg.checkpoint.keep_every), ("resume", cfg.resume)) if on]
    if ck:
        raise ConfigError(f"dist.pool=zero3 is a benchmark comparison path: checkpoint.*/resume not supported "
                          f"(set checkpoint.every_tasks=0, checkpoint.keep_every=0 and no resume; got {', '.join(ck)})")


# The hard-concrete gate's constants (smat_dist.pool.gates, which needs torch): temperature 2/3 in training,
# stretch to (gamma, zeta) = (-0.1, 1.1).
_GATE_BETA, _GATE_GAMMA, _GATE_ZETA = 2.0 / 3.0, -0.1, 1.1


def exact_gate_logit(sp: Any) -> float:
    """|log_alpha| beyond which both the training and the eval gate are exactly 0 or 1 (gates.threshold's
    larger value: the training gate's at beta 2/3, the eval gate's at method.sparsity.eval_gate's beta)."""
    s1 = (1.0 - _GATE_GAMMA) / (_GATE_ZETA - _GATE_GAMMA)
    eval_beta = _GATE_BETA if str(sp.eval_gate) == "train" else 1.0
    return max(_GATE_BETA, eval_beta) * math.log(s1 / (1.0 - s1))


def check_pattern(sp: Any) -> None:
    """A hand-designed pattern (random, magnitude) holds its logits at +-clamp, which must put both gates at
    exactly 0 / 1; magnitude ranks single entries by |delta|, so it has no structured form."""
    if sp.pattern == SparsityPattern.magnitude and sp.structured:
        raise ConfigError("method.sparsity.pattern=magnitude: allowed only with method.sparsity.structured=false "
                          "(top-k by |delta| is per entry; use pattern=random for structured gates)")
    need = exact_gate_logit(sp)
    if sp.clamp <= need:
        raise ConfigError(f"method.sparsity.clamp={sp.clamp}: must be > {need:.4f} with method.sparsity.pattern="
                          f"{_show(sp.pattern)} (the fixed logits +-clamp must close / open both gates exactly)")


def validate(cfg: Any) -> None:
    """Raise ConfigError (one line, naming the key) for the first value outside its range."""
    _coerce_enums(cfg)
    # train.* first: method.total_tasks and the temperature decay follow train.tasks, so a bad train.tasks must
    # be reported as itself
    for key, (test, allowed) in sorted(RANGES.items(), key=lambda kv: not kv[0].startswith("train.")):
        v = _get(cfg, key)
        if not test(v):
            raise ConfigError(f"{key}={_show(v)}: {allowed}")
    _cross(cfg)
