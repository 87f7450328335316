"""smat-bench rehearse, the quick parts: the up-front refusal, and the state comparison across world sizes that
decides `resumed_equal` (the whole command runs in tests/distributed/test_rehearse_command.py, slow tier)."""
from __future__ import annotations

import json

import torch

from smat_dist.bench import rehearse_state
from smat_dist.bench.cli import main
from smat_dist.checkpoint.shard_file import write_shard


def test_refuses_in_one_line_before_writing_anything(tmp_path, capsys):
    work = tmp_path / "work"
    rc = main(["rehearse", "--model", "vit_base_patch16_224", "--experts", "100000", "--work", str(work)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("smat-bench: error: rehearse: the largest phase needs") and "MemAvailable" in err[-1]
    assert not work.exists()


def _checkpoint(ck, delta, la, slices, mult):
    """A checkpoint folder with one pool shard per slice [lo, hi), as the Checkpointer lays them out."""
    ck.mkdir(parents=True)
    shards = []
    for r, (lo, hi) in enumerate(slices):
        recs = {k: {"index": "range", "lo": lo, "hi": hi} for k in ("delta", "log_alpha")}
        write_shard(ck / f"pool-rank{r:05d}.safetensors",
                    {"_replicated.multipliers": mult, "delta": delta[lo:hi], "log_alpha": la[lo:hi]},
                    {"tensors": json.dumps(recs)})
        shards.append({"file": f"pool-rank{r:05d}.safetensors", "rank": r, "tensors": recs})
    (ck / "manifest.json").write_text(json.dumps({"shards": {"pool": shards}}))
    torch.save({"hypernet.keys": torch.ones(3, 4)}, ck / "replicated.pt")
    return ck


def test_pool_compared_row_for_row_across_world_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(rehearse_state, "ROWS_BYTES", 3 * 3 * 4)   # blocks of 3 rows that straddle the slices
    g = torch.Generator().manual_seed(0)
    delta, la, mult = torch.randn(10, generator=g), torch.randn(10, 3, generator=g), torch.randn(3, generator=g)
    two = _checkpoint(tmp_path / "two", delta, la, [(0, 5), (5, 10)], mult)
    one = _checkpoint(tmp_path / "one", delta, la, [(0, 10)], mult)
    same = rehearse_state.summary(two, one)
    assert same["pool_bit_exact"] and same["replicated_bit_exact"] and same["replicated_close"]
    assert set(same["pool_max_abs_diff"]) == {"delta", "log_alpha", "_replicated.multipliers"}

    la2 = la.clone()
    la2[7, 1] = torch.nextafter(la2[7, 1], torch.tensor(10.0))         # one ulp in the second slice
    off = _checkpoint(tmp_path / "off", delta, la2, [(0, 10)], mult)
    rep = torch.load(off / "replicated.pt")
    rep["hypernet.keys"][0, 0] += 1e-5                                 # within the cross-world-size tolerance
    torch.save(rep, off / "replicated.pt")
    diff = rehearse_state.summary(two, off)
    assert not diff["pool_bit_exact"]
    assert 0 < diff["pool_max_abs_diff"]["log_alpha"] < 1e-6 and diff["pool_max_abs_diff"]["delta"] == 0
    assert not diff["replicated_bit_exact"] and diff["replicated_close"]


def test_disk_need_holds_every_checkpoint_and_the_exports_peak():
    """The work folder keeps the 2-rank run's two checkpoints and the resumed run's one, then the export, whose
    pool file (as large as a checkpoint after two steps: fractional masks are stored as values) is copied out of
    a temporary file while it closes. The ViT-B/16 x 26 rehearsal ran out of disk in its export when the need
    counted the export as pool_entries / 4 bytes."""
    from smat_dist.bench.rehearse import HEADROOM, requirements

    s2, s1, n = 4_855_000_000, 9_710_000_000, 2_227_829_760     # the ViT-B/16 x 26 point's shards and entries
    need = requirements({"train_2ranks": 1, "resume_1rank": 1, "eval_2ranks": 1, "shard_bytes_2ranks": s2,
                         "shard_bytes_1rank": s1, "pool_entries": n}, rank_base=0)
    written = 2 * 2 * s2 + s1                                   # the three checkpoints, all kept
    export_peak = 2 * s1                                        # the pool file and its temporary copy
    assert need["disk_bytes"] >= (written + export_peak) * HEADROOM
