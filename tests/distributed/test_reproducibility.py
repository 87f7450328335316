"""The CPU math of the ranks the local launcher starts comes from the config, not from the machine (issue 16,
docs/demo.md "Reproducibility"): launcher.threads fixes every rank's intra-op thread count whatever os.cpu_count()
and the shell's OMP_NUM_THREADS say, and launcher.portable_math caps ATen / oneDNN / MKL to their portable
kernels. Before, each rank ran cpu_count // nproc threads (1 here, 8 on a 16-core machine), and the thread
count changes how reductions split: a different final pool in the last bits, then in the masks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smat_dist.launch.local import launch_local
from tests.data_fixture import make_dataset
from tests.distributed.helpers import read_pool_shard, tiny_config

pytestmark = pytest.mark.dist


def report_math(cfg, run_dir, should_stop) -> dict:
    """A rank function that only reports the math its process got."""
    return {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                                                   "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}}


def _bigger_machine(monkeypatch, cores: int = 16, omp: str = "3"):
    """What the launcher sees on another machine: more cores, and a shell that exports OMP_NUM_THREADS."""
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("OMP_NUM_THREADS", omp)


def test_rank_threads_and_isa_come_from_the_config(tmp_path, monkeypatch):
    _bigger_machine(monkeypatch)
    cfg = tiny_config(str(tmp_path))
    ranks = launch_local(cfg, str(tmp_path / "a"), rank_fn=f"{__name__}:report_math")["ranks"]
    assert [r["threads"] for r in ranks] == [1, 1], ranks          # default launcher.threads=1, not 16 // 2 or 3
    assert all(r["env"]["OMP_NUM_THREADS"] == r["env"]["MKL_NUM_THREADS"] == "1" for r in ranks)
    assert all(r["env"]["ATEN_CPU_CAPABILITY"] is None for r in ranks)

    cfg.launcher.threads, cfg.launcher.portable_math = 2, True
    ranks = launch_local(cfg, str(tmp_path / "b"), rank_fn=f"{__name__}:report_math")["ranks"]
    assert [r["threads"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["capability"] == "DEFAULT"
        assert (r["env"]["ATEN_CPU_CAPABILITY"], r["env"]["ONEDNN_MAX_CPU_ISA"], r["env"]["MKL_CBWR"]) == \
            ("default", "SSE41", "COMPATIBLE")

    cfg.launcher.threads, cfg.launcher.portable_math = 0, False     # 0: the machine's share, as before
    ranks = launch_local(cfg, str(tmp_path / "c"), rank_fn=f"{__name__}:report_math")["ranks"]
    assert [r["threads"] for r in ranks] == [8, 8]


def _final_pool(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip())
    out = {}
    for f in sorted(ck.glob("pool-rank*.safetensors")):
        s = read_pool_shard(f)
        out.update({f"{f.stem}.{k}": s[k] for k in ("delta", "log_alpha", "multipliers")})
    out.update(torch.load(ck / "replicated.pt", weights_only=True))
    return out


@pytest.mark.slow   # two 2-rank trainings: ~30 s on an idle 2-core machine, ~60 s on a loaded one
def test_same_config_trains_the_same_bits_on_a_machine_with_more_cores(tmp_path, monkeypatch):
    # one step of 2 tasks; with the old launcher the second run had 2 threads per rank and 22 of the 28 final
    # tensors differed (hypernetwork AdamW state by up to 2e-8)
    data = str(make_dataset(tmp_path / "data", "toy"))
    cfg = tiny_config(data, tasks=2)
    launch_local(cfg, str(tmp_path / "here"))
    _bigger_machine(monkeypatch, cores=4, omp="2")   # before: 2 threads per rank instead of 1
    launch_local(cfg, str(tmp_path / "there"))
    a, b = _final_pool(tmp_path / "here"), _final_pool(tmp_path / "there")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
