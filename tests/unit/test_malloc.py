"""launcher.malloc_mmap_threshold: a fixed glibc mmap threshold returns a freed large tensor to the system (the
resident peak is what is alive), where glibc's dynamic threshold keeps it in the heap; bad values of it
and of the trim threshold (smat-bench step --trim-threshold) are refused."""
from __future__ import annotations

import subprocess
import sys

import pytest

from smat_dist.config.hydra import ConfigError, compose
from smat_dist.utils.malloc import MAX_THRESHOLD, MAX_TRIM, set_mmap_threshold, set_trim_threshold
from tests.unit.test_config import SRC

# In a fresh process: a 24 MB tensor freed raises glibc's dynamic threshold to 24 MB, so a 4 MB tensor then comes
# from the heap and stays resident after it is freed; with a fixed 128 KB threshold it is unmapped at once.
_PROBE = """
import sys, torch
from smat_dist.utils.malloc import set_mmap_threshold
from smat_dist.utils.memory import rss_bytes
fixed = set_mmap_threshold(int(sys.argv[1]))
big = torch.ones(6 << 20); del big
t = torch.ones(1 << 20)
before = rss_bytes(); del t
print(int(fixed), before - rss_bytes())
"""


def _freed(threshold: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(threshold)], capture_output=True, text=True, check=True)
    fixed, freed = out.stdout.split()
    return bool(int(fixed)), int(freed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_a_fixed_threshold_returns_freed_tensors_to_the_system():
    fixed, freed = _freed(128 * 1024)
    assert fixed and freed >= 3 << 20                 # the 4 MB tensor's pages left the process
    fixed, freed = _freed(0)
    assert not fixed and freed < 1 << 20              # glibc's default kept them in the heap


def test_bad_thresholds_are_refused_naming_the_key():
    assert set_mmap_threshold(0) is False
    with pytest.raises(ValueError, match="launcher.malloc_mmap_threshold"):
        set_mmap_threshold(MAX_THRESHOLD + 1)
    with pytest.raises(ConfigError, match=r"launcher\.malloc_mmap_threshold"):
        compose("train", SRC + [f"launcher.malloc_mmap_threshold={MAX_THRESHOLD + 1}"])
    assert compose("train", SRC + ["launcher.malloc_mmap_threshold=131072"]).launcher.malloc_mmap_threshold == 131072


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_rank_processes_apply_and_log_the_threshold():
    code = ("from smat_dist.config.schema import LauncherConfig; from smat_dist.launch.env import apply_rank_math; "
            "print(apply_rank_math(LauncherConfig(malloc_mmap_threshold=131072), 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "malloc mmap threshold 131072 B" in out


def test_bad_trim_thresholds_are_refused_naming_the_flag():
    assert set_trim_threshold(0) is False
    with pytest.raises(ValueError, match="smat-bench step --trim-threshold"):
        set_trim_threshold(MAX_TRIM + 1)
