"""One converted episode written out as the folders smat-predict reads: support/<j>_<class>/<k>.<ext> and
query/<j>_<k>.<ext>, with the exact image bytes the shards hold (so the predictor sees the same pixels smat-eval
sees, in the same order: class j's folder sorts j-th, and a class's images in member order)."""
from __future__ import annotations

import re
from pathlib import Path


def _ext(data: bytes) -> str:
    return "png" if data[:4] == b"\x89PNG" else "jpg" if data[:2] == b"\xff\xd8" else "img"


def write_episode_tree(source: str, split: str, index: int, ep_cfg, dest: str | Path) -> tuple[Path, Path, list]:
    """Episode `index` of the fixed `split` episodes of `source` -> (support folder, query folder, [(query
    file, true class folder)])."""
    from smat_dist.data.fixed_sets import fixed_episodes

    eps = fixed_episodes(source, split, index + 1, cfg=ep_cfg)
    d = eps.descriptions[index]
    stream = eps.stream
    spec = stream.specs[stream.source_names.index(d.source)]
    datas = stream.reader.read_classes(spec, [(lab, s + q) for lab, s, q in zip(d.labels, d.support_ids, d.query_ids)])
    dest = Path(dest)
    truth = []
    for j, (name, s_ids, blobs) in enumerate(zip(d.class_names, d.support_ids, datas)):
        folder = f"{j:02d}_" + re.sub(r"[^\w.+-]+", "_", name)   # a class name may hold '/' or spaces
        for k, b in enumerate(blobs):
            q = k - len(s_ids)
            path = (dest / "support" / folder / f"{k:03d}.{_ext(b)}" if q < 0
                    else dest / "query" / f"{j:02d}_{q:03d}.{_ext(b)}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b)
            if q >= 0:
                truth.append((str(path), folder))
    return dest / "support", dest / "query", truth
