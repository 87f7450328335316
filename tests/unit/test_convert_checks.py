"""smat-convert's checks on a class-per-folder tree, each reported in one line before anything is written, and
a conversion that never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from data_tools.cli import main
from tests import fixtures_layouts as fx

REPO = Path(__file__).resolve().parents[2]


def error_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("smat-convert: error:")]
    assert len(err) == 1, err
    return err[0]


def test_output_inside_the_input_tree_is_refused(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")
    assert main(["imagefolder", "--input", str(inp), "--output", str(inp / "shards")]) == 2
    assert f"--output {inp / 'shards'} is inside --input {inp}" in error_line(capsys)
    assert main(["imagefolder", "--input", str(inp), "--output", str(inp)]) == 2
    assert sorted(p.name for p in inp.iterdir()) == ["cat", "dog", "eel"]


def test_empty_class_folder_fails_before_anything_is_written(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")
    (inp / "zebra").mkdir()
    (inp / "zebra" / "notes.txt").write_text("no images here")
    out = tmp_path / "o"
    assert main(["imagefolder", "--input", str(inp), "--output", str(out)]) == 2
    assert "1 class folder(s) without images" in (line := error_line(capsys)) and str(inp / "zebra") in line
    assert not out.exists()
    (inp / "zebra" / "notes.txt").unlink()
    (inp / "zebra" / "0.jpg").write_bytes((inp / "cat" / "0.jpg").read_bytes())
    assert main(["imagefolder", "--input", str(inp), "--output", str(out), "--min-count", "2"]) == 2
    assert "class 'zebra' of pets has 1 image file(s), below --min-count 2" in error_line(capsys)
    assert not out.exists()


def test_skipped_non_image_files_are_reported(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")
    for name in ("cat/README.md", "cat/labels.csv", "dog/Thumbs.db"):
        (inp / name).write_text("x")
    assert main(["imagefolder", "--input", str(inp), "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    want = "imagefolder: skipped 3 file(s) that are not images"
    assert any(w.startswith(want) and str(inp / "cat" / "README.md") in w for w in result["warnings"])
    assert want in out.err and result["images"] == 9


def test_splits_that_leave_a_split_empty_are_reported(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")      # 3 classes: 10% of them is no class
    out = tmp_path / "o"
    base = ["imagefolder", "--input", str(inp), "--output", str(out), "--splits"]
    assert main([*base, "train=0.6,val=0.1,test=0.3"]) == 2
    assert "--splits leaves split 'val' with no class (3 classes: train 1, val 0, test 2)" in error_line(capsys)
    assert not out.exists()
    assert main([*base, "train=0.7,test=0.3"]) == 0


def test_refused_rerun_names_the_setting_that_differs(tmp_path, capsys):
    inp = fx.imagefolder(tmp_path / "pets")
    out = tmp_path / "o"
    assert main(["imagefolder", "--input", str(inp), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["imagefolder", "--input", str(inp), "--output", str(out), "--seed", "5", "--min-count", "2"]) == 2
    line = error_line(capsys)
    assert "written with other settings: min_count: 1 there, 2 now; seed: 22 there, 5 now" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_conversion_does_not_import_torch(tmp_path):
    inp = fx.imagefolder(tmp_path / "pets")
    code = ("import sys; from data_tools.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); raise SystemExit(rc)")
    args = ["imagefolder", "--input", str(inp), "--output", str(tmp_path / "o")]
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "NO-TORCH"
    assert "convert pets: 3/3 classes (100%)" in p.stderr      # progress: done/total, rate, ETA
