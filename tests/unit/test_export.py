"""smat-export: packed masks equal the pool's eval masks, the merge equals the checkpoint's bit for bit, the
size formula, P>M>F and the pre-trained baseline, and every bad input refused with its name."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from smat_dist.config.schema import SparsityConfig
from smat_dist.eval.loading import load_method
from smat_dist.export.layout import ExportError
from smat_dist.export.loader import load_export
from smat_dist.export.masks import eval_gate, pack, unpack
from smat_dist.export.writer import export_run
from smat_dist.pool import gates as hc
from smat_dist.pool.shard import PoolShard
from tests.export_fixture import export_config, save_rank


@pytest.mark.parametrize("gate", ["upstream", "train"])
def test_packed_masks_are_the_pools_eval_masks(gate):
    cfg = SparsityConfig(eval_gate=gate)
    pool = PoolShard(0, 1003, 1003, 5, cfg, seed=3)
    with torch.no_grad():
        pool.log_alpha.copy_(torch.rand(1003, 5, generator=torch.Generator().manual_seed(1)) * 14 - 7)
    z = eval_gate(pool.log_alpha, cfg.clamp, hc.eval_beta(cfg))
    want = pool.passes.masks_inplace(train=False, clamp=True)
    assert torch.equal(z, want)
    bits, pos, val = pack(z)
    assert bits.numel() == -(-1003 * 5 // 8)
    assert 0 < pos.numel() < z.numel()                   # both kinds present
    assert torch.equal(unpack(bits, 1003, 5, pos, val), want)


def _checkpoint(tmp_path, experts=4, fractional=0.4, method="smat", pretrained=None):
    cfg = export_config(experts, method=method)
    cfg.model.pretrained = pretrained
    save_rank(0, 1, cfg, str(tmp_path / "run" / "checkpoints"), fractional)
    return tmp_path / "run"


def _merge(setup, w):
    setup.pool.begin_step(train=False)
    try:
        return setup.pool.merge(w)
    finally:
        setup.pool.end_eval()


@pytest.mark.parametrize("fractional,chunk_rows", [(0.4, None), (0.9, None), (0.5, 4096)])
def test_export_merges_and_predicts_exactly_as_the_checkpoint(tmp_path, monkeypatch, fractional, chunk_rows):
    """Sparse fractional entries (0.4), every chunk dense (0.9), and a mix of both in small chunks (0.5)."""
    if chunk_rows:
        monkeypatch.setattr("smat_dist.export.writer.CHUNK_ROWS", chunk_rows)
    run = _checkpoint(tmp_path, fractional=fractional)
    rec = export_run(str(run), str(tmp_path / "exp"))
    pool = rec["pool"]
    dense = {0.4: pool["dense_chunks"] == 0, 0.9: pool["dense_chunks"] == pool["chunks"],
             0.5: 0 < pool["dense_chunks"] < pool["chunks"]}[fractional]
    assert dense, pool
    # a dense chunk costs its float32 masks: never more than the fp32 masks + bits + delta + the hypernetwork
    assert rec["bytes"]["export"] <= rec["numel"] * (4 * 4 + 4 / 8 + 4) + rec["files"]["model.safetensors"]["size"] \
        + 8 * pool["sparse_fractional"] + 8 * (pool["chunks"] + 1) + 8192
    a, b = load_method(str(run)), load_export(str(tmp_path / "exp"))
    for seed in range(3):
        w = torch.softmax(torch.randn(4, generator=torch.Generator().manual_seed(seed)), 0)
        assert torch.equal(_merge(a, w), _merge(b, w))
    for (ka, va), (kb, vb) in zip(sorted(a.method.state_dict().items()), sorted(b.method.state_dict().items())):
        assert ka == kb and torch.equal(va, vb)
    assert rec["pool"]["fractional"] > 0 and rec["source"]["tasks"] == 3


@pytest.mark.parametrize("experts", [4, 16])
def test_size_formula(tmp_path, experts):
    """(M/8 + 4) bytes per backbone weight plus the hypernetwork, within 10%, plus 8 bytes per fractional entry."""
    run = _checkpoint(tmp_path, experts, fractional=0.001)
    rec = export_run(str(run), str(tmp_path / "exp"))
    b = rec["bytes"]
    frac = rec["pool"]["fractional"]
    assert b["fractional_bytes"] == 8 * frac and 0 < frac < 0.002 * rec["pool"]["entries"]
    assert rec["pool"]["dense_chunks"] == 0
    assert b["formula"] <= b["export"] - b["fractional_bytes"] <= 1.1 * b["formula"], b
    assert b["export"] < b["checkpoint"] / 3


def test_pmf_and_pretrained_export(tmp_path):
    run = _checkpoint(tmp_path, method="pmf")
    export_run(str(run), str(tmp_path / "pmf"))
    a, b = load_method(str(run)), load_export(str(tmp_path / "pmf"))
    assert b.kind == "pmf" and b.pool is None
    assert torch.equal(a.method.delta[: b.method.delta.numel()], b.method.delta)
    from smat_dist.data.episodes import Episode

    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]),
                 torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 1, 2]), "x", "test", 0, 3, ["a", "b", "c"])
    assert torch.equal(a.method.predict(ep), b.method.predict(ep))
    export_run(str(run), str(tmp_path / "pre"), baseline=True)
    c = load_export(str(tmp_path / "pre"))
    assert c.kind == "pretrained" and torch.equal(c.fb.theta_pre, a.fb.theta_pre)


def test_include_backbone_and_bad_backbones(tmp_path):
    from safetensors.torch import save_file

    from smat_dist.model.backbone import build_backbone

    cfg = export_config(4)
    torch.manual_seed(11)
    weights = tmp_path / "weights.safetensors"
    save_file(build_backbone(cfg.model).state_dict(), weights)
    run = _checkpoint(tmp_path, pretrained=str(weights))
    export_run(str(run), str(tmp_path / "ref"))
    rec = export_run(str(run), str(tmp_path / "inc"), include_backbone=True)
    assert rec["backbone"]["file_sha256"] and rec["files"]["backbone.safetensors"]["size"] > 0
    ref, inc = load_export(str(tmp_path / "ref")), load_export(str(tmp_path / "inc"))
    assert torch.equal(ref.fb.theta_pre, inc.fb.theta_pre)
    # the recorded weights changed: refused by digest; removed: refused naming the path; the included copy works
    sd = build_backbone(cfg.model).state_dict()
    save_file(sd, weights)
    with pytest.raises(ExportError, match="differ from the ones it was trained on"):
        load_export(str(tmp_path / "ref"))
    weights.unlink()
    with pytest.raises(ExportError, match="weights.safetensors.*cannot be loaded"):
        load_export(str(tmp_path / "ref"))
    load_export(str(tmp_path / "inc"))


def test_bad_exports_and_runs_are_refused(tmp_path):
    run = _checkpoint(tmp_path)
    exp = tmp_path / "exp"
    export_run(str(run), str(exp))
    with pytest.raises(ExportError, match="already exists"):
        export_run(str(run), str(exp))
    with pytest.raises(ExportError, match="no complete checkpoint at --step 7"):
        export_run(str(run), str(tmp_path / "x"), step=7)
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_run(str(tmp_path / "nowhere"), str(tmp_path / "y"))
    export_run(str(run), str(tmp_path / "at3"), step=3)
    # another version
    bad = tmp_path / "v0"
    shutil.copytree(exp, bad)
    mf = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(dict(mf, version=0)))
    with pytest.raises(ExportError, match="version 0"):
        load_export(str(bad))
    # a corrupt pool file
    bad = tmp_path / "corrupt"
    shutil.copytree(exp, bad)
    with open(bad / "pool.safetensors", "r+b") as f:
        f.seek(5000)
        f.write(b"\x01\x02\x03")
    with pytest.raises(ExportError, match="pool.safetensors is corrupt"):
        load_export(str(bad))
    with pytest.raises(ExportError, match="no such export folder"):
        load_export(str(tmp_path / "missing"))
    with pytest.raises(ExportError, match="not an smat-export manifest"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "manifest.json").write_text("{}")
        load_export(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="eval masks only"):
        load_export(str(exp)).pool.begin_step(train=True)


def test_structured_pool_is_refused_by_name(tmp_path):
    run = _checkpoint(tmp_path)
    ck = run / "checkpoints" / "step-000000003"
    mf = json.loads((ck / "manifest.json").read_text())
    for entry in mf["shards"]["pool"]:
        entry["tensors"]["log_alpha"]["index"] = "ids"
    (ck / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ExportError, match="structured masks"):
        export_run(str(run), str(tmp_path / "exp"))
    assert not (tmp_path / "exp").exists() and not (tmp_path / "exp.tmp").exists()
