"""Untrusted torch files: nothing is unpickled without ``allow_unsafe_checkpoints=true``.

A checkpoint whose unpickling would create a file is refused by ``compare`` (step read from the file, and the
backbone weights) and by ``eval`` / resuming (``ckpt_path``), naming the file and the switch, and the file is not
created; with the switch it loads after a warning naming the file. Prober checkpoints written by ``train`` load
with ``weights_only=True``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose
from value_pl.data.safe_load import SWITCH, UnsafeCheckpointError, UnsafeLoadWarning, checkpoint_policy, load_torch


class CreatesFile:
    """Unpickling this object opens (creates) ``path`` for writing: a stand-in for any code a file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil(path: Path, marker: Path, **extra) -> Path:
    torch.save({**extra, "payload": CreatesFile(marker)}, path)
    assert not marker.exists()
    return path


def test_refused_without_switch_and_loaded_with_it(tmp_path):
    marker = tmp_path / "pwned"
    f = evil(tmp_path / "model.pt", marker, state_dict={"w": torch.ones(2)})
    with pytest.raises(UnsafeCheckpointError) as e:
        load_torch(f)
    msg = str(e.value)
    assert str(f) in msg and f"{SWITCH}=true" in msg and "io.open" in msg
    assert not marker.exists()
    with checkpoint_policy(True), pytest.warns(UnsafeLoadWarning, match=str(f)):
        obj = load_torch(f)
    assert marker.exists() and torch.equal(obj["state_dict"]["w"], torch.ones(2))  # the switch is the only way in
    obj["payload"].close()
    # plain files load either way; a non-torch file is not an "unsafe" error
    torch.save({"global_step": 3, "w": torch.zeros(1)}, tmp_path / "plain.pt")
    assert load_torch(tmp_path / "plain.pt", mmap=True)["global_step"] == 3
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(Exception) as e2:
        load_torch(tmp_path / "junk.pt")
    assert not isinstance(e2.value, UnsafeCheckpointError) and "junk.pt" in str(e2.value)


def test_compare_refuses_a_pickled_checkpoint(tmp_path, demo_root):
    """``python -m value_pl.compare checkpoints=uniter_latest.pt``: the step is not in the name, so it is read from
    the file -- which must not run the payload; a name with a step gets as far as the backbone build: refused too."""
    from value_pl.compare import compare

    marker = tmp_path / "pwned"
    (tmp_path / "ckpts").mkdir()
    latest = evil(tmp_path / "ckpts" / "uniter_latest.pt", marker, global_step=5)
    common = ["backbone=uniter", "backbone.config=null", "backbone.tokenizer=minilm", "backbone.img_dim=64",
              f"data.root={demo_root}", "logger=none", f"out={tmp_path / 'cmp'}"]
    with pytest.raises(UnsafeCheckpointError, match="uniter_latest.pt.*allow_unsafe_checkpoints=true"):
        compare(compose(common + [f"checkpoints={latest}"], "compare"))
    named = evil(tmp_path / "ckpts" / "uniter_step100.pt", marker, **{"uniter.pooler.dense.bias": torch.zeros(2)})
    with pytest.raises(UnsafeCheckpointError, match="uniter_step100.pt.*backbone checkpoint.*allow_unsafe"):
        compare(compose(common + [f"checkpoints={named}"], "compare"))
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):
    """A real prober checkpoint: one short ``train`` run (1 epoch, 2 batches) on the demo shards."""
    from value_pl.driver.train import train

    run = tmp_path_factory.mktemp("train") / "run"
    train(compose([f"data.root={demo_root}", "logger=none", "trainer.enable_progress_bar=false", "prober=layer_emb",
                   "task=vcc", "layers=[1]", "data.train_batches=2", "trainer.max_epochs=1",
                   "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=1", f"run_dir={run}"]))
    return run


def test_prober_checkpoints_load_weights_only(trained):
    for name in ("last.ckpt", "best.ckpt"):
        ck = torch.load(trained / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ck["value_pl"]["task"]["name"] == "vcc" and ck["hyper_parameters"]["backbone_cfg"]["family"] == "uniter"
        assert "hparams_type" not in ck and {"callbacks", "loops", "optimizer_states"} <= set(ck)


def test_eval_and_resume_refuse_a_pickled_checkpoint(tmp_path, demo_root, trained):
    from value_pl.driver.train import evaluate, train

    marker = tmp_path / "pwned"
    real = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    bad = evil(tmp_path / "prober.ckpt", marker, **real)
    with pytest.raises(UnsafeCheckpointError, match="prober.ckpt.*prober checkpoint.*allow_unsafe_checkpoints=true"):
        evaluate(compose([f"ckpt_path={bad}", f"data.root={demo_root}", f"run_dir={tmp_path / 'ev'}"], "eval"))
    with pytest.raises(UnsafeCheckpointError, match="prober.ckpt"):
        train(compose([f"data.root={demo_root}", "logger=none", "prober=layer_emb", "task=vcc", "layers=[1]",
                       f"ckpt_path={bad}", f"run_dir={tmp_path / 'resume'}"]))
    assert not marker.exists()
    # the real checkpoint evaluates (weights_only) as before
    res = evaluate(compose([f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", f"data.root={demo_root}",
                            "trainer.enable_progress_bar=false", "++trainer.limit_val_batches=1",
                            "++trainer.limit_test_batches=1", f"run_dir={tmp_path / 'ev2'}"], "eval"))
    assert res["task"] == "vcc" and json.loads((tmp_path / "ev2" / "results.json").read_text())["task"] == "vcc"


def test_plain_makes_checkpoint_content_safe(tmp_path):
    from collections import namedtuple

    from value_pl.probers.module import plain

    Pt = namedtuple("Pt", "x y")
    raw = {"cfg": OmegaConf.create({"a": [1, {"b": "c"}], "p": 0.5}), "path": tmp_path, "n": np.int64(3),
           "arr": np.arange(3, dtype=np.float32), "pt": Pt(1, 2), "t": (1, "x"), "s": torch.Size([2, 3])}
    out = plain(raw)
    assert out["cfg"] == {"a": [1, {"b": "c"}], "p": 0.5} and out["path"] == str(tmp_path) and out["n"] == 3
    assert out["pt"] == [1, 2] and out["t"] == (1, "x") and torch.equal(out["arr"], torch.arange(3.0))
    torch.save(out, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["cfg"]["a"][1]["b"] == "c"
    with pytest.raises(TypeError, match="CreatesFile"):
        plain({"x": CreatesFile(tmp_path / "never")})
