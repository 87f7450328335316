"""smat-bench rehearse: the whole life of a run at real size, in one command (issue 28).

A full-width ViT with random weights and a pool past 2^31 mask entries, trained, saved, resumed at another
world size, evaluated and exported through the code users run, on local gloo ranks:

  data      a small synthetic dataset (train and test classes of real PNG bytes) written into the work folder
  train     2 ranks, the real trainer under the local launcher: 2 steps of 1 task per rank, a checkpoint
            after each (checkpoint.async_save from --save): the uninterrupted run
  resume    1 rank resumes the 2-rank checkpoint of step 1 (the pool re-sliced 2 -> 1) and runs step 2 with 2
            tasks per rank (the same tasks), saving synchronously (an async host copy of the whole pool on
            one rank would double it)
  compare   the resumed run's final checkpoint against the uninterrupted run's, tensor by tensor
  eval      smat-eval's rank function on 2 ranks, zero-shot, from the uninterrupted run's checkpoint (each
            rank loads its half of the pool)
  export    smat-export of the resumed run, in a fresh process

Progress goes to the rank-aware log (`rehearse    12.3 s: phase ...`); the result is one JSON row on stdout. Before
anything is written the planner (smat_dist.bench.plan) predicts every phase's memory; the command refuses
in one line if MemAvailable or the work folder's free disk cannot hold the largest phase.

Per-rank peak: VmHWM minus the rank's resident size after its imports (bench/rehearse_rank.py), against the
planner's sharded-path peak for the same point (plus the async save's host copy of the slice when the save
is async: it is alive during the next step).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from smat_dist.utils.log import get_logger
from smat_dist.utils.memory import rss_bytes

log = get_logger(__name__)

TWO_31 = 2 ** 31
# a rank's resident size after its imports (torch, DeepSpeed, the trainer), measured: the tiny rehearsal's ranks
# (base_rss_bytes). This process's own, taken at the same point, is smaller (no process group, no engine).
RANK_BASE_BYTES = 760_000_000
HEADROOM = 1.10            # the planner's figures are estimates (activations, allocator): 10% on top
TRAIN_FN = "smat_dist.bench.rehearse_rank:train_measured"
TRAIN_CLASSES, TEST_CLASSES, IMAGES, IMAGE_PX = 10, 6, 4, 32


class Refused(RuntimeError):
    """The machine cannot hold the rehearsal (memory or disk): said before anything runs."""


@dataclass
class Point:
    model: str = "vit_base_patch16_224"
    experts: int = 26
    image_size: int = 112
    patch_size: int | None = None      # None: the model's own (16)
    depth: int | None = None           # None: full depth
    lean: bool = True
    checkpoint_blocks: bool = True
    async_save: bool = False
    ways: int = 5
    shots: int = 1
    queries: int = 1
    eval_episodes: int = 2


class Progress:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        log.info("rehearse %7.1f s: %s", time.perf_counter() - self.t0, text)


def planned(pt: Point) -> dict:
    """The planner's figures for the rehearsal's phases (bytes)."""
    from smat_dist.bench.plan import plan

    images = pt.ways * (pt.shots + pt.queries)
    kw = dict(model=pt.model, experts=pt.experts, image_size=pt.image_size, patch_size=pt.patch_size,
              batch_images=images, lean=pt.lean, checkpoint_blocks=pt.checkpoint_blocks, precision="fp32",
              kwargs={"depth": pt.depth} if pt.depth else None)
    two, one = plan(ranks=2, tasks_per_rank=1, **kw), plan(ranks=1, tasks_per_rank=2, **kw)
    copy2 = two["checkpoint"]["async_host_copy_bytes"] if pt.async_save else 0
    return {"params": two["params"], "pool_entries": two["mask_logits_total"],
            "train_2ranks": two["peak_bytes"]["sharded"] + copy2, "resume_1rank": one["peak_bytes"]["sharded"],
            # evaluation: the pool slice, its eval masks (none when lean), the backbone and one task's weights
            "eval_2ranks": (two["memory_bytes"]["pool_params"] + two["eval_masks_bytes"]
                            + two["memory_bytes"]["frozen_backbone"] + two["memory_bytes"]["task_weights"]),
            "shard_bytes_2ranks": two["checkpoint"]["bytes_per_rank"],
            "shard_bytes_1rank": one["checkpoint"]["bytes_per_rank"]}


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def requirements(plan_: dict, rank_base: int) -> dict:
    """Memory the largest phase needs on this machine (every rank of a phase shares it; `rank_base`: a
    process's resident size after its imports) and the disk the
    work folder needs: the uninterrupted run's two checkpoints, the resumed run's one, the export."""
    # + rank_base once more: this process, which waits beside the ranks (and streams the comparison)
    mem = max(2 * (plan_["train_2ranks"] + rank_base), plan_["resume_1rank"] + rank_base,
              2 * (plan_["eval_2ranks"] + rank_base)) + rank_base
    # The export of a two-step run: its masks are still fractional, stored as values, so it is as large as the
    # whole checkpoint (ViT-S/16 x 100: 9.01 GB against 8.84 GB) plus its bit-packed gates, and while it is
    # closed its pool file is copied out of a temporary one: twice that at its peak, with every checkpoint kept.
    export = 2 * (plan_["shard_bytes_1rank"] + plan_["pool_entries"] // 4)
    disk = 2 * 2 * plan_["shard_bytes_2ranks"] + plan_["shard_bytes_1rank"] + export
    return {"memory_bytes": int(mem * HEADROOM), "disk_bytes": int(disk * HEADROOM)}


def write_data(root: Path) -> str:
    """Train and test classes of real PNG bytes, written by the shard writer."""
    from data_tools.writer import DatasetWriter
    from smat_dist.bench.data import _synthetic_image

    path = root / "rehearse"
    with DatasetWriter(path, "rehearse", "bench-rehearse") as w:
        for c in range(TRAIN_CLASSES + TEST_CLASSES):
            split = "train" if c < TRAIN_CLASSES else "test"
            w.add_class(f"class{c:03d}", split, ((f"{c}/{i}", _synthetic_image(c, i, IMAGE_PX)) for i in range(IMAGES)))
    return str(path)


def train_config(pt: Point, data: str, world: int, async_save: bool):
    from smat_dist.config.hydra import compose

    ov = [f"data.sources=[{data}]", "data.mode=fixed", f"data.ways={pt.ways}", f"data.shots={pt.shots}",
          f"data.queries={pt.queries}", "data.workers=0", f"model.name={pt.model}", f"model.image_size={pt.image_size}",
          f"model.patch_size={'null' if pt.patch_size is None else pt.patch_size}", "model.pretrained=null",
          f"model.checkpoint_blocks={str(pt.checkpoint_blocks).lower()}", f"method.experts={pt.experts}",
          f"method.sparsity.lean={str(pt.lean).lower()}", "train.tasks=4", f"train.tasks_per_rank={2 // world}",
          "checkpoint.every_tasks=2", f"checkpoint.async_save={str(async_save).lower()}",
          "logging.wandb_mode=disabled", f"launcher.nproc={world}", "launcher.max_failures=0",
          # the same intra-op threads per rank at 2 ranks and at 1: torch's reductions over more than 32768
          # elements split by the thread count, so the resume is bit-exact only at equal threads per rank
          f"launcher.threads={max(1, (os.cpu_count() or 2) // 2)}",
          "dist.aligned_slices=true"]     # pool slices on chunk boundaries: the same sums at 2 ranks and at 1
    if pt.depth:
        ov.append(f"+model.kwargs.depth={pt.depth}")
    return compose("train", ov)


def _launch(cfg, run_dir: Path, rank_fn: str, nproc: int, label: str | None = None) -> dict:
    """The local launcher, as smat-train / smat-eval start ranks; `label`: relay rank 0's training progress
    (tasks done, loss) to stderr under it, so a long step is seen advancing."""
    from smat_dist.launch.local import launch_local

    return launch_local(cfg, str(run_dir), rank_fn=rank_fn, nproc=nproc, progress=label is not None,
                        progress_label=label or "train")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _ratio(measured: list[int], plan_bytes: int) -> float | None:
    return round(max(measured) / plan_bytes, 3) if plan_bytes else None


def run(pt: Point, work: str | None = None, keep: bool = False, emit=None, progress=None) -> dict:
    """The rehearsal; returns its row. Raises Refused (one line) if the machine cannot hold it."""
    say = progress or Progress()
    from smat_dist.bench import rehearse_state
    from smat_dist.bench.export import _export_peak
    from smat_dist.bench.spawn import run_ranks
    from smat_dist.config.hydra import compose
    from smat_dist.eval.run_settings import adopt_run_settings

    import smat_dist.train.trainer  # noqa: F401 (what a rank imports: the per-rank baseline estimate)
    plan_ = planned(pt)
    need = requirements(plan_, max(rss_bytes(), RANK_BASE_BYTES))
    avail = _mem_available()
    say(f"plan: {plan_['pool_entries']:,} pool entries ({plan_['pool_entries'] / TWO_31:.2f} x 2^31), shard "
        f"{plan_['shard_bytes_2ranks'] / 2**30:.2f} GiB per rank at 2 ranks; per-rank peak "
        f"{plan_['train_2ranks'] / 2**30:.2f} GiB (2 ranks), {plan_['resume_1rank'] / 2**30:.2f} GiB (1 rank); "
        f"needs {need['memory_bytes'] / 2**30:.1f} GiB, MemAvailable {avail / 2**30:.1f} GiB")
    if avail < need["memory_bytes"]:
        raise Refused(f"rehearse: the largest phase needs {need['memory_bytes'] / 2**30:.1f} GiB (planner + "
                          f"{HEADROOM - 1:.0%}), MemAvailable is {avail / 2**30:.1f} GiB: free memory or choose a "
                          "smaller point (--experts, --model)")
    tmp = None
    if work is None:
        tmp = root = Path(tempfile.mkdtemp(prefix="smat-rehearse-"))
    else:
        root = Path(work)
        root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need["disk_bytes"]:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise Refused(f"rehearse: the checkpoints and the export need {need['disk_bytes'] / 2**30:.1f} GiB under "
                      f"{root}, {free / 2**30:.1f} GiB are free: give another --work folder")
    row: dict = {"bench": "rehearse", "model": pt.model, "image_size": pt.image_size, "depth": pt.depth,
                 "experts": pt.experts, "lean": pt.lean, "checkpoint_blocks": pt.checkpoint_blocks,
                 "episode": f"{pt.ways}-way {pt.shots}-shot {pt.queries}-query", "params": plan_["params"],
                 "pool_entries": plan_["pool_entries"],
                 "pool_entries_over_2_31": round(plan_["pool_entries"] / TWO_31, 3),
                 "save": "async" if pt.async_save else "sync",
                 "peak_measures": "per rank: VmHWM minus the rank's resident bytes after its imports (bytes)"}
    phases: dict = {}
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        data = write_data(root / "data")
        phases["data_s"] = round(time.perf_counter() - t, 2)
        say(f"data written ({phases['data_s']} s); training 2 steps on 2 ranks")

        full, resumed = root / "train-2ranks", root / "resume-1rank"
        t = time.perf_counter()
        res2 = _launch(train_config(pt, data, 2, pt.async_save), full, TRAIN_FN, 2, "rehearse train, 2 ranks")
        phases["train_2ranks_s"] = round(time.perf_counter() - t, 2)
        m2 = _metrics(full)
        say(f"trained 2 ranks ({phases['train_2ranks_s']} s; steps {[round(m['step_s'], 1) for m in m2]} s); "
            "resuming step 1's checkpoint on 1 rank")
        first_ck = full / "checkpoints" / "step-000000002"
        cfg1 = train_config(pt, data, 1, False)
        cfg1.resume = str(first_ck)
        t = time.perf_counter()
        res1 = _launch(cfg1, resumed, TRAIN_FN, 1, "rehearse resume, 1 rank")
        phases["resume_1rank_s"] = round(time.perf_counter() - t, 2)
        m1 = _metrics(resumed)
        say(f"resumed on 1 rank ({phases['resume_1rank_s']} s); comparing the final states")
        final2, final1 = full / "checkpoints" / "step-000000004", resumed / "checkpoints" / "step-000000004"
        shards2, shards1 = shard_sizes(first_ck), shard_sizes(final1)

        t = time.perf_counter()
        same = rehearse_state.summary(final2, final1)
        # the re-slicing itself: what the 1-rank resume read equals what the 2 ranks wrote, to the bit
        wrote = rehearse_state.checkpoint_digests(first_ck)
        read = res1["ranks"][0]["loads"][0]["pool_slice_sha256"]
        same["reshard_bit_exact"] = bool(wrote) and {k: v["sha256"] for k, v in read.items()} == wrote
        phases["compare_s"] = round(time.perf_counter() - t, 2)
        say(f"compared ({phases['compare_s']} s): reshard bit-exact {same['reshard_bit_exact']}; after the step: pool "
            f"bit-exact {same['pool_bit_exact']} (close {same['pool_close']}), replicated bit-exact "
            f"{same['replicated_bit_exact']} (close {same['replicated_close']}); evaluating on 2 ranks")

        t = time.perf_counter()
        ov = [f"eval.checkpoint={final2}", "eval.ranks=2", f"eval.episodes={pt.eval_episodes}", "eval.methods=[smat]",
              "eval.modes=[zeroshot]", "data.workers=0", "logging.wandb_mode=disabled", "launcher.max_failures=0",
              f"run_dir={root / 'eval-2ranks'}"]
        ecfg = adopt_run_settings(compose("eval", ov), ov)
        ev = _launch(ecfg, root / "eval-2ranks", "smat_dist.bench.rehearse_rank:eval_measured", 2)
        phases["eval_2ranks_s"] = round(time.perf_counter() - t, 2)
        say(f"evaluated ({phases['eval_2ranks_s']} s); exporting the resumed run")

        t = time.perf_counter()
        ex = run_ranks(_export_peak, 1, str(resumed), str(root / "export"))[0]
        phases["export_s"] = round(time.perf_counter() - t, 2)
        say(f"exported ({phases['export_s']} s)")
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif work is not None and not keep:
            for sub in ("data", "train-2ranks", "resume-1rank", "eval-2ranks", "export"):
                shutil.rmtree(root / sub, ignore_errors=True)
    ranks2, ranks1 = res2["ranks"], res1["ranks"]
    peaks2 = [r["memory"]["peak_over_base_bytes"] for r in ranks2]
    peaks1 = [r["memory"]["peak_over_base_bytes"] for r in ranks1]
    peaks_e = [r["memory"]["peak_over_base_bytes"] for r in ev["ranks"]]
    saves = ranks2[0]["saves"]
    row.update({
        "train_2ranks": {"peak_over_base_bytes": peaks2, "planned_bytes": plan_["train_2ranks"],
                         "base_rss_bytes": [r["memory"]["base_rss_bytes"] for r in ranks2],
                         "ratio": _ratio(peaks2, plan_["train_2ranks"]), "step_s": [round(m["step_s"], 2) for m in m2],
                         "save_block_s": [round(s["block_s"], 3) for s in saves],
                         "save_written_s": [round(s["written_s"], 2) for s in saves],
                         "save_async": [s["async"] for s in saves]},
        "resume_1rank": {"peak_over_base_bytes": peaks1, "planned_bytes": plan_["resume_1rank"],
                         "base_rss_bytes": [r["memory"]["base_rss_bytes"] for r in ranks1],
                         "ratio": _ratio(peaks1, plan_["resume_1rank"]),
                         "resume_load_s": round(ranks1[0]["loads"][0]["load_s"], 2),
                         "step_s": [round(m["step_s"], 2) for m in m1],
                         "save_written_s": [round(s["written_s"], 2) for s in ranks1[0]["saves"]]},
        "eval_2ranks": {"peak_over_base_bytes": peaks_e, "planned_bytes": plan_["eval_2ranks"],
                        "ratio": _ratio(peaks_e, plan_["eval_2ranks"]),
                        "averages": ev["summary"]["averages"]},
        "export": {"seconds": ex["export_seconds"], "bytes": ex["bytes"]["export"],
                   "checkpoint_bytes": ex["bytes"]["checkpoint"], "peak_over_base_bytes": ex["peak_above_base"]},
        "shard_bytes_2ranks": shards2, "shard_bytes_1rank": shards1,
        "peak_ratio": max(_ratio(peaks2, plan_["train_2ranks"]), _ratio(peaks1, plan_["resume_1rank"])),
        # the resume read the 2-rank state to the bit, and the step after it ended where the uninterrupted run's
        # did: to the bit where the math allows, else within the cross-world-size tolerances (rehearse_state)
        "resumed_equal": (same["reshard_bit_exact"] and (same["pool_bit_exact"] or same["pool_close"])
                          and same["replicated_close"]
                          and _same_loss(m1[-1]["loss/task"], m2[-1]["loss/task"])),
        "resumed_bit_exact": same["reshard_bit_exact"] and same["pool_bit_exact"] and same["replicated_bit_exact"],
        "resumed": dict(same, loss_step2=[m2[-1]["loss/task"], m1[-1]["loss/task"]]),
        "phases": phases, "total_s": round(time.perf_counter() - t_all, 1)})
    (emit or (lambda r: print(json.dumps(r), flush=True)))(row)
    return row


def _same_loss(a: float, b: float) -> bool:
    """The step's logged loss: a mean over tasks, reduced in another order at another world size."""
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def shard_sizes(ck: Path) -> list[int]:
    """Bytes of each rank's pool shard file of a checkpoint, in rank order."""
    return [f.stat().st_size for f in sorted(ck.glob("pool-rank*.safetensors"))]
