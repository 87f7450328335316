"""The config's string choices (`StrEnum`s) and `ConfigError`: what both the schema (schema.py, the field types)
and its rules (checks.py, which name the allowed values) need: the rules import these, not the schema that runs them.

A member compares, hashes, formats and serialises as its plain string (`cfg.dist.pool == "sharded"`); its name
equals its value, because OmegaConf parses a YAML / command-line string by member name.
"""
from __future__ import annotations

from enum import StrEnum


class ConfigError(ValueError):
    """A config that does not fit the schema; the message (one line) names the key and what is allowed."""


class MethodName(StrEnum):
    smat = "smat"
    pmf = "pmf"
    pretrained = "pretrained"


class EpisodeMode(StrEnum):
    variable = "variable"   # Meta-Dataset's variable ways and shots
    fixed = "fixed"         # N-way K-shot Q-query


class OnCorrupt(StrEnum):
    error = "error"         # a corrupt image ends the run, naming member and shard
    skip = "skip"           # replaced by another image of its class, the same on every rank and after resume


class SparsityInit(StrEnum):
    normal = "normal"       # N(init_mean, init_std^2): upstream (mean 0, every mask ~0.5, sparsity ~0)
    hard = "hard"           # mean chosen so a share tau of the logits starts below the training gate's zero
    l0 = "l0"               # mean chosen so the expected L0 density starts at 1 - tau


class SparsityPattern(StrEnum):
    learned = "learned"     # SMAT: the masks are learned (hard-concrete logits, Lagrangian controller)
    random = "random"       # baseline: each gate row of each expert fixed open with probability 1 - tau
    magnitude = "magnitude"  # baseline: dense, then (at pattern_share of the run) top 1 - tau of |delta|, fixed


class LambdaScale(StrEnum):
    none = "none"           # the multipliers' lr is method.sparsity.lambda_lr (upstream)
    numel = "numel"         # lambda_lr per million pool entries: lr = lambda_lr * numel / 1e6


class ExpertWeight(StrEnum):
    merge = "merge"         # w_m, expert m's mean merging weight (upstream): ~1/M, so the controller slows with M
    relative = "relative"   # M * w_m (mean 1 over the experts): the controller's speed does not depend on M
    uniform = "uniform"     # 1: every expert pulled to tau alike, however much the hypernetwork uses it


class EvalGate(StrEnum):
    upstream = "upstream"   # eval gate at beta 1: zero only below log_alpha -2.398 (train: -1.599)
    train = "train"         # eval gate at the training gate's beta 2/3: eval masks = training masks


class PoolPath(StrEnum):
    sharded = "sharded"     # merge where the shard lives (per-task bytes independent of M)
    gather = "gather"       # all-gather every mask (a hand-written imitation of ZeRO-3; comparison only)
    zero3 = "zero3"         # the pool under real DeepSpeed ZeRO-3 (comparison only: no checkpoints)


class Backend(StrEnum):
    gloo = "gloo"
    nccl = "nccl"
    mpi = "mpi"
    ucc = "ucc"


class Precision(StrEnum):
    auto = "auto"           # bf16 on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class LauncherName(StrEnum):
    local = "local"
    slurm = "slurm"


class EvalMode(StrEnum):
    zeroshot = "zeroshot"
    full = "full"
    lora = "lora"
