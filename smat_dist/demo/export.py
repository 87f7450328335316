"""smat-demo's export phase: smat-export the trained SMAT run, then smat-predict on one test episode of the
first ID domain written out as image folders (support / query), with its contact sheet for the report."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from smat_dist.utils.log import get_logger

log = get_logger("smat_dist.demo")


def export_and_predict(out: Path, eval_cfg, force: bool) -> tuple[dict, bool]:
    """<out>/export/smat (the export), <out>/predict/ (support/, query/, predictions.json/.csv,
    contact_sheet.png); skipped when done and the SMAT run did not change."""
    from smat_dist.data.episodes import episode_config
    from smat_dist.data.spec import load_spec
    from smat_dist.eval.protocol import task_seed
    from smat_dist.export.writer import export_run
    from smat_dist.predict.api import Predictor
    from smat_dist.predict.episode_tree import write_episode_tree
    from smat_dist.predict.sheet import contact_sheet, write_tables

    exp, pred_dir = out / "export" / "smat", out / "predict"
    done = pred_dir / "summary.json"
    if done.is_file() and exp.is_dir() and not force:
        log.info("export: already done (%s)", done)
        return json.loads(done.read_text()), False
    shutil.rmtree(exp, ignore_errors=True)
    shutil.rmtree(pred_dir, ignore_errors=True)
    rec = export_run(str(out / "smat"), str(exp))
    src = str(eval_cfg.data.sources[0])
    support, query, truth = write_episode_tree(src, "test", 0, episode_config(eval_cfg), pred_dir)
    p = Predictor.load(str(exp))
    task = p.adapt(str(support), seed=task_seed(load_spec(src).name, "test", 0))
    pred = task.predict(str(query))
    right = dict(truth)
    correct = sum(r["class"] == right[r["file"]] for r in pred.records)
    files = write_tables(pred, pred_dir, {"model": str(exp), "kind": p.kind, "support": str(support),
                                          "finetune": "none"})
    files["sheet"] = contact_sheet(pred, task.support, pred_dir / "contact_sheet.png",
                                   f"smat-predict, zero-shot: test episode 0 of {load_spec(src).name}")
    summary = {"export": str(exp), "bytes": rec["bytes"], "export_seconds": rec["export_seconds"],
               "fractional": rec["pool"]["fractional"], "entries": rec["pool"]["entries"],
               "domain": load_spec(src).name, "queries": len(pred.records), "correct": correct, "files": files}
    done.write_text(json.dumps(summary, indent=1))
    log.info("export: %s (%d bytes, checkpoint %d) in %.1f s; smat-predict %d/%d right on %s", exp,
             rec["bytes"]["export"], rec["bytes"]["checkpoint"], rec["export_seconds"], correct, len(pred.records),
             summary["domain"])
    return summary, True


def report_lines(out: Path, summary: dict | None) -> list[str]:
    """The report's section on the exported model and the prediction contact sheet."""
    if not summary:
        return []
    b = summary["bytes"]
    sheet = Path(summary["files"]["sheet"])
    rel = sheet.relative_to(out) if sheet.is_relative_to(out) else sheet
    return ["## The exported model and smat-predict", "",
            f"- `smat-export runs/…/smat --output {Path(summary['export']).relative_to(out)}`: {b['export']:,} bytes "
            f"against the checkpoint's {b['checkpoint']:,} ({b['checkpoint'] / b['export']:.1f}x smaller; formula "
            f"(M/8 + 4) bytes per weight + hypernetwork = {b['formula']:,}; {summary['fractional']:,} of "
            f"{summary['entries']:,} mask entries fractional, {b['fractional_bytes']:,} bytes) in "
            f"{summary['export_seconds']:.1f} s.",
            f"- `smat-predict` zero-shot on test episode 0 of {summary['domain']} written out as image folders: "
            f"{summary['correct']}/{summary['queries']} queries right. Contact sheet: [{rel}]({rel}); "
            "predictions: `predict/predictions.json`, `predict/predictions.csv`.", ""]
