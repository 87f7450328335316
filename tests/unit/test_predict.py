"""smat-predict on real images (scikit-learn's handwritten digits): the Python API and the CLI give exactly
smat-eval's probabilities on the same episode (zero-shot and LoRA), write predictions.json / .csv and a
contact sheet, and name every bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_tools.writer import DatasetWriter
from smat_dist.config.schema import EvalConfig
from smat_dist.data.episodes import EpisodeConfig
from smat_dist.data.fixed_sets import fixed_episodes
from smat_dist.eval.loading import load_method
from smat_dist.eval.protocol import Evaluator, task_seed
from smat_dist.export.writer import export_run
from smat_dist.predict.api import Predictor
from smat_dist.predict.cli import main as smat_predict
from smat_dist.predict.episode_tree import write_episode_tree
from smat_dist.predict.images import PredictError
from tests.export_fixture import export_config, save_rank

EP = EpisodeConfig(mode="fixed", ways=3, shots=2, queries=3, image_size=32)


def _digits(root):
    """Real handwritten digits as a converted dataset: classes 0-3 train, 4-6 val, 7-9 test, 12 images each."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = root / "digits"
    with DatasetWriter(out, "digits", "sklearn-digits", shard_bytes=64 << 10) as w:
        for c in range(10):
            split = "train" if c < 4 else "val" if c < 7 else "test"
            imgs = d.images[d.target == c][:12]
            items = [(f"{c}/{i}", np.repeat((im * 15).astype(np.uint8)[:, :, None], 3, 2)) for i, im in enumerate(imgs)]
            w.add_class(f"digit{c}", split, items)
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """An export, its checkpoint, one fixed test episode and that episode's exact image bytes as a folder tree."""
    root = tmp_path_factory.mktemp("predict")
    save_rank(0, 1, export_config(3), str(root / "run" / "checkpoints"), 0.05)
    export_run(str(root / "run"), str(root / "exp"))
    src = _digits(root)
    ep = fixed_episodes(str(src), "test", 1, cfg=EP)[0]
    write_episode_tree(str(src), "test", 0, EP, root)
    return root, ep


@pytest.mark.parametrize("mode", ["zeroshot", "full", "lora"])
def test_predict_equals_eval_on_the_same_episode(task, mode):
    root, ep = task
    seed = task_seed("digits", "test", 0)
    lr = None if mode == "zeroshot" else 1e-3
    ck = load_method(str(root / "run"))
    with Evaluator(ck, EvalConfig(finetune_steps=2)) as ev:
        want = torch.softmax(ev.logits(ep, mode, lr, seed), -1)
    p = Predictor.load(str(root / "exp"))
    t = p.adapt(str(root / "support"), finetune=None if mode == "zeroshot" else mode, lr=lr, steps=2, seed=seed)
    got = t.predict(str(root / "query"))
    assert t.classes == [f"{j:02d}_{n}" for j, n in enumerate(ep.class_names)]
    assert torch.equal(got.probs, want)
    assert len(t.expert_weights) == 3 and abs(sum(t.expert_weights) - 1) < 1e-5
    # the same task, asked again: the same answer (fine-tuning is re-seeded)
    assert torch.equal(t.predict(str(root / "query")).probs, got.probs)


def test_cli_writes_lines_tables_and_sheet(task, tmp_path, capsys):
    root, ep = task
    out = tmp_path / "out"
    assert smat_predict(["--model", str(root / "exp"), "--support", str(root / "support"), "--query",
                         str(root / "query"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(ep.query_labels)
    f, cls, prob = lines[0].split("\t")
    assert f.endswith("00_000.png") and cls.split("_", 1)[1] in ep.class_names and 0 < float(prob) <= 1
    js = json.loads((out / "predictions.json").read_text())
    assert js["kind"] == "smat" and len(js["predictions"]) == len(lines) and len(js["expert_weights"]) == 3
    assert (out / "predictions.csv").read_text().splitlines()[0].startswith("file,class,probability,p[")
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as im:
        assert im.width > 500 and im.height > 400


def _bad(args, capsys):
    assert smat_predict(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("smat-predict: error:")
    return err


def test_bad_inputs_are_named(task, tmp_path, capsys):
    root, _ = task
    model = ["--model", str(root / "exp"), "--out", str(tmp_path / "o")]
    q = str(root / "query")
    one = tmp_path / "one"
    (one / "cat").mkdir(parents=True)
    (one / "cat" / "a.png").write_bytes((root / "query" / "00_000.png").read_bytes())
    assert "1 class folder(s) (cat)" in _bad(model + ["--support", str(one), "--query", q], capsys)
    (one / "dog").mkdir()
    assert "dog holds no images" in _bad(model + ["--support", str(one), "--query", q], capsys)
    (one / "dog" / "b.png").write_bytes(b"not an image")
    assert "b.png: not a readable image" in _bad(model + ["--support", str(one), "--query", q], capsys)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    err = _bad(model + ["--support", str(root / "support"), "--query", q, str(notes)], capsys)
    assert "notes.txt: not a readable image" in err and "--skip-bad" in err
    assert smat_predict(model + ["--support", str(root / "support"), "--query", q, str(notes), "--skip-bad"]) == 0
    cap = capsys.readouterr()
    assert "skipped" in cap.err and "notes.txt" in cap.err
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["skipped"][0]["file"] == str(notes)
    assert "no such export folder" in _bad(["--model", str(tmp_path / "none"), "--support", str(one),
                                            "--query", q], capsys)
    with pytest.raises(PredictError, match="finetune='sgd'"):
        Predictor.load(str(root / "exp")).adapt(str(root / "support"), finetune="sgd")
