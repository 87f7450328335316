"""Step benchmark: seconds per task of SMAT vs the dense P>M>F step vs a frozen forward, on one backbone.

The three are measured interleaved (smat, pmf, frozen, breakdown, smat, pmf, ...) and summarised by their
medians, so the ratio holds on a machine whose speed drifts while it runs. Backbone passes are counted, not
assumed: `PassCounter` wraps FunctionalBackbone.__call__ (forwards, and the images they carry) and hooks
each forward's output to count the backward traversals of a backbone graph, grouped by the autograd engine
call that made them (SMAT's outer backward is one engine call that traverses two backbone graphs).

The breakdown times the real step: smat_step, SMAT.task and the pool component mark their phases with named
spans (smat_dist/utils/spans.py), which a breakdown round routes through a device-synchronising timer.
Episodes are synthetic random tensors (the point is backbone and merge cost, not data).
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass, field

import torch

from smat_dist.bench.plan import model_config
from smat_dist.build import MethodSetup, build_local
from smat_dist.config.schema import MethodConfig
from smat_dist.data.episodes import Episode
from smat_dist.model.backbone import FunctionalBackbone, block_units
from smat_dist.train.step import dense_step, smat_step
from smat_dist.utils.device import autocast_for, pick_device  # noqa: F401 (the benches' pickers)
from smat_dist.utils.log import get_logger
from smat_dist.utils.spans import recording

log = get_logger(__name__)

DEFAULT_MODELS = ("vit_tiny_patch16_224", "efficientnet_lite0")


# ---------------------------------------------------------------- device, timing, episodes

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def synthetic_episode(ways: int = 10, shots: int = 5, queries: int = 10, image_size: int = 84, seed: int = 0,
                      index: int = 0, device: torch.device | str = "cpu") -> Episode:
    """A fixed N-way K-shot episode of random normalised images (labels in class order)."""
    g = torch.Generator().manual_seed(seed * 7919 + index)
    sup = torch.randn(ways * shots, 3, image_size, image_size, generator=g)
    qry = torch.randn(ways * queries, 3, image_size, image_size, generator=g)
    return Episode(support=sup.to(device), support_labels=torch.arange(ways).repeat_interleave(shots).to(device),
                   query=qry.to(device), query_labels=torch.arange(ways).repeat_interleave(queries).to(device),
                   source="synthetic", split="train", index=index, ways=ways,
                   class_names=[f"c{i}" for i in range(ways)])


def to_device(setup: MethodSetup, dev: torch.device) -> MethodSetup:
    """Module.to keeps each Parameter object, so the optimisers built on CPU stay attached."""
    setup.fb.to(dev)
    setup.method.to(dev)
    if setup.pool is not None:
        setup.pool.to(dev)
    return setup


class Timer:
    """Accumulates seconds per phase, synchronising the device at each boundary so GPU time is attributed."""

    def __init__(self, dev: torch.device):
        self.dev, self.s = dev, {}

    @contextlib.contextmanager
    def __call__(self, key: str):
        sync(self.dev)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            sync(self.dev)
            self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------- pass counting

@dataclass
class PassCounts:
    forwards: int = 0
    forward_images: float = 0        # images x the share of the blocks the pass ran (1 for a whole pass)
    backward_traversals: int = 0     # backbone graphs a backward went through
    backward_images: float = 0
    backward_calls: int = 0          # autograd engine calls that went through at least one backbone graph
    _calls_seen: set = field(default_factory=set)

    def as_dict(self, prefix: str) -> dict:
        return {f"{prefix}_forwards": self.forwards, f"{prefix}_backwards": self.backward_calls,
                f"{prefix}_backward_traversals": self.backward_traversals,
                f"{prefix}_forward_images": self.forward_images, f"{prefix}_backward_images": self.backward_images}


def unit_share(fb: FunctionalBackbone, unit: str) -> float:
    """The share of `block_units` from `unit` on (the work of a pass that starts there, in whole passes)."""
    keys = [k for k, _ in block_units(fb.model)]
    return (len(keys) - keys.index(unit)) / len(keys)


def tap_share(fb: FunctionalBackbone, tap) -> float:
    return 1.0 if tap is None or tap.unit is None else unit_share(fb, tap.unit)


@contextlib.contextmanager
def count_passes():
    """Counts backbone forwards (FunctionalBackbone.__call__) and the backward passes through them."""
    counts = PassCounts()
    engine_call = [0]
    orig_call = FunctionalBackbone.__call__
    orig_from = FunctionalBackbone.run_from
    orig_engine = torch.autograd._engine_run_backward

    def engine(*a, **k):
        engine_call[0] += 1
        return orig_engine(*a, **k)

    def call(self, theta, x, tap=None):
        out = orig_call(self, theta, x, tap=tap)
        counts.forwards += 1
        counts.forward_images += int(x.shape[0])
        if out.requires_grad:
            n = int(x.shape[0])
            # With a tap (the top teacher), a backward that stops at the tapped unit has traversed only the
            # units above it; one that goes on through the tapped input traverses the rest.
            top = tap_share(self, tap)

            def hook(g):
                counts.backward_traversals += 1
                counts.backward_images += n * top
                counts._calls_seen.add(engine_call[0])
                counts.backward_calls = len(counts._calls_seen)

            out.register_hook(hook)
            if tap is not None and tap.activation is not None and tap.activation.requires_grad:
                tap.activation.register_hook(lambda g: setattr(counts, "backward_images",
                                                               counts.backward_images + n * (1 - top)))
        return out

    def from_unit(self, params, x, unit, activation):
        out = orig_from(self, params, x, unit, activation)
        counts.forwards += 1
        counts.forward_images += int(x.shape[0]) * unit_share(self, unit)
        return out

    FunctionalBackbone.__call__ = call
    FunctionalBackbone.run_from = from_unit
    torch.autograd._engine_run_backward = engine
    try:
        yield counts
    finally:
        FunctionalBackbone.__call__ = orig_call
        FunctionalBackbone.run_from = orig_from
        torch.autograd._engine_run_backward = orig_engine


# ---------------------------------------------------------------- the benchmark

def _per_task(v, k: int):
    return v // k if isinstance(v, int) else round(v / k, 3)


def _median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def _at_threads(fn):
    """`fn(..., threads=N)`: run at N intra-op threads (None: as the process has them), the caller's setting
    given back after."""
    @functools.wraps(fn)
    def wrapper(*args, threads: int | None = None, **kw):
        prev = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            return fn(*args, **kw)
        finally:
            torch.set_num_threads(prev)
    return wrapper


@_at_threads
def bench_model(name: str, image_size: int = 84, ways: int = 10, shots: int = 5, queries: int = 10,
                repeats: int = 3, experts: int = 8, tasks_per_step: int = 1, precision: str = "auto",
                device: str | None = None, patch_size: int | None | str = "auto", kwargs: dict | None = None,
                seed: int = 0, teacher_top_fraction: float | None = None, compile: bool = False,
                mmap_threshold: int = 0, keep_masks: bool = False, trim_threshold: int = 0) -> dict:
    """One JSON-able row: medians of interleaved SMAT / P>M>F / frozen timings, measured passes, breakdown.

    With `teacher_top_fraction`, a fourth contender, SMAT with the top teacher (method/teacher.py), is timed
    in the same interleaved rounds (`smat_top_*` keys); `compile` fuses the pool passes of both SMATs, and
    `keep_masks` keeps each step's masks alive from the merge to the backward (method.sparsity.release_masks
    false: one mask pass per task less, one [P, M] array more at the peak), in the timed rounds, the peak
    process and the plan alike.
    `mmap_threshold` / `trim_threshold` (bytes, 0: glibc's default) are fixed in the processes that measure the
    CPU peaks; the timed rounds run in the caller's process, where the CLI fixes the same two first (a process's
    glibc settings cannot be put back, so this function does not touch them). The row counts the minor page faults
    per task of each contender in the timed rounds (`*_minflt_per_task`): the CPU allocator's cost, which a GPU's
    caching allocator does not pay.
    `threads=N` (keyword): torch's intra-op threads for the timed rounds and the peak processes; the row says
    which. One thread measures the step's work without the second core's contention (on a shared machine the
    two-thread ratios move by several percent between runs)."""
    dev = pick_device(device)
    mc = model_config(name, image_size, patch_size)
    if kwargs:
        mc.kwargs = {**mc.kwargs, **kwargs}
    # the pool's settings, one dict for the timed SMATs and the peak process
    sparsity = {"compile": compile, "release_masks": not keep_masks}

    def smat_cfg(top: float = 1.0) -> MethodConfig:
        cfg = MethodConfig(name="smat", experts=experts)
        cfg.teacher.top_fraction = top
        _set_sparsity(cfg, sparsity)
        return cfg

    smat = to_device(build_local(mc, smat_cfg(), seed), dev)
    # P>M>F and the frozen forward share SMAT's backbone object (same weights, same theta_pre).
    pmf = to_device(build_local(mc, MethodConfig(name="pmf"), seed, fb=smat.fb), dev)
    top = None
    if teacher_top_fraction is not None:
        top = to_device(build_local(mc, smat_cfg(teacher_top_fraction), seed, fb=smat.fb), dev)
    eps = [synthetic_episode(ways, shots, queries, image_size, seed, i, dev) for i in range(tasks_per_step)]
    amp = autocast_for(dev, precision)
    fb = smat.fb
    times = {"smat": [], "pmf": [], "frozen": [], "smat_top": []}
    cpu = {key: [] for key in times}   # the process's CPU seconds in the same rounds
    faults = {key: [] for key in times}   # its minor page faults in the same rounds
    timer = Timer(dev)
    passes = {}

    def run_smat(i):
        return smat_step(smat.method, smat.pool, smat.hyper, eps, i, i)

    def run_top(i):
        return smat_step(top.method, top.pool, top.hyper, eps, i, i)

    def run_pmf(i):
        return dense_step(pmf.method, pmf.hyper, eps, i, i)

    def run_frozen(i):
        with torch.no_grad():
            for ep in eps:
                fb(fb.theta_pre, torch.cat([ep.support, ep.query]))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with amp:
        # Warm-up round (allocator, kernels, lazy inits), which is also where the passes are counted.
        contenders = [("smat", run_smat), ("pmf", run_pmf)] + ([("smat_top", run_top)] if top else [])
        for key, fn in contenders:
            with count_passes() as c:
                fn(0)
            passes[key] = c
        run_frozen(0)
        with recording(Timer(dev)):
            run_smat(0)
        for r in range(1, repeats + 1):
            for key, fn in contenders[:2] + [("frozen", run_frozen)] + contenders[2:]:
                sync(dev)
                t0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
                fn(r)
                sync(dev)
                times[key].append((time.perf_counter() - t0) / tasks_per_step)
                cpu[key].append((time.process_time() - c0) / tasks_per_step)
                faults[key].append((_minor_faults() - f0) / tasks_per_step)
            with recording(timer):
                run_smat(r)
    k = tasks_per_step
    s, p, f = (_median(times[key]) for key in ("smat", "pmf", "frozen"))
    ps, pp = passes["smat"], passes["pmf"]
    # Backbone work in forward-image units, a backward counted as two forwards (no-grad forwards count as one).
    work = {key: c.forward_images + 2 * c.backward_images for key, c in passes.items()}
    row = {
        "bench": "step", "model": name, "image_size": image_size, "patch_size": mc.patch_size,
        "device": dev.type,
        "precision": ("bf16" if dev.type == "cuda" else "fp32") if precision == "auto" else precision,
        "threads": torch.get_num_threads(), "ways": ways, "shots": shots, "queries": queries, "experts": experts,
        "tasks_per_step": k, "repeats": repeats, "params": fb.space.numel,
        "smat_s_per_task": s, "pmf_s_per_task": p, "frozen_s_per_task": f,
        "smat_over_pmf": s / p, "pmf_over_frozen": p / f,
        "smat_passes": ps.forwards // k + ps.backward_calls // k,
        "pmf_passes": pp.forwards // k + pp.backward_calls // k,
        **{key: _per_task(v, k) for key, v in ps.as_dict("smat").items()},
        **{key: _per_task(v, k) for key, v in pp.as_dict("pmf").items()},
        "work_ratio_fwd_images": work["smat"] / work["pmf"],
        # the pass-count floor: SMAT's time over P>M>F's, over their ratio of backbone work (1 = no excess)
        "smat_over_floor": (s / p) / (work["smat"] / work["pmf"]),
        "smat_s_all": times["smat"], "pmf_s_all": times["pmf"],
        # The same ratio in process CPU time: time the process waited for a core (another job's) is not in it, so
        # on a loaded machine it moves less than the wall ratio; with several threads it includes their
        # spin-waits, so it is the one to read at --threads 1.
        "smat_over_floor_cpu": (_median(cpu["smat"]) / _median(cpu["pmf"])) / (work["smat"] / work["pmf"]),
        "smat_cpu_s_per_task": _median(cpu["smat"]), "pmf_cpu_s_per_task": _median(cpu["pmf"]),
        "smat_minflt_per_task": _median(faults["smat"]), "pmf_minflt_per_task": _median(faults["pmf"]),
    }
    if top is not None:
        st, pt = _median(times["smat_top"]), passes["smat_top"]
        row.update({"teacher_top_fraction": teacher_top_fraction,
                    "teacher_top_units": f"{top.method.teacher.layout.share:.3f} of the blocks",
                    "smat_top_s_per_task": st, "smat_top_over_pmf": st / p, "smat_top_over_smat": st / s,
                    **{key: _per_task(v, k) for key, v in pt.as_dict("smat_top").items()},
                    "smat_top_work_ratio_fwd_images": work["smat_top"] / work["pmf"],
                    "smat_top_over_floor": (st / p) / (work["smat_top"] / work["pmf"]),
                    "smat_top_s_all": times["smat_top"]})
    row.update(sparsity)
    total = sum(timer.s.values())
    row["breakdown_s_per_task"] = {key: v / (repeats * k) for key, v in timer.s.items()}
    row["breakdown_share"] = {key: v / total for key, v in timer.s.items()}
    row["breakdown_total_s_per_task"] = total / (repeats * k)
    if dev.type == "cuda":
        row["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    else:
        # One process per contender: VmHWM is a process's high-water mark, so each peak is its own.
        peaks = {key: peak_rss(key, name, image_size, ways, shots, queries, experts, tasks_per_step, patch_size,
                               kwargs, seed, (mmap_threshold, trim_threshold), torch.get_num_threads(), sparsity)
                 for key in ("smat", "pmf")}
        row["malloc_mmap_threshold"] = mmap_threshold
        row["malloc_trim_threshold"] = trim_threshold
        row["peak_rss_over_base_bytes"] = peaks
        row["smat_peak_over_pmf"] = peaks["smat"] / peaks["pmf"]
        # the planner's figure for the same point (one task's episode alive at a time), per contender
        from smat_dist.bench.plan import plan

        planned = plan(model=name, experts=experts, ranks=1, image_size=image_size, patch_size=patch_size,
                       batch_images=ways * (shots + queries), tasks_per_rank=tasks_per_step, kwargs=kwargs,
                       precision=row["precision"], release_masks=not keep_masks)["peak_bytes"]
        row["plan_peak_bytes"] = {"smat": planned["sharded"], "pmf": planned["pmf"]}
        row["plan_peak_over_measured_smat"] = planned["sharded"] / peaks["smat"]
        row["plan_peak_over_measured_pmf"] = planned["pmf"] / peaks["pmf"]
    return row


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:   # not POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _set_sparsity(cfg: MethodConfig, sparsity: dict) -> None:
    for attr, value in sparsity.items():
        setattr(cfg.sparsity, attr, value)


def _peak_rank(rank: int, world: int, key: str, name, image_size, ways, shots, queries, experts, k, patch_size,
               kwargs, seed, malloc: tuple[int, int], threads, sparsity: dict) -> int:
    from smat_dist.utils.malloc import set_mmap_threshold, set_trim_threshold
    from smat_dist.utils.memory import peak_rss_bytes, rss_bytes

    torch.set_num_threads(threads)
    set_mmap_threshold(malloc[0], "smat-bench step --mmap-threshold")
    set_trim_threshold(malloc[1], "smat-bench step --trim-threshold")
    mc = model_config(name, image_size, patch_size)
    if kwargs:
        mc.kwargs = {**mc.kwargs, **kwargs}
    eps = [synthetic_episode(ways, shots, queries, image_size, seed, i) for i in range(k)]
    base = rss_bytes()
    cfg = MethodConfig(name=key, experts=experts)
    _set_sparsity(cfg, sparsity)    # the timed rounds' pool settings
    s = build_local(mc, cfg, seed)
    for i in range(2):
        if key == "smat":
            smat_step(s.method, s.pool, s.hyper, eps, i, i)
        else:
            dense_step(s.method, s.hyper, eps, i, i)
    return peak_rss_bytes() - base


def peak_rss(key: str, *args) -> int:
    """Peak resident bytes of two training steps of `key` (smat / pmf), model included, in a fresh process,
    over that process's resident size before the model was built."""
    from smat_dist.bench.spawn import run_ranks

    return run_ranks(_peak_rank, 1, key, *args)[0]


def run(models=DEFAULT_MODELS, image_size: int = 84, emit=None, **kw) -> list[dict]:
    """Bench each model; `emit(row)` (the CLI prints it) as soon as each is measured."""
    rows = []
    for name in models:
        log.info("step bench: %s at %d px", name, image_size)
        try:
            row = bench_model(name, image_size, **kw)
        except Exception as e:  # one backbone failing (e.g. out of memory) must not lose the others' figures
            log.exception("step bench failed for %s", name)
            row = {"bench": "step", "model": name, "image_size": image_size, "error": f"{type(e).__name__}: {e}"}
        if emit:
            emit(row)
        rows.append(row)
    return rows
