"""smat-export RUN [--step N] --output PATH [--include-backbone] [--baseline pretrained]

Writes one self-contained model folder from a trained run: the eval masks of every expert bit-packed (the
fractional entries stored exactly beside them), delta, the hypernetwork (P>M>F: its dense delta and head),
the config that rebuilds it, and the backbone's identity (its weights path and digest, or the weights
themselves with --include-backbone), with a manifest of sha256 digests. Streams the sharded checkpoint of
any world size chunk by chunk. Use it with smat-eval eval.model=PATH and smat-predict --model PATH.

  smat-export runs/demo/smat --output runs/demo/smat.export
  smat-export runs/demo/smat --baseline pretrained --output runs/demo/pretrained.export

Prints one JSON line: the folder, the kind, the export's bytes against the checkpoint's, the seconds taken.
"""
from __future__ import annotations

import argparse
import json
import sys

from smat_dist.utils.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="smat-export", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder, its checkpoints folder, or one checkpoint folder")
    ap.add_argument("--output", required=True, help="the export folder to create (must not exist)")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint at this many tasks (default: latest)")
    ap.add_argument("--include-backbone", action="store_true", help="store the backbone's weights in the export")
    ap.add_argument("--baseline", choices=["pretrained"], default=None,
                    help="export the pre-trained baseline (the run's backbone, no meta-tuning) instead")
    args = ap.parse_args(argv)
    setup_logging()
    from smat_dist.export.layout import ExportError
    from smat_dist.export.writer import export_run

    try:
        rec = export_run(args.run, args.output, step=args.step, include_backbone=args.include_backbone,
                         baseline=args.baseline == "pretrained")
    except (ExportError, ValueError, OSError) as e:
        print(f"smat-export: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"export": args.output, "kind": rec["kind"], "bytes": rec["bytes"],
                      "fractional": rec.get("pool", {}).get("fractional", 0), "seconds": rec["export_seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
