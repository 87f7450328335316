"""Load an export folder (smat-export's output) as a MethodSetup for evaluation and prediction.

One process, no checkpoint, no DeepSpeed: the backbone is rebuilt from the recorded config (its weights from
the recorded path, or from the export with --include-backbone) and must match the recorded digest; the
replicated module comes from model.safetensors and SMAT's pool is a PackedPool. Every file is checked
against the manifest's sha256 before it is used.
"""
from __future__ import annotations

from pathlib import Path

import torch

from smat_dist.export import layout as L
from smat_dist.utils.log import get_logger

log = get_logger(__name__)


def _backbone(root: Path, manifest: dict, cfg):
    from safetensors.torch import load_file

    from smat_dist.model.backbone import build_backbone
    from smat_dist.model.weights import WeightsError

    rec = manifest["backbone"]
    torch.manual_seed(cfg.train.seed)      # as smat_dist.build: a random-init backbone is the seed's
    if rec["included"]:
        cfg.model.pretrained = None
        model = build_backbone(cfg.model)
        sd = load_file(str(root / L.BACKBONE))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise L.ExportError(f"{root / L.BACKBONE} does not fit {cfg.model.name}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
        where = str(root / L.BACKBONE)
    else:
        try:
            model = build_backbone(cfg.model)
        except (WeightsError, FileNotFoundError, OSError) as e:
            raise L.ExportError(f"export {root}: its backbone weights {rec['pretrained']!r} cannot be loaded ({e}); "
                                "put them back at that path, or export with --include-backbone") from e
        where = rec["pretrained"] or f"random init, seed {cfg.train.seed}"
    if L.state_digest(model.state_dict()) != rec["weights_sha256"]:
        raise L.ExportError(f"export {root}: the backbone weights from {where} differ from the ones it was trained "
                            f"on (digest {rec['weights_sha256'][:16]}... in {root / L.MANIFEST})")
    return model


def load_export(path: str, device: torch.device | None = None):
    """The exported model as a MethodSetup (kind smat / pmf / pretrained; hyper None: evaluation only)."""
    from safetensors.torch import load_file

    from smat_dist.build import MethodSetup
    from smat_dist.config.hydra import ConfigError, load_yaml
    from smat_dist.export.packed_pool import PackedPool
    from smat_dist.method.baselines import PMF, Pretrained
    from smat_dist.method.smat import SMAT
    from smat_dist.model.backbone import FunctionalBackbone

    root = Path(path)
    manifest = L.read_export_manifest(root)
    L.verify_files(root, manifest)
    try:
        cfg = load_yaml(root / L.CONFIG)
    except ConfigError as e:
        raise L.ExportError(str(e)) from e
    fb = FunctionalBackbone(_backbone(root, manifest, cfg), pad_to=1)
    if fb.space.numel != manifest["numel"]:
        raise L.ExportError(f"export {root}: backbone has {fb.space.numel} weights, the manifest {manifest['numel']}")
    kind = manifest.get("kind")
    if kind not in ("smat", "pmf", "pretrained"):
        raise L.ExportError(f"{root / L.MANIFEST}: model kind {kind!r}, expected smat, pmf or pretrained")
    method = {"smat": lambda: SMAT(fb, cfg.method, cfg.train.seed), "pmf": lambda: PMF(fb, cfg.method),
              "pretrained": lambda: Pretrained(fb, cfg.method)}[kind]()
    if kind != "pretrained":
        sd = load_file(str(root / L.MODEL))
        missing, unexpected = method.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise L.ExportError(f"{root / L.MODEL} does not match method {kind}: missing {missing}, "
                                f"unexpected {unexpected}")
    pool = None
    if kind == "smat":
        pool = PackedPool(load_file(str(root / L.POOL)), manifest["pool"]["experts"], fb.space.padded,
                          manifest["pool"]["chunk_rows"])
    if device is not None:
        fb = fb.to(device)
        method = method.to(device)
        pool = pool.to(device) if pool is not None else None
    log.info("loaded exported %s model from %s (%s pool bytes)", kind, root, "-" if pool is None else pool.nbytes())
    return MethodSetup(fb, method, pool, None, kind)
