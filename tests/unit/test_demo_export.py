"""smat-demo's export phase on a saved SMAT run and real images: the export, smat-predict on one ID test
episode written out as folders, the contact sheet, the report's section, and the rerun that skips it."""
from __future__ import annotations

import json

from smat_dist.demo.export import export_and_predict, report_lines
from tests.export_fixture import export_config, save_rank
from tests.unit.test_predict import _digits


def test_export_phase_and_report_section(tmp_path):
    out = tmp_path / "demo"
    cfg = export_config(3)
    save_rank(0, 1, cfg, str(out / "smat" / "checkpoints"), 0.05)
    cfg.data.sources = [str(_digits(tmp_path))]
    cfg.data.mode, cfg.data.ways, cfg.data.shots, cfg.data.queries = "fixed", 3, 2, 2
    summary, ran = export_and_predict(out, cfg, force=False)
    assert ran and summary["domain"] == "digits" and summary["queries"] == 6
    assert 0 <= summary["correct"] <= 6
    preds = json.loads((out / "predict" / "predictions.json").read_text())
    assert [p["file"] for p in preds["predictions"]] == sorted(str(p) for p in (out / "predict" / "query").iterdir())
    assert (out / "predict" / "contact_sheet.png").stat().st_size > 5000
    assert (out / "export" / "smat" / "manifest.json").is_file()
    text = "\n".join(report_lines(out, summary))
    assert "predict/contact_sheet.png" in text and f"{summary['correct']}/6 queries right" in text
    again, ran = export_and_predict(out, cfg, force=False)
    assert not ran and again == summary
    _, ran = export_and_predict(out, cfg, force=True)     # a retrained run is exported again
    assert ran
