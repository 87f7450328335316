"""glibc's mmap threshold, fixed for a process (`launcher.malloc_mmap_threshold`, `smat-bench step --mmap-threshold`).

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
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3          # mallopt parameter (malloc.h)
MAX_THRESHOLD = 32 * 1024 * 1024   # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def set_mmap_threshold(nbytes: int, what: str = "launcher.malloc_mmap_threshold") -> bool:
    """Fix glibc's mmap threshold at `nbytes` (0: leave glibc's dynamic default). Returns whether it was set;
    False where the C library is not glibc (no mallopt). Out of range is a ValueError naming `what`."""
    if nbytes == 0:
        return False
    if not 0 < nbytes <= MAX_THRESHOLD:
        raise ValueError(f"{what}={nbytes}: expected 0 (glibc's default) or a size in bytes up to {MAX_THRESHOLD}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))
