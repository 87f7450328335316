"""The GPU acceptance check in one process (scripts/gpu_check.sh runs it): the user's own commands on the
device they have, each a subprocess, each time-boxed, every failure counted.

  1. smat-train, DeepSpeed over NCCL (gloo on CPU), 1 rank per visible GPU (at most 2), bf16 autocast on GPU:
     an uninterrupted run of 4 steps, and the same run stopped by SIGTERM after its first step (a checkpoint at
     the step boundary) then resumed with `resume=`;
  2. the resumed run's last losses against the uninterrupted run's (bit-exact on CPU; on GPU the difference
     is reported against a tolerance, see README "What is bit-exact where");
  3. smat-eval of the run on as many ranks (the pool sharded), zero-shot;
  4. smat-bench step and plan at the same model.
Writes $OUT/gpu_check.json (every part's status, seconds and figures) and exits 1 if any part failed.
SMOKE=1 (CPU, CI): the same parts at the smallest sizes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def interrupted(cmd: list[str], metrics: Path, report: dict, failed: list, deadline: float) -> int | None:
    """Start a run, stop it with SIGTERM (a preemption) after its first logged step, as a user's job is: it
    checkpoints at the step boundary and exits 'stopped'. Returns the tasks it stopped at (None: it failed,
    or finished before the signal, which would test no resume)."""
    t0 = time.time()
    if deadline - t0 < 5:
        report["parts"]["train_interrupted"] = {"status": "skipped: budget spent"}
        failed.append("train_interrupted")
        return None
    p = subprocess.Popen(cmd, cwd=metrics.parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and time.time() - t0 < 240 and (
            not metrics.exists() or not metrics.read_text().strip()):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        p.kill()
        stdout, stderr = p.communicate()
    (metrics.parent.parent / "train_interrupted.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    rec = {"seconds": round(time.time() - t0, 1)}
    try:
        res = json.loads(stdout.strip().splitlines()[-1])
        rec.update(status=res["status"], tasks=res["tasks"])
    except (ValueError, IndexError, KeyError):
        rec.update(status=f"exit {p.returncode}", stderr_tail=stderr[-1500:])
    report["parts"]["train_interrupted"] = rec
    if rec["status"] != "stopped":
        failed.append("train_interrupted")
        return None
    return rec["tasks"]


def main() -> int:
    import torch

    out = Path(os.environ.get("OUT", "./gpu_check_out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    smoke = os.environ.get("SMOKE", "0") == "1"
    budget = float(os.environ.get("BUDGET_S", "450"))
    deadline = time.time() + budget
    gpus = torch.cuda.device_count()
    ranks = max(1, min(2, gpus)) if gpus else (2 if smoke else 1)
    precision = "bf16" if gpus else "fp32"
    report: dict = {"cuda": bool(gpus), "gpus": gpus, "ranks": ranks, "precision": precision, "smoke": smoke,
                    "torch": torch.__version__, "parts": {}}
    if gpus:
        report["gpu"] = torch.cuda.get_device_name(0)
    failed: list[str] = []

    def part(name: str, cmd: list[str], limit: float) -> subprocess.CompletedProcess | None:
        left = deadline - time.time()
        if left < 5:
            report["parts"][name] = {"status": "skipped: budget spent"}
            failed.append(name)
            return None
        t0 = time.time()
        try:
            p = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=min(limit, left))
        except subprocess.TimeoutExpired:
            report["parts"][name] = {"status": f"timed out after {min(limit, left):.0f} s"}
            failed.append(name)
            return None
        (out / f"{name}.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
        rec = {"status": "ok" if p.returncode == 0 else f"exit {p.returncode}", "seconds": round(time.time() - t0, 1)}
        if p.returncode != 0:
            rec["stderr_tail"] = p.stderr[-1500:]
            failed.append(name)
        report["parts"][name] = rec
        return p if p.returncode == 0 else None

    from tests.data_fixture import make_dataset

    data = make_dataset(out / "data", "toy", size=32 if smoke else 64)
    px = 32 if smoke else 64
    common = [f"data.sources=[{data}]", "data.mode=fixed", "data.ways=3", "data.shots=2", "data.queries=2",
              "data.workers=0", "model.name=vit_tiny_patch16_224", f"model.image_size={px}", "model.patch_size=8",
              "method.experts=4", "method.warmup_tasks=2", "method.total_tasks=16", f"dist.precision={precision}",
              "logging.wandb_mode=disabled", f"launcher.nproc={ranks}", "checkpoint.every_tasks=1"]
    if smoke:
        common.append("+model.kwargs.depth=1")
    steps = 4
    train = [sys.executable, "-m", "smat_dist.launch.cli"]
    part("train_uninterrupted", train + common + [f"train.tasks={steps * ranks}", f"run_dir={out / 'ref'}"], 240)
    stopped_at = interrupted(train + common + [f"train.tasks={steps * ranks}", f"run_dir={out / 'resumed'}"],
                             out / "resumed" / "metrics.jsonl", report, failed, deadline)
    part("train_resume", train + [f"resume={out / 'resumed'}"], 240)
    try:
        ref = [json.loads(x) for x in (out / "ref" / "metrics.jsonl").read_text().splitlines()]
        res = [json.loads(x) for x in (out / "resumed" / "metrics.jsonl").read_text().splitlines()]
        keys = [k for k in ref[-1] if k.startswith("loss/")]
        diff = max(abs(ref[-1][k] - res[-1][k]) for k in keys)
        tol = 0.0 if not gpus else 1e-3
        same = diff <= tol and ref[-1]["tasks"] == res[-1]["tasks"] and stopped_at is not None
        report["resume"] = {"stopped_at": stopped_at, "tasks": [ref[-1]["tasks"], res[-1]["tasks"]],
                            "max_abs_loss_diff": diff, "tolerance": tol, "same_as_uninterrupted": same}
        report["train_peak_mem_bytes"] = ref[-1].get("peak_mem_bytes")
        if not report["resume"]["same_as_uninterrupted"]:
            failed.append("resume")
    except (OSError, ValueError, KeyError, IndexError) as e:
        report["resume"] = {"error": f"{type(e).__name__}: {e}"}
        failed.append("resume")

    ev = part("eval_sharded", [sys.executable, "-m", "smat_dist.eval.cli", f"eval.checkpoint={out / 'ref'}",
                               f"eval.ranks={ranks}", "eval.episodes=4", "eval.methods=[smat,pretrained]",
                               f"run_dir={out / 'eval'}"] + [c for c in common if not c.startswith(
                                   ("launcher.", "checkpoint.", "method.", "dist.precision"))], 240)
    if ev is not None:
        report["eval"] = json.loads(ev.stdout.strip().splitlines()[-1]).get("averages")

    bench = [sys.executable, "-m", "smat_dist.bench.cli"]
    episode = ["--ways", "2", "--shots", "1", "--queries", "1"] if smoke else ["--ways", "5", "--shots", "5",
                                                                                "--queries", "10"]
    st = part("bench_step", bench + ["step", "--model", "vit_tiny_patch16_224", "--image-size", str(px),
                                     "--patch-size", "8", "--repeats", "1", *episode]
              + (["--precision", "bf16"] if gpus else []), 180)
    if st is not None:
        report["step"] = [json.loads(x) for x in st.stdout.splitlines() if x.startswith("{")]
    pl = part("bench_plan", bench + ["plan", "model=vit_tiny_patch16_224", "experts=4", f"ranks={ranks}",
                                     f"image_size={px}"], 60)
    if pl is not None:
        report["plan"] = [json.loads(x) for x in pl.stdout.splitlines() if x.startswith("{")]
    report["failed"] = failed
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"failed": failed, "resume": report.get("resume"), "parts": report["parts"]}, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
