"""glibc's mmap and trim thresholds, fixed for a process (`launcher.malloc_mmap_threshold`, `smat-bench step
--mmap-threshold` / `--trim-threshold`).

By default glibc raises its mmap threshold every time a large block is freed, up to 32 MB, so after the first
step most activation tensors come from the brk heap. SMAT's dense teacher runs a backward through the query
graph while that graph is kept for the outer backward: its gradient temporaries cannot reuse the activations'
memory, and with long-lived weight gradients interleaved among them the heap grows by about half the query graph
(measured: +400 MB at ViT-Ti 84 px, 100 query images, against +25 MB with a fixed 128 KB threshold) that stays
resident. Much of that growth came from the teacher's per-tensor gradients being held to the backward's end; the
teacher's query pass now makes each unit's views just before the unit runs, so they are handed over unit by unit
(model/backbone.py `_call_by_unit`; at ViT-S 128 px the heap's growth in that backward fell from +0.9 GB to
+0.15 GB), and the threshold stays off by default. A fixed threshold serves every large tensor from its own mapping,
returned to the system when the tensor is freed, so the resident peak is what is alive; the price is a page
fault per page of each large tensor (time). The results are unchanged: only where the bytes live.

The trim threshold is the other side of that trade, measured only (`smat-bench step --trim-threshold`): glibc
gives the top of its heap back to the system once more than the threshold is free there, and a later step faults
those pages in again. A SMAT step on CPU pays 2.8e4-1.0e5 minor faults per task (ViT-Ti 84 px, 4 tasks per step,
the bench's `smat_minflt_per_task`), P>M>F 0.5e4-2.5e4; with the trim threshold at 1 GB and the mmap threshold at
its ceiling (freed memory kept for the next step, as a GPU's caching allocator keeps its blocks) both pay ~0, and
SMAT's time over P>M>F's did not move beyond the run-to-run noise (docs/deepspeed.md, the last section), so no
launcher setting uses it.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1          # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MAX_THRESHOLD = 32 * 1024 * 1024   # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
MAX_TRIM = 1 << 40                 # any size_t is valid; beyond a TB is a typo


def _set(param: int, nbytes: int, limit: int, what: str) -> bool:
    """mallopt(param, nbytes) when nbytes > 0; whether it was set (False for 0, or where the C library is not
    glibc: no mallopt). Out of range is a ValueError naming `what`."""
    if nbytes == 0:
        return False
    if not 0 < nbytes <= limit:
        raise ValueError(f"{what}={nbytes}: expected 0 (glibc's default) or a size in bytes up to {limit}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    return False if mallopt is None else bool(mallopt(param, int(nbytes)))


def set_mmap_threshold(nbytes: int, what: str = "launcher.malloc_mmap_threshold") -> bool:
    """Fix glibc's mmap threshold at `nbytes` (0: leave glibc's dynamic default). Returns whether it was set;
    False where the C library is not glibc (no mallopt). Out of range is a ValueError naming `what`."""
    return _set(M_MMAP_THRESHOLD, nbytes, MAX_THRESHOLD, what)


def set_trim_threshold(nbytes: int, what: str = "smat-bench step --trim-threshold") -> bool:
    """Fix glibc's trim threshold at `nbytes` (0: leave glibc's dynamic default): free memory at the top of the
    heap is kept up to that size instead of given back to the system. Returns whether it was set (False where
    there is no glibc mallopt); out of range is a ValueError naming `what`."""
    return _set(M_TRIM_THRESHOLD, nbytes, MAX_TRIM, what)
