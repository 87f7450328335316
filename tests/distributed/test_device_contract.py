"""Two gloo ranks under `dist.check_devices=true` through every path a GPU job takes: training with
validation, async saves, a resume, a sharded evaluation (zero-shot and LoRA) and the mask analysis. In this
mode a tensor made without `device=` is marked, and every device collective (the pool's merge, the step's
reductions, the sharded evaluation) refuses a marked tensor, bf16 and a tensor on the wrong device: the CPU
run fails wherever NCCL on a GPU would."""
from __future__ import annotations

import pytest
import torch

from smat_dist.config.schema import EvalConfig
from tests.data_fixture import make_dataset
from tests.distributed.helpers import run_ranks, tiny_config, train_rank

pytestmark = pytest.mark.dist


def _checked_paths(rank: int, world: int, cfg, run_dir: str, out_dir: str) -> dict:
    from pathlib import Path

    from smat_dist.analysis.cli import analyze_run
    from smat_dist.eval.cli import run as eval_run
    from smat_dist.utils.devcheck import HostBornMode

    first = train_rank(rank, world, cfg, run_dir, 1)        # one step (2 tasks), saved, stopped
    cfg.train.tasks = 6
    done = train_rank(rank, world, cfg, run_dir)            # resumed from it to the end (validation at 4)
    assert any(isinstance(m, HostBornMode) for m in torch.overrides._get_current_function_mode_stack())
    ev = cfg
    ev.eval = EvalConfig(checkpoint=run_dir, methods=["smat", "pretrained"], modes=["zeroshot", "lora"],
                         episodes=3, val_episodes=2, finetune_steps=1, lr_grid=[1e-3])
    ev.run_dir = out_dir
    summary = eval_run(ev)
    analysis = analyze_run(Path(run_dir), Path(out_dir) / f"analysis{rank}", "test", 0)
    return {"first": first["out"]["tasks"], "done": done["out"], "summary": summary["averages"],
            "overall": analysis["capacity"]["overall"] if "capacity" in analysis else analysis}


def test_two_ranks_train_resume_evaluate_and_analyse_under_the_device_checks(tmp_path):
    data = str(make_dataset(tmp_path / "data", "toy"))
    cfg = tiny_config(data, tasks=6, tasks_per_rank=1, every=2)
    cfg.dist.check_devices = True
    cfg.train.val_every_tasks = 4
    cfg.data.val_episodes = 2
    res = run_ranks(_checked_paths, 2, cfg, str(tmp_path / "run"), str(tmp_path / "eval"))
    for r in res:
        assert r["first"] == 2 and r["done"]["tasks"] == 6 and r["done"]["status"] == "done"
    assert res[0]["summary"] == res[1]["summary"]
    assert set(res[0]["summary"]) == {"smat/zeroshot", "smat/lora", "pretrained/zeroshot", "pretrained/lora"}
    assert res[0]["overall"] == res[1]["overall"]
