"""smat-eval on a remote source whose server has no byte ranges (issue 29, item 7): the command ends within
seconds with the server's real answer in one line (it used to print torch's worker traceback and never exit)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.unit.test_remote_reads import served  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e]


def test_eval_on_a_server_without_byte_ranges_exits_with_the_real_message(served, tmp_path):  # noqa: F811
    url, _ = served
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "smat_dist.eval.cli", f"data.sources=[{url}]",
                        "eval.methods=[pretrained]", "eval.episodes=2", "data.workers=1", "model.image_size=32",
                        "model.patch_size=8", "data.ways=3", "data.shots=2", "data.queries=2",
                        f"run_dir={tmp_path / 'e'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("smat-eval: error: shard ") and "answered 200 to a Range request" in last
    assert "Traceback" not in p.stderr and "Caught" not in p.stderr
    assert time.monotonic() - t0 < 90


def test_eval_on_a_stalled_server_exits_with_the_timeout(served, tmp_path):  # noqa: F811
    url, handler = served
    handler.stall = True
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "smat_dist.eval.cli", f"data.sources=[{url}]",
                        "eval.methods=[pretrained]", "data.remote_timeout_s=0.5", "data.remote_retries=1",
                        f"run_dir={tmp_path / 'e'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("smat-eval: error:") and "timed out" in last and "2 tries, timeout 0.5 s each" in last, last
    assert "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 60
