import json
import re
from pathlib import Path

import pytest
import torch

from conftest import run_cli

FAST = ["logger=none", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_fast_dev_run_writes_results(tmp_path, demo_root):
    d = tmp_path / "run"
    p = run_cli("value_pl.train", ["prober=attention", "task=vcd", f"data.root={demo_root}",
                                   "trainer.fast_dev_run=true", *FAST], d)
    res = json.loads((d / "results.json").read_text())
    for k in ("task", "prober", "backbone", "seed", "chance", "layers", "best"):
        assert k in res
    # docs/probing.md lists every key of results.json and of its rows (the counters in the sentences after it)
    text = (Path(__file__).resolve().parents[1] / "docs" / "probing.md").read_text()
    listed = text.split("`results.json` (", 1)[1].split("`results.md`", 1)[0]
    counters = text.split("It also says what the", 1)[1].split("`control` is", 1)[0]
    documented = set(re.findall(r"\w+", " ".join(re.findall(r"`([^`]+)`", listed + counters))))
    assert set(res) <= documented, sorted(set(res) - documented)
    assert set(res["layers"][0]) <= documented, sorted(set(res["layers"][0]) - documented)
    assert res["task"] == "vcd" and res["prober"] == "attention" and res["chance"] == 0.5
    names = [r["name"] for r in res["layers"]]
    assert "all_heads" in names and "layer_06" in names
    assert (d / "results.md").exists() and "| layer |" in p.stdout
    assert "image embeddings randomly initialised" in p.stdout


@pytest.mark.slow
def test_planted_signal_and_shuffled_labels(tmp_path, demo_root):
    common = ["prober=layer_emb", "task=vrc", f"data.root={demo_root}", "trainer.max_epochs=3",
              "layers=[0,2]", *FAST]
    d1, d2 = tmp_path / "real", tmp_path / "shuffled"
    run_cli("value_pl.train", common, d1)
    run_cli("value_pl.train", common + ["shuffle_labels=true"], d2)
    real = json.loads((d1 / "results.json").read_text())
    shuf = json.loads((d2 / "results.json").read_text())
    best = max(r["test_acc"] for r in real["layers"])
    assert best > real["majority"] + 0.15 and best > 5 * real["chance"], real["layers"]
    # no signal: no layer beats always-predicting-the-majority-class by more than noise
    assert max(r["test_acc"] for r in shuf["layers"]) < real["majority"] + 0.05, shuf["layers"]
    # checkpoints hold prober weights and the backbone's identity, not the backbone
    ck = torch.load(d1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith(("heads.", "val_acc.", "test_acc.")) for k in ck["state_dict"])
    ident = ck["value_pl"]["backbone_identity"]
    assert ident["family"] == "uniter" and len(ident["checksum"]) == 16
    assert (d1 / "checkpoints" / "best.ckpt").exists()
    # last.ckpt is the last epoch's, whether or not that epoch improved on the best (Lightning's save_last rewrote it
    # only on an improvement: eval and resume then read an older epoch)
    for d in (d1, d2):
        assert torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_resume_and_eval(tmp_path, demo_root):
    common = ["prober=layer_emb", "task=vcc", f"data.root={demo_root}", "layers=[1]", "data.train_batches=3", *FAST]
    d1 = tmp_path / "first"
    run_cli("value_pl.train", common + ["trainer.max_epochs=1"], d1)
    last = d1 / "checkpoints" / "last.ckpt"
    d2 = tmp_path / "resumed"
    run_cli("value_pl.train", common + ["trainer.max_epochs=2", f"ckpt_path={last}"], d2)
    ck = torch.load(d2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 1 and ck["global_step"] == 6  # continued, not restarted
    d3 = tmp_path / "eval"
    run_cli("value_pl.eval", [f"ckpt_path={d2 / 'checkpoints' / 'last.ckpt'}", f"data.root={demo_root}", *FAST], d3)
    ev = json.loads((d3 / "results.json").read_text())
    tr = json.loads((d2 / "results.json").read_text())
    assert ev["task"] == "vcc" and [r["name"] for r in ev["layers"]] == ["layer_01"]
    assert ev["layers"][0]["test_acc"] == pytest.approx(tr["layers"][0]["test_acc"], abs=1e-6)
    assert ev["layers"][0]["val_acc"] == pytest.approx(tr["layers"][0]["val_acc"], abs=1e-6)


@pytest.mark.slow
def test_a_fixed_run_dir_in_a_multirun_gets_one_directory_per_job(tmp_path, demo_root):
    """`-m seed=0,1 run_dir=X`: each job writes X/<job num>, not the same X (one result would overwrite the other)."""
    rd = tmp_path / "rd"
    run_cli("value_pl.train", ["-m", "seed=0,1", f"run_dir={rd}", "prober=layer_emb", "task=vrc",
                               f"data.root={demo_root}", "trainer.fast_dev_run=true", "layers=[1]", *FAST,
                               f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path / "unused")
    assert [json.loads((rd / str(j) / "results.json").read_text())["seed"] for j in (0, 1)] == [0, 1]
    assert not (rd / "results.json").exists()
