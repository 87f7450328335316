"""Planned seconds per step: counted work over stated rates (a plan, not a measurement).

  plan_step_s = plan_compute_s + plan_pool_s + plan_comm_s        (no overlap assumed: a serial sum)
  plan_compute_s = flops_per_image x work_images / (peak x mfu)
  plan_pool_s    = POOL_PASSES x 4 rows M bytes per task / memory bandwidth
  plan_comm_s    = bytes a rank sends per step / link bandwidth (per direction)

flops_per_image: one forward of one image through the backbone, counted exactly on the meta device by
torch's FlopCounterMode (matmuls, convolutions, attention; 2 FLOPs per multiply-add; elementwise ops, norms
and softmax are not counted, under 1% of a ViT's matmul FLOPs). A backward counts as 2 forwards.

work_images: backbone work per step and rank in forward-image units (method/smat.py's docstring, the units
smat-bench step measures): SMAT 6S + 7Q per task (4 forwards, 2 of them without graph, and 3 backwards), with
the top teacher (method.teacher.top_fraction = f) 6S + (4 + 3f)Q; P>M>F 3S + 3Q (a forward and its backward);
times tasks per rank. The hypernetwork's and the heads' FLOPs are left out (under 0.1% at these sizes).

Pool passes: docs/deepspeed.md's count of aten ops over the [rows, M] arrays per task, 35 with
method.sparsity.release_masks (30 without), each taken as one read of 4 rows M bytes (ops that also write move
more: a lower bound on the traffic). rows = n = ceil(P / R) on the sharded path; the gather-all and zero3 paths
gate the gathered [P, M] logits, so rows = P there (an assumption: the count was measured on the sharded path).
P>M>F has no pool: its dense update is a few passes over [P] and is left out, as are SMAT's [P] passes.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

F32 = 4
POOL_PASSES = {True: 35, False: 30}     # per task, by method.sparsity.release_masks (docs/deepspeed.md)


@dataclass(frozen=True)
class Device:
    """Stated rates of one accelerator: dense peak (TFLOP/s, the dtype the step's matmuls run in), memory
    bandwidth (GB/s), link bandwidth per direction (GB/s) and the achievable fraction of the peak (mfu)."""
    name: str
    peak_tflops: float
    mem_gbps: float
    link_gbps: float
    mfu: float


# NVIDIA datasheets, SXM parts, DENSE bf16 tensor-core figures (the sparse ones are twice these); NVLink is
# the total bidirectional bandwidth halved. H100: 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 900 GB/s (H100 Tensor
# Core GPU datasheet). H200: 989 TFLOP/s, HBM3e 4.8 TB/s, NVLink 900 GB/s (H200 datasheet). A100 80GB: 312
# TFLOP/s, HBM2e 2,039 GB/s, NVLink 600 GB/s (A100 datasheet). mfu 0.4 is an assumption, not a measurement.
PRESETS = {
    "h100": Device("h100", 989.0, 3350.0, 450.0, 0.4),
    "h200": Device("h200", 989.0, 4800.0, 450.0, 0.4),
    "a100": Device("a100", 312.0, 2039.0, 300.0, 0.4),
}
DEVICES = (*PRESETS, "cpu")


def measure_cpu(seconds: float = 1.0, size: int = 1024, copy_mb: int = 256) -> Device:
    """This machine's rates at torch's current thread count: the median rate of fp32 GEMMs (size^3) and of
    a large tensor copy (bytes read + written). mfu 1: the plan uses the GEMM's own achieved rate."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    src = torch.empty(copy_mb * 2**20 // F32)
    dst = torch.empty_like(src)

    def rates(fn, work) -> float:
        fn()                                                # warm-up: first-touch pages, thread pool
        out, t_end = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end or len(out) < 3:
            t0 = time.perf_counter()
            fn()
            out.append(work / (time.perf_counter() - t0))
        return sorted(out)[len(out) // 2]

    flops = rates(lambda: torch.mm(a, b), 2 * size ** 3)
    bw = rates(lambda: dst.copy_(src), 2 * src.numel() * F32)
    # one machine: ranks talk through shared memory, at most at the copy rate (an optimistic figure)
    return Device("cpu", flops / 1e12, bw / 1e9, bw / 1e9, 1.0)


def device_for(name: str, mfu: float | None = None, peak_tflops: float | None = None,
               mem_gbps: float | None = None, link_gbps: float | None = None) -> Device:
    """A preset (or `cpu`, measured now) with any of its figures overridden."""
    if name not in DEVICES:
        raise ValueError(f"plan: device={name!r}: expected one of {', '.join(DEVICES)}")
    d = measure_cpu() if name == "cpu" else PRESETS[name]
    over = {"mfu": mfu, "peak_tflops": peak_tflops, "mem_gbps": mem_gbps, "link_gbps": link_gbps}
    d = Device(**{**asdict(d), **{k: float(v) for k, v in over.items() if v is not None}})
    if min(d.peak_tflops, d.mem_gbps, d.link_gbps) <= 0 or not 0 < d.mfu <= 1:
        raise ValueError(f"plan: need positive rates and 0 < mfu <= 1; got {asdict(d)}")
    return d


def work_images(support: int, query: int, method: str = "smat", top_fraction: float = 1.0,
                tasks: int = 1) -> float:
    """Backbone work per step in forward-image units (a backward = 2 forwards; see the module docstring)."""
    if method == "smat":
        return tasks * (6 * support + (4 + 3 * top_fraction) * query)
    if method == "pmf":
        return tasks * (3 * support + 3 * query)
    raise ValueError(f"method={method!r}: expected smat or pmf")


def plan_times(dev: Device, flops_img: int, support: int, query: int, params: int, experts: int, ranks: int,
               sent_bytes_per_step: dict, tasks_per_rank: int = 1, top_fraction: float = 1.0,
               release_masks: bool = True) -> dict:
    """The plan's time keys: per path (sharded / gather / zero3 from `sent_bytes_per_step`, and pmf) the
    planned step and its parts, with the counted work and the device's stated figures."""
    rate = dev.peak_tflops * 1e12 * dev.mfu
    link = dev.link_gbps * 1e9
    n = math.ceil(params / ranks)
    work = {"smat": work_images(support, query, "smat", top_fraction, tasks_per_rank),
            "pmf": work_images(support, query, "pmf", tasks=tasks_per_rank)}
    passes = POOL_PASSES[bool(release_masks)]
    parts: dict = {"plan_compute_s": {}, "plan_pool_s": {}, "plan_comm_s": {}}
    for path, sent in sent_bytes_per_step.items():
        rows = n if path == "sharded" else n * ranks
        parts["plan_compute_s"][path] = flops_img * work["smat"] / rate
        parts["plan_pool_s"][path] = tasks_per_rank * passes * F32 * rows * experts / (dev.mem_gbps * 1e9)
        parts["plan_comm_s"][path] = sent / link
    # P>M>F data-parallel: the dense fp32 gradient's all-reduce (ZeRO 1-2: reduce-scatter + all-gather, the
    # same ring volume), once per step
    parts["plan_compute_s"]["pmf"] = flops_img * work["pmf"] / rate
    parts["plan_pool_s"]["pmf"] = 0.0
    parts["plan_comm_s"]["pmf"] = 2 * (ranks - 1) / ranks * F32 * n * ranks / link
    step = {p: sum(parts[k][p] for k in parts) for p in parts["plan_compute_s"]}
    return {"plan_step_s": step, **parts, "flops_per_image": int(flops_img), "work_images": work,
            "support_images": support, "query_images": query, "pool_passes_per_task": passes,
            "device": dev.name, "peak_tflops": dev.peak_tflops, "mfu": dev.mfu, "mem_gbps": dev.mem_gbps,
            "link_gbps": dev.link_gbps}
