"""smat-bench: benchmarks that print one JSON object per line per result.

  smat-bench step  [--model NAME ...] [--image-size PX] [--ways 10 --shots 5 --queries 10] [--repeats N]
                   [--teacher-top-fraction F] [--compile] [--keep-masks] [--threads N]
  smat-bench scale [--experts 4,16,64,256] [--ranks 1,2] [--paths sharded,gather,zero3] [--model NAME] [--depth auto]
                   [--lean] [--compile]
  smat-bench plan  model=vit_giant_patch14_224 experts=256 ranks=64 zero_stage=2 [image_size=224 images=150]
                   [lean=true] [teacher_blockwise=true | teacher_top_fraction=F] [act_bytes=2] [tasks_per_rank=K]
                   [support=50 query=100] [device=h100|h200|a100|cpu] [mfu=0.4] [peak_tflops=T] [mem_gbps=B]
                   [link_gbps=L]
  smat-bench ckpt  [--ranks 4] [--reshard-to 3] [--pool-gb 1.0] [--experts 8]
  smat-bench data  [--data DIR]
  smat-bench export [--model NAME] [--depth D] [--experts 8] [--ranks 2] [--fractional 0.001]
  smat-bench fault [--launcher local|slurm] [--cases kill,nan,hang] [--step-timeout-s 15] [--kill-grace-s 5]
  smat-bench rehearse [--model vit_base_patch16_224] [--experts 26] [--image-size 112] [--depth D] [--no-lean]
                   [--no-checkpoint-blocks] [--save sync|async] [--work DIR] [--keep]

step: SMAT vs P>M>F vs frozen forward, interleaved, with measured backbone passes and a per-phase breakdown.
scale: real sharded / gather-all / DeepSpeed ZeRO-3 SMAT steps on gloo ranks as M and ranks grow, then a summary
  line of ratios.
plan: per-rank memory and bytes per step predicted without allocating (meta-device backbone), and a planned time
  per step: counted FLOPs and bytes over a device's stated rates (smat_dist.bench.plan_time; cpu: measured here).
ckpt: checkpoint save (sync / async), resume, reshard and verification cost per rank against its own slice.
data: episodes per second of the data pipeline (smat_dist.bench.data).
export: smat-export seconds and bytes vs the checkpoint's; eval pool memory from the export vs the checkpoint.
fault: a rank killed / given a NaN / hung in a real 2-rank run: seconds until every rank has exited, until the
       retried run's first step, and whether it ends like an uninterrupted run (smat_dist.bench.fault_run).
rehearse: a real-size run in one command (default: ViT-B/16 x 26 experts, 2.23e9 pool entries, 4.9 GB shards):
  2 steps on 2 ranks with a checkpoint after each, a resume of step 1 on 1 rank (reshard 2 -> 1) compared with
  the uninterrupted run, a 2-rank zero-shot evaluation and an export; per-rank peaks against the planner's
  (smat_dist.bench.rehearse). Refuses up front when MemAvailable cannot hold its largest phase. ~25-35 min.
"""
from __future__ import annotations

import argparse
import json
import sys

from smat_dist.utils.log import setup_logging


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers") from None


def _depth(s: str):
    if s in ("auto", "full", "none"):
        return "auto" if s == "auto" else None
    return int(s)


def _patch(s: str):
    return "auto" if s == "auto" else (None if s in ("none", "model") else int(s))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="smat-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    st = sub.add_parser("step", help="SMAT vs P>M>F vs frozen seconds per task, interleaved")
    st.add_argument("--model", nargs="+", default=["vit_tiny_patch16_224", "efficientnet_lite0"])
    st.add_argument("--image-size", type=int, default=84)
    st.add_argument("--patch-size", type=_patch, default="auto", help="ViTs: auto = 12 at 84 px, else the model's own")
    st.add_argument("--ways", type=int, default=10)
    st.add_argument("--shots", type=int, default=5)
    st.add_argument("--queries", type=int, default=10)
    st.add_argument("--repeats", type=int, default=3)
    st.add_argument("--experts", type=int, default=8)
    st.add_argument("--tasks-per-step", type=int, default=1)
    st.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    st.add_argument("--device", default="auto")
    st.add_argument("--teacher-top-fraction", type=float, default=0.25,
                    help="also time SMAT with the top teacher (method.teacher.top_fraction) in the same rounds; "
                         "0 = not")
    st.add_argument("--compile", action="store_true", help="fused pool kernels (method.sparsity.compile) for SMAT")
    st.add_argument("--keep-masks", action="store_true",
                    help="keep the masks from merge to backward (method.sparsity.release_masks=false): one mask "
                         "pass per task less, one [P, M] array more at the peak")
    st.add_argument("--mmap-threshold", type=int, default=0,
                    help="bytes: glibc's mmap threshold, fixed in this process (the timed rounds) and in the "
                         "processes measuring the CPU peaks (launcher.malloc_mmap_threshold; 0 = glibc's default)")
    st.add_argument("--trim-threshold", type=int, default=0,
                    help="bytes: glibc's trim threshold, fixed as --mmap-threshold (0 = glibc's default); "
                         "1073741824 with --mmap-threshold 33554432 keeps freed memory for the next step, as a GPU's "
                         "caching allocator does (the rows' *_minflt_per_task then fall to ~0)")
    st.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the timed rounds and the peak processes (default: torch's)")

    sc = sub.add_parser("scale", help="step time, memory and bytes as experts and ranks grow")
    sc.add_argument("--experts", type=_ints, default=[4, 16, 64, 256])
    sc.add_argument("--ranks", type=_ints, default=[1, 2])
    sc.add_argument("--paths", default="sharded,gather")
    sc.add_argument("--model", default="vit_tiny_patch16_224")
    sc.add_argument("--image-size", type=int, default=84)
    sc.add_argument("--depth", type=_depth, default="auto",
                    help="ViT depth: auto truncates only if the sharded path's largest point does not fit the "
                         "memory budget (gather-all points that do not fit are skipped)")
    sc.add_argument("--ways", type=int, default=10)
    sc.add_argument("--shots", type=int, default=5)
    sc.add_argument("--queries", type=int, default=10)
    sc.add_argument("--tasks-per-rank", type=int, default=1)
    sc.add_argument("--steps", type=int, default=2, help="timed steps per point (after one warm-up step)")
    sc.add_argument("--budget-gb", type=float, default=None, help="memory budget (default 60%% of what is free)")
    sc.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    sc.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores / ranks)")
    sc.add_argument("--lean", action="store_true", help="lean pool on the sharded path (method.sparsity.lean)")
    sc.add_argument("--compile", action="store_true",
                    help="fused torch.compile kernels for the pool passes (method.sparsity.compile)")

    pl = sub.add_parser("plan", help="per-rank memory, bytes and planned seconds per step, without allocating")
    pl.add_argument("kv", nargs="*", help="model=NAME experts=M ranks=R zero_stage=S image_size=PX images=N depth=D "
                                              "lean=BOOL teacher_blockwise=BOOL teacher_top_fraction=F act_bytes=B "
                                              "tasks_per_rank=K support=S query=Q device=NAME mfu=F "
                                              "peak_tflops=T mem_gbps=B link_gbps=L")

    ck = sub.add_parser("ckpt", help="checkpoint save / resume / reshard / verify cost per rank vs its slice")
    ck.add_argument("--ranks", type=int, default=4)
    ck.add_argument("--reshard-to", type=int, default=3)
    ck.add_argument("--pool-gb", type=float, default=1.0, help="total pool size (delta + momentum + logits)")
    ck.add_argument("--experts", type=int, default=8)
    ck.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed after)")

    ex = sub.add_parser("export", help="smat-export time and bytes vs the checkpoint; eval memory from each")
    ex.add_argument("--model", default="efficientnet_lite0")
    ex.add_argument("--image-size", type=int, default=84)
    ex.add_argument("--depth", type=int, default=None, help="ViTs: blocks kept (default: the model's own)")
    ex.add_argument("--experts", type=int, default=8)
    ex.add_argument("--ranks", type=int, default=2, help="ranks that save the checkpoint")
    ex.add_argument("--fractional", type=float, default=0.001, help="share of mask entries left fractional")
    ex.add_argument("--dir", default=None, help="where to write (default: a temporary folder, kept)")

    da = sub.add_parser("data", help="episodes per second of the data pipeline")
    da.add_argument("--data", default=None, help="a dataset folder or a folder of them (default: synthetic)")
    da.add_argument("--episodes", type=int, default=8)
    da.add_argument("--workers", type=_ints, default=[0, 1, 2])
    da.add_argument("--image-size", type=int, default=128)

    fa = sub.add_parser("fault", help="detection and requeue time of a killed, NaN or hung rank")
    fa.add_argument("--launcher", default="local", choices=["local", "slurm"])
    fa.add_argument("--cases", default="kill,nan,hang")
    fa.add_argument("--step-timeout-s", type=float, default=15.0, help="dist.step_timeout_s of the runs")
    fa.add_argument("--kill-grace-s", type=float, default=5.0, help="launcher.kill_grace_s of the runs")
    fa.add_argument("--dir", default=None, help="where the runs go (default: a temporary folder, removed after)")

    re_ = sub.add_parser("rehearse", help="a real-size train / async save / reshard-resume / eval / export run")
    re_.add_argument("--model", default="vit_base_patch16_224")
    re_.add_argument("--experts", type=int, default=26, help="26 x ViT-B/16's 85.8 M parameters > 2^31 entries")
    re_.add_argument("--image-size", type=int, default=112)
    re_.add_argument("--patch-size", type=int, default=None, help="ViTs: default the model's own")
    re_.add_argument("--depth", type=int, default=None, help="ViT blocks kept (default: all; small test points)")
    re_.add_argument("--no-lean", dest="lean", action="store_false", help="store the masks (method.sparsity.lean "
                     "off)")
    re_.add_argument("--no-checkpoint-blocks", dest="checkpoint_blocks", action="store_false",
                     help="keep every block's activations (model.checkpoint_blocks off)")
    re_.add_argument("--save", default="sync", choices=["sync", "async"],
                     help="checkpoint.async_save of the 2-rank run (async holds a host copy of each rank's slice "
                          "through the next step: it does not fit 24 GiB at the default size)")
    re_.add_argument("--eval-episodes", type=int, default=2)
    re_.add_argument("--work", default=None, help="work folder (default: a temporary folder)")
    re_.add_argument("--keep", action="store_true", help="keep the runs, checkpoints and export in the work folder")
    return ap


def _fail(message: str) -> int:
    """The convention of every command: one line `smat-bench: error: ...` on stderr, exit code 2."""
    print(f"smat-bench: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 2


def _bad_kv(items: list[str], parse) -> str | None:
    """'experts=abc: expected an integer' for the first key=value item that `parse` refuses, naming the key."""
    for item in items:
        try:
            parse([item])
        except ValueError as e:
            text = str(e)
            if text.startswith("plan argument "):
                return text[len("plan argument "):]
            kind = ("an integer" if "int()" in text else "a number" if "float" in text else None)
            return f"{item}: expected {kind}" if kind else f"{item}: {text}"
    return None


def _emit(row: dict) -> None:
    """The benchmarks' output: one JSON object per line on stdout, as soon as it is measured."""
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.cmd == "step":
        from smat_dist.bench import step
        from smat_dist.utils.malloc import set_mmap_threshold, set_trim_threshold

        # the timed rounds run in this process: the same allocator as the peak processes (the setters refuse
        # out-of-range values before anything is built)
        try:
            set_mmap_threshold(args.mmap_threshold, "step --mmap-threshold")
            set_trim_threshold(args.trim_threshold, "step --trim-threshold")
        except ValueError as e:
            return _fail(e)

        if args.threads is not None and args.threads < 1:
            return _fail(f"step --threads {args.threads}: expected at least 1")
        rows = step.run(args.model, args.image_size, ways=args.ways, shots=args.shots, queries=args.queries,
                        repeats=args.repeats, experts=args.experts, tasks_per_step=args.tasks_per_step,
                        precision=args.precision, device=args.device, patch_size=args.patch_size, emit=_emit,
                        teacher_top_fraction=args.teacher_top_fraction or None, compile=args.compile,
                        mmap_threshold=args.mmap_threshold, trim_threshold=args.trim_threshold, threads=args.threads,
                        keep_masks=args.keep_masks)
        return 1 if any("error" in r for r in rows) else 0
    if args.cmd == "scale":
        from smat_dist.bench import scale

        paths = [p for p in args.paths.split(",") if p]
        bad = [p for p in paths if p not in ("sharded", "gather", "zero3")]
        if bad:
            return _fail(f"scale --paths {','.join(bad)}: expected some of sharded, gather, zero3")
        rows = scale.run(args.experts, args.ranks, paths, args.model, args.image_size, args.depth, args.ways,
                         args.shots, args.queries, args.tasks_per_rank, args.steps,
                         int(args.budget_gb * 2**30) if args.budget_gb else None, args.precision, args.threads,
                         lean=args.lean, compile=args.compile, emit=_emit)
        return 1 if any("error" in r for r in rows) else 0
    if args.cmd == "plan":
        from smat_dist.bench.plan import parse_kv, plan

        try:
            kw = parse_kv(args.kv)
        except ValueError as e:
            return _fail(f"plan {_bad_kv(args.kv, parse_kv) or e}")
        try:
            row = plan(**kw)
        except (ValueError, KeyError, RuntimeError) as e:  # e.g. a timm model name that does not exist
            return _fail(f"plan {' '.join(args.kv)}: {e}")
        _emit(row)
        return 0
    if args.cmd == "ckpt":
        from smat_dist.bench import ckpt

        if args.ranks < 1 or args.reshard_to < 1 or args.pool_gb <= 0 or args.experts < 1:
            return _fail("ckpt: --ranks, --reshard-to and --experts must be >= 1 and --pool-gb > 0")
        ckpt.run(args.ranks, args.reshard_to, args.pool_gb, args.experts, root=args.dir, emit=_emit)
        return 0
    if args.cmd == "export":
        from smat_dist.bench import export
        from smat_dist.config.schema import ModelConfig

        if args.ranks < 1 or args.experts < 1 or not 0 <= args.fractional <= 1:
            return _fail("export: --ranks and --experts must be >= 1 and --fractional in [0, 1]")
        vit = "vit" in args.model
        model = ModelConfig(name=args.model, image_size=args.image_size, patch_size=12 if vit else None,
                            kwargs={"depth": args.depth} if args.depth else {})
        export.run(model, args.experts, args.ranks, args.fractional, root=args.dir, emit=_emit)
        return 0
    if args.cmd == "data":
        from smat_dist.bench import data

        data.run(args.data, episodes=args.episodes, workers=tuple(args.workers), image_size=args.image_size,
                 emit=_emit)
        return 0
    if args.cmd == "fault":
        from smat_dist.bench import fault, fault_run

        cases = [c for c in args.cases.split(",") if c]
        bad = [c for c in cases if c not in fault.CASES]
        if bad or not cases:
            return _fail(f"fault --cases {args.cases}: expected some of {','.join(fault.CASES)}")
        rows = fault_run.run(args.launcher, cases, root=args.dir, step_timeout_s=args.step_timeout_s,
                             kill_grace_s=args.kill_grace_s, emit=_emit)
        return 1 if any(r["error"] for r in rows) else 0
    if args.cmd == "rehearse":
        from smat_dist.bench import rehearse

        if args.experts < 1 or args.image_size < 1 or args.eval_episodes < 1 or (args.depth is not None and
                                                                                 args.depth < 1):
            return _fail("rehearse: --experts, --image-size, --eval-episodes and --depth must be >= 1")
        pt = rehearse.Point(model=args.model, experts=args.experts, image_size=args.image_size,
                            patch_size=args.patch_size, depth=args.depth, lean=args.lean,
                            checkpoint_blocks=args.checkpoint_blocks, async_save=args.save == "async",
                            eval_episodes=args.eval_episodes)
        try:
            rehearse.run(pt, work=args.work, keep=args.keep, emit=_emit)
        except rehearse.Refused as e:
            return _fail(str(e))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
