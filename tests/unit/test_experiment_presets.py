"""experiment=paper_vit_small / paper_vit_base: the paper's recipe in one word (configs/experiment/)."""
from __future__ import annotations

import pytest

from smat_dist.config.hydra import compose

MD8 = ["ilsvrc_2012", "aircraft", "cu_birds", "quickdraw", "dtd", "fungi", "vgg_flower", "omniglot"]


@pytest.mark.parametrize("name,model,tasks,tau,delta_lr", [
    ("paper_vit_small", "vit_small_patch16_224", 50000, 0.90, 1e-4),
    ("paper_vit_base", "vit_base_patch16_224", 100000, 0.95, 5e-4)])
def test_paper_presets_set_the_papers_values(name, model, tasks, tau, delta_lr):
    cfg = compose("train", [f"experiment={name}"])
    assert (cfg.model.name, cfg.model.image_size, cfg.model.patch_size) == (model, 128, 16)
    assert cfg.model.pretrained.startswith("weights/dino_")
    assert [s.split("/")[-1] for s in cfg.data.sources] == MD8
    assert str(cfg.data.mode) == "variable" and cfg.data.max_ways == 50 and cfg.data.max_support == 500
    assert cfg.train.tasks == tasks and cfg.train.tasks_per_rank == 4
    m, sp = cfg.method, cfg.method.sparsity
    assert (m.name, m.experts, m.delta_lr, m.warmup_tasks, m.total_tasks) == ("smat", 8, delta_lr, 10000, 100000)
    assert (sp.target, sp.lambda_lr, sp.schedule_share, sp.mask_lr, sp.mask_clip) == (tau, 0.002, 0.0, 1e6, 5.0)
    assert (str(sp.lambda_lr_scale), str(sp.expert_weight), str(sp.eval_gate)) == ("none", "merge", "upstream")
    assert (m.hypernet.t_decay, m.hypernet.lr, m.teacher.lr, m.teacher.lam) == (4000.0, 1e-4, 0.005, 0.25)
    assert cfg.eval.episodes == 600 and cfg.data.val_episodes == 120
    assert cfg.checkpoint.keep_every % cfg.checkpoint.every_tasks == 0      # the curve's points are all saved


def test_preset_composes_with_pmf_and_overrides_and_in_smat_eval():
    cfg = compose("train", ["experiment=paper_vit_small", "method=pmf", "train.tasks=100", "model.pretrained=x.pth"])
    assert cfg.method.name == "pmf" and cfg.method.pmf_lr == 5e-4 and cfg.train.tasks == 100
    assert cfg.model.pretrained == "x.pth" and cfg.method.warmup_tasks == 10000
    ev = compose("eval", ["experiment=paper_vit_base"])
    assert ev.eval.episodes == 600 and ev.model.image_size == 128
    # without the preset, nothing changes
    assert compose("train", []).model.image_size != 128
