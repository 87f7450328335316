"""smat-predict --model EXPORT --support DIR --query FILE_OR_DIR [...] [--finetune full|lora] [--out DIR]

Few-shot classification of one's own images with an exported model (smat-export): the support folder holds
one sub-folder of images per class (at least 2 classes); queries are image files or folders of them. Prints
one line per query (file, predicted class, probability) and writes predictions.json, predictions.csv and
contact_sheet.png into --out (default: the current folder). --finetune adapts on the support set first, as
smat-eval does (--lr, --steps; default: the run's eval settings).

  smat-predict --model runs/demo/smat.export --support my_task/support --query my_task/query --out my_task
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smat_dist.utils.log import setup_logging


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="smat-predict", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an smat-export folder")
    ap.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    ap.add_argument("--query", required=True, nargs="+", help="query image files and/or folders")
    ap.add_argument("--finetune", choices=["none", "full", "lora"], default="none")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning's random draws")
    ap.add_argument("--skip-bad", action="store_true", help="skip (and report) queries that are not images")
    ap.add_argument("--out", default=".", help="folder for predictions.json / .csv and contact_sheet.png")
    args = ap.parse_args(argv)
    setup_logging()
    from smat_dist.export.layout import ExportError
    from smat_dist.predict.api import Predictor
    from smat_dist.predict.images import PredictError
    from smat_dist.predict.sheet import contact_sheet, write_tables

    try:
        p = Predictor.load(args.model)
        task = p.adapt(args.support, finetune=args.finetune, lr=args.lr, steps=args.steps, seed=args.seed)
        pred = task.predict(args.query, skip_bad=args.skip_bad)
    except (ExportError, PredictError, OSError) as e:
        print(f"smat-predict: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 2
    for f, reason in pred.skipped:
        print(f"smat-predict: skipped {f}: {reason}", file=sys.stderr)
    for rec in pred.records:
        print(f"{rec['file']}\t{rec['class']}\t{rec['probability']:.4f}")
    out = Path(args.out)
    meta = {"model": args.model, "kind": p.kind, "support": args.support, "finetune": args.finetune,
            "lr": task.lr, "steps": task.steps if task.mode != "zeroshot" else 0, "seed": args.seed}
    files = write_tables(pred, out, meta)
    files["sheet"] = contact_sheet(pred, task.support, out / "contact_sheet.png",
                                   f"{p.kind} ({args.finetune}) on {Path(args.support).name}: "
                                   f"{len(pred.classes)} classes, {len(pred.files)} queries")
    print(json.dumps({"files": files, "queries": len(pred.files), "skipped": len(pred.skipped)}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
