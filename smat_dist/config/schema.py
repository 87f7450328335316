"""Typed structured configs: the single user surface (Hydra validates every override against these).

Every constant of the method lives here with its upstream value as the default (docs/differences.md, "Where we
deliberately differ", lists the exceptions), so a typo or a wrong type is an error naming the key, and the
resolved config saved in each run folder records everything that shaped the run.

String choices are `StrEnum`s (smat_dist/config/choices.py, with ConfigError): OmegaConf refuses a misspelled
value naming the choices, and a member still compares, hashes, formats and serialises as its plain string
(`cfg.dist.pool == "sharded"`). Ranges and cross-field rules are checked when a whole `Config` is built
(`Config.__post_init__`, smat_dist/config/checks.py), each as a one-line ConfigError naming the key and the
allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from smat_dist.config.checks import validate
from smat_dist.config.choices import ConfigError as ConfigError  # re-exported: callers import it with the schema
from smat_dist.config.choices import (
    Backend,
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


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    image_size: int = 84
    patch_size: Optional[int] = 12      # ViTs only: 84 px / 12 = 7x7 tokens; None keeps the model's own
    # where pre-trained weights come from: null (random init), "package:efficientnet_lite0",
    # or a local file/folder, never downloaded (timm .pth/.safetensors/.npz, official DINO / DINOv2 / DINOv3 / EVA-02
    # / SigLIP 2 files, a Hugging Face ViT or DINOv2 folder): see smat_dist/model/weights.py
    pretrained: Optional[str] = None
    checkpoint_blocks: bool = False     # activation checkpointing of backbone blocks
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class SparsityConfig:
    target: float = 0.90          # tau, fraction of zeros per expert
    # structured gates (upstream's option): one gate per input column of 2-D weights, per output channel
    # of conv weights, per entry elsewhere; false = one gate per parameter entry
    structured: bool = False
    init_mean: float = 0.0
    init_std: float = 0.5
    clamp: float = 4.605170185988092  # ln(100): log-alpha clamped to [-c, c]
    # hard-concrete noise u ~ U(0.5-eps, 0.5+eps). Upstream's 1e-6 moves a logit by at most 4e-6, i.e. it is
    # inert, yet it costs three passes over the [P, M] block per step and draws from a per-rank RNG stream;
    # 0 (deterministic gate) is our default, set 1e-6 to reproduce upstream exactly.
    noise_eps: float = 0.0
    # keep only the mask logits: the step's masks and their gradient are recomputed chunk by chunk where
    # needed (pool memory per rank ~1/3 at large M, a few more elementwise passes); needs noise_eps=0
    lean: bool = False
    # never hold the step's masks while a task's graph is alive: a training step merges all its tasks in its
    # mask pass (their weights known up front) and recomputes the gates once at its end for the logits' and
    # the merging weights' gradients (the same bits): one [n, M] array less at the step's peak, 2 mask passes
    # per step instead of 1 + tasks; applies to the deterministic, unstructured, stored pool (false: keep them)
    release_masks: bool = True
    # fuse each pool pass's elementwise chain into one kernel with torch.compile (C++ on CPU, Triton on GPU):
    # ~4x faster passes over the [n, M] logits for a few seconds of compilation per process
    compile: bool = False
    lambda_lr: float = 0.002
    mask_lr: float = 1.0e6
    # The task's share of the logits' step, times this (1 = the paper's update: one lr for the task's and the
    # penalty's gradient). The task's gradient reaches a logit through its merge weight w_m ~ 1/M and is ~1e-4
    # in norm in a short run, so it barely reorders the initial draw (docs/demo.md "Learning the masks sooner");
    # s > 1 is mask_lr * s with the penalty's multiplier / s (the same constrained problem, the controller
    # finds the multiplier), applied before the norm-5 clip. Sharded / local pools only (dist.pool=gather and
    # zero3 form the task's gradient by autograd and refuse it).
    task_grad_scale: float = 1.0
    mask_clip: float = 5.0
    # Reaching tau within a short run (docs/differences.md, "Sparsity"). The defaults here are upstream's (masks start
    # dense, tau from the first task, multiplier lr as given, eval gate at beta 1); configs/method/smat*.yaml
    # set the short-run values.
    init: SparsityInit = SparsityInit.normal
    # tau ramps linearly from 0 to target over this share of method.total_tasks (0: target from the start)
    schedule_share: float = 0.0
    # numel: lambda_lr is per million pool entries. A multiplier moves each logit by ~mask_lr * lambda * w / numel
    # per step, so the lr that reaches tau without overshoot grows with the pool (measured: docs/differences.md)
    lambda_lr_scale: LambdaScale = LambdaScale.none
    eval_gate: EvalGate = EvalGate.upstream
    # The weight of expert m in the multiplier's step and in the penalty. Upstream's w_m (~1/M) enters both, so a
    # logit's pull grows with lambda_lr * w^2, ~1/M^2: the lr tuned at 8 experts is ~4x too slow at 16 (measured,
    # docs/differences.md "Sparsity"). relative uses M * w_m; lambda_lr is then per expert at uniform weight.
    expert_weight: ExpertWeight = ExpertWeight.merge
    # Hand-designed mask patterns, the paper's baselines for the learned ones (docs/differences.md): random and
    # magnitude fix the logits at +-clamp (gates exactly 1 / 0) and never update them nor the multipliers.
    pattern: SparsityPattern = SparsityPattern.learned
    # magnitude: the masks stay dense for this share of method.total_tasks, then every expert's mask becomes the
    # top 1 - tau share of the entries by |delta| (the same mask for all experts: delta is shared)
    pattern_share: float = 0.5


@dataclass
class HypernetConfig:
    tokens: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    spectral_norm: bool = True
    t_start: float = 5.0          # temperature T = max(t_min, t_start - tasks / t_decay)
    t_min: float = 0.5
    # 4000 = upstream's (T reaches t_min after 18k of its 50k tasks). The method configs (configs/method/*.yaml)
    # tie it to the run instead: ${smat_t_decay:...} makes T reach t_min after the same 36% of train.tasks.
    t_decay: float = 4000.0
    logit_reg: float = 1e-4
    lr: float = 1e-4
    weight_decay: float = 1e-2
    clip: float = 1.0


@dataclass
class TeacherConfig:
    enabled: bool = True
    lr: float = 0.005
    temperature: float = 2.0
    lam: float = 0.25             # L = (1-lam) CE + lam KD
    pretrained_teacher: bool = True  # also distil from the frozen pre-trained ProtoNet (upstream does)
    # the dense teacher's weights are never held whole: formed block by block just before each block runs
    # (its gradient parked on the host when training on an accelerator)
    blockwise: bool = False
    # share of the backbone's blocks, from the top, that the dense teacher's SGD step adapts (with the layers
    # after the blocks and the head); its gradient and its evaluation then run through those blocks only.
    # 1.0 = every parameter (upstream's teacher). See method/teacher.py.
    top_fraction: float = 1.0


@dataclass
class MethodConfig:
    name: MethodName = MethodName.smat
    experts: int = 8
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    inner_lr: float = 1e-3        # one first-order inner SGD step on the support set
    inner_steps: int = 1
    logit_scale: float = 10.0
    delta_lr: float = 1e-4
    delta_momentum: float = 0.9
    delta_weight_decay: float = 1e-4
    pmf_lr: float = 5e-4          # P>M>F dense meta-tuning (SGD momentum 0.9)
    pmf_momentum: float = 0.9
    warmup_tasks: int = 400
    # cosine horizon of the task-counter schedule; the method configs set it to ${train.tasks} (the run's
    # length) unless given explicitly; 50000 (upstream's length) for a MethodConfig built in code
    total_tasks: int = 50000


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)      # training dataset folders (or URLs)
    eval_sources: list[str] = field(default_factory=list)  # OOD domains for testing
    mode: EpisodeMode = EpisodeMode.variable
    ways: int = 5
    shots: int = 5
    queries: int = 10
    max_ways: int = 50
    max_support: int = 500
    workers: int = 1
    val_episodes: int = 20
    on_corrupt: OnCorrupt = OnCorrupt.error  # what an undecodable image in a shard does (smat_dist/data/episodes.py)
    # http(s) sources (smat_dist/data/remote.py): seconds per socket operation, and further tries of a read that
    # timed out or failed transiently (backoff 0.5 s, doubling); a stalled server ends the command after about
    # (remote_retries + 1) * remote_timeout_s
    remote_timeout_s: float = 30.0
    remote_retries: int = 3


@dataclass
class DistConfig:
    zero_stage: int = 0           # ZeRO stage for the DeepSpeed-managed (replicated) hypernetwork state
    pool: PoolPath = PoolPath.sharded
    backend: Optional[Backend] = None  # None: nccl on GPU, gloo on CPU
    precision: Precision = Precision.auto
    # process-group timeouts (distributed/timeouts.py): a collective that waits longer fails on every rank.
    # timeout_s covers start-up, checkpoint load and the first step (compile, warm-up); step_timeout_s every
    # collective after the first step, so a hung or lost rank ends the job within it (docs/launching.md)
    timeout_s: float = 1800.0
    step_timeout_s: float = 120.0
    # debugging: mark tensors made without device= and refuse them in device collectives, so a CPU run fails
    # where NCCL on a GPU would (smat_dist/utils/devcheck.py); slows every op a little
    check_devices: bool = False
    # a resume on another world size continues bit-exactly (2 -> 1, at equal launcher.threads; docs/design.md
    # "Rehearsal at real size"): the flat space padded so every rank's pool slice starts on a pool chunk
    # boundary (2^21 / M rows), the pool's sums over rows kept per global chunk and added in global order, each
    # task's merged mask formed on its own. Costs: up to world x 2^21 / M padding rows (an uneven, even empty,
    # last slice on toy backbones); all-reduces of G = P x M / 2^21 partials instead of one sum (G x R x M per
    # step for the merge weights' gradient: grows with M^2, so off by default); mask products ~4x a BLAS one
    aligned_slices: bool = False


@dataclass
class CheckpointConfig:
    every_tasks: int = 200
    keep: int = 3                 # complete checkpoints kept (the oldest are deleted)
    # also keep, for good, every checkpoint at a multiple of this many tasks (0: none): the points of the
    # accuracy-over-training curve (smat-analyze RUN --curve)
    keep_every: int = 0
    # write each rank's pool shard from a host copy in a writer thread: training blocks only for the copy
    # (and DeepSpeed's small replicated save); false writes and hashes in the foreground
    async_save: bool = True


@dataclass
class TrainConfig:
    tasks: int = 400              # total training tasks (global)
    tasks_per_rank: int = 1       # tasks per rank per optimiser step
    seed: int = 0
    log_every: int = 1
    val_every_tasks: int = 0      # 0: no validation during training


@dataclass
class LoggingConfig:
    wandb_mode: WandbMode = WandbMode.offline
    project: str = "smat_dist"
    # per step, what limits mask learning: the penalty's share of the mask-logit gradient before the clip, the
    # clip's factor, the logits at the clamp (smat_dist/method/mask_diagnostics.py); read-only, but one extra
    # pass over the pool slice per step (~0.7x a mask backward), so off unless asked for (the demo asks)
    mask_diagnostics: bool = False


@dataclass
class LauncherConfig:
    name: LauncherName = LauncherName.local
    nproc: int = 2                # local ranks (torchrun-style spawn)
    partition: Optional[str] = None
    nodes: int = 1
    tasks_per_node: int = 2
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 4.0
    timeout_min: int = 60
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    signal_delay_s: int = 60
    max_requeues: int = 3
    # automatic requeues after a failed attempt (a killed rank, a lost node, a collective timeout), counted apart
    # from max_requeues (time limit / preemption); the same failure at the same task twice in a row is never retried
    max_failures: int = 2
    # local: once one rank has exited with an error, ranks still alive after this many seconds are SIGKILLed
    kill_grace_s: float = 10.0
    folder: Optional[str] = None  # submitit log folder (default: <run_dir>/submitit)
    # CPU math of the rank processes a launcher starts (docs/demo.md "Reproducibility"; smat_dist/launch/env.py
    # rank_math_env). threads: intra-op threads per rank (OMP/MKL/torch), fixed so that the same config splits
    # its reductions the same way on every machine; 0 = derived from the machine (local: cpu_count // nproc,
    # slurm: cpus_per_task), which changes the bits from one machine to another.
    threads: int = 1
    # portable_math: cap the CPU kernels' instruction set for those ranks (ATen's default kernels, oneDNN up to
    # SSE4.1, MKL's COMPATIBLE branch) so that an AVX2 and an AVX-512 machine run the same kernels; ~1.3x slower
    # per SMAT task; not verified on a second CPU model
    portable_math: bool = False
    # glibc's mmap threshold in the rank processes, fixed (bytes, up to 32 MiB; 0 = glibc's dynamic default):
    # large tensors then come from their own mappings, so the resident peak is what is alive (SMAT's teacher
    # backward otherwise grows the heap by about half the query graph); costs page faults (smat_dist/utils/malloc.py)
    malloc_mmap_threshold: int = 0


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None      # SMAT run folder or checkpoint folder
    pmf_checkpoint: Optional[str] = None  # P>M>F run folder or checkpoint folder (baseline)
    # an smat-export folder (SMAT or P>M>F), evaluated in one process from its packed masks instead of a
    # checkpoint; takes the place of eval.checkpoint / eval.pmf_checkpoint for the kind it holds
    model: Optional[str] = None
    # ranks of smat-eval (launcher=local: local processes; slurm: one job of that many tasks): each holds
    # 1/ranks of the SMAT pool and the episodes are split over them; 1 evaluates in this process
    ranks: int = 1
    episodes: int = 600
    modes: list[EvalMode] = field(default_factory=lambda: [EvalMode.zeroshot])
    methods: list[MethodName] = field(
        default_factory=lambda: [MethodName.smat, MethodName.pretrained, MethodName.pmf])
    finetune_steps: int = 50
    lr_grid: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    val_episodes: int = 5
    lora_rank: int = 8
    lora_alpha: int = 32


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: Optional[str] = None
    resume: Optional[str] = None  # a run folder to continue (smat-train resume=RUN_DIR)

    def __post_init__(self) -> None:
        validate(self)  # ranges and cross-field rules
