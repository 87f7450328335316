"""A SMAT pool saved by 2 gloo ranks, exported, and meta-tested in one process: `smat-eval eval.model=EXPORT`
gives exactly the per-episode accuracies of `smat-eval eval.checkpoint=RUN` (zero-shot and LoRA)."""
from __future__ import annotations

import json

import pytest

from tests.distributed.helpers import run_ranks
from smat_dist.eval.cli import main as smat_eval
from smat_dist.export.cli import main as smat_export
from tests.data_fixture import make_dataset
from tests.export_fixture import export_config, save_rank

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("export2")
    run_ranks(save_rank, 2, export_config(3), str(root / "run" / "checkpoints"), 0.05)
    return root, make_dataset(root, "toy", splits={"train": 4, "val": 4, "test": 4}, images=6)


def test_export_evaluates_exactly_as_the_two_rank_checkpoint(saved, capsys):
    root, data = saved
    assert smat_export([str(root / "run"), "--output", str(root / "exp")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kind"] == "smat" and out["bytes"]["export"] < out["bytes"]["checkpoint"]
    common = [f"data.sources=[{data}]", "eval.methods=[smat]", "eval.modes=[zeroshot,lora]", "eval.episodes=3",
              "eval.val_episodes=1", "eval.finetune_steps=2", "eval.lr_grid=[1e-3]", "data.mode=fixed",
              "data.ways=3", "data.shots=2", "data.queries=2", "data.workers=0", "model.name=vit_tiny_patch16_224",
              "model.image_size=32", "model.patch_size=8", "logging.wandb_mode=disabled"]
    assert smat_eval([f"eval.checkpoint={root / 'run'}", f"run_dir={root / 'e_ck'}", *common]) == 0
    assert smat_eval([f"eval.model={root / 'exp'}", f"run_dir={root / 'e_ex'}", *common]) == 0
    a = json.loads((root / "e_ck" / "results.json").read_text())
    b = json.loads((root / "e_ex" / "results.json").read_text())
    assert a["results"] == b["results"]
    assert set(a["results"]["smat"]) == {"zeroshot", "lora"}
    per_a = json.loads((root / "e_ck" / "episodes.json").read_text())
    per_b = json.loads((root / "e_ex" / "episodes.json").read_text())
    assert per_a == per_b
