"""What ``compare`` reads from checkpoint files: the encoder inside a Lightning checkpoint of a pretraining module
(keys under the module's attribute), and checkpoints that a running trainer writes, replaces or deletes while a
comparison is under way (skipped and reported, never measured under another checkpoint's step)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import compose

REPO = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2}


def _uniter(d: Path, seed: int = 0, **extra):
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone

    (d / "tiny.json").write_text(json.dumps(TINY))
    return build_backbone(OmegaConf.create({"family": "uniter", "config": str(d / "tiny.json"), "tokenizer": "minilm",
                                            "img_dim": 64, "pretrained": "checkpoint" in extra, "seed": seed,
                                            **extra}), img_dim=64)


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lightning_checkpoint_of_a_pretraining_module_loads_its_encoder(tmp_path, demo_root):
    """The example pretraining module holds its UniterBackbone as ``self.encoder``: its Lightning checkpoints have
    ``state_dict`` keys ``encoder.uniter.*`` next to the module's own head. The encoder is loaded from them
    (it was a "lacks required keys" error). Two encoders in one file (a model and its EMA copy) need
    ``backbone.checkpoint_prefix``; LXMERT files behind a wrapper load the same way."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from value_pl.compare.suite import SuiteData, suite_config

    spec = importlib.util.spec_from_file_location("pretrain_example", REPO / "examples" / "pretrain_with_probe_callback.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    data = SuiteData.load(demo_root, suite_config({"train_samples": 8, "val_samples": 1, "test_samples": 1,
                                                   "analysis_samples": 1}))
    pl.seed_everything(0, verbose=False)
    model = ex.ToyPretraining(img_dim=int(data.manifest["feature_dim"]), seed=0)
    trainer = pl.Trainer(max_steps=2, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=2, save_top_k=-1)])
    trainer.fit(model, ex.toy_loader(data, model.encoder.collator(), n=8, batch_size=4))
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    assert any(k.startswith("encoder.uniter.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    assert _same(_uniter(tmp_path, checkpoint=str(ckpt)), model.encoder)

    # a model and its EMA copy in one file: ambiguous unless the prefix is named
    a, b = _uniter(tmp_path, seed=1), _uniter(tmp_path, seed=2)
    sd = {**{f"model.{k}": v for k, v in a.state_dict().items()}, **{f"ema.{k}": v for k, v in b.state_dict().items()}}
    torch.save({"state_dict": sd, "global_step": 5}, tmp_path / "two.ckpt")
    with pytest.raises(KeyError, match="2 encoders.*checkpoint_prefix"):
        _uniter(tmp_path, checkpoint=str(tmp_path / "two.ckpt"))
    assert _same(_uniter(tmp_path, checkpoint=str(tmp_path / "two.ckpt"), checkpoint_prefix="ema"), b)
    assert _same(_uniter(tmp_path, checkpoint=str(tmp_path / "two.ckpt"), checkpoint_prefix="model."), a)
    with pytest.raises(KeyError, match="no key starts with"):
        _uniter(tmp_path, checkpoint=str(tmp_path / "two.ckpt"), checkpoint_prefix="student")

    # LXMERT: an HF LxmertModel held as self.model (keys model.embeddings.*, model.encoder.*)
    from omegaconf import OmegaConf
    from transformers import LxmertConfig, LxmertModel

    from value_pl.backbones import build_backbone

    lx = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, l_layers=1, r_layers=1, x_layers=1,
              visual_feat_dim=64, visual_pos_dim=4, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = LxmertModel(LxmertConfig(**lx))
    (tmp_path / "lx.json").write_text(json.dumps(lx))
    torch.save({"state_dict": {f"model.{k}": v for k, v in hf.state_dict().items()}}, tmp_path / "lx.ckpt")
    bb = build_backbone(OmegaConf.create({"family": "lxmert", "config": str(tmp_path / "lx.json"), "tokenizer": "minilm",
                                          "checkpoint": str(tmp_path / "lx.ckpt"), "pretrained": True}), img_dim=64)
    w = bb.state_dict()
    assert all(torch.equal(w[f"lxmert.{k}"], v) for k, v in hf.state_dict().items() if f"lxmert.{k}" in w)
    assert torch.equal(w["lxmert.embeddings.word_embeddings.weight"], hf.embeddings.word_embeddings.weight)


SMALL = ["logger=none", "plots=false", "progress=false"]


def test_compare_skips_checkpoints_changed_after_listing(tmp_path, demo_root, monkeypatch, capsys):
    """While a comparison runs, the trainer replaces ``last.pt`` (whose step was read from the file when it was
    listed) and a save_top_k rotation deletes an old checkpoint. Neither is measured under its listed step
    (``last.pt`` used to be: step 300 with the step-400 weights), neither is cached, both are reported; a re-run
    measures ``last.pt`` at its new step. A static damaged file is an error naming it."""
    import value_pl.compare.driver as D
    from value_pl.compare import compare

    d = tmp_path / "ck"
    d.mkdir()
    first = {}
    for seed, name in ((1, "step_100.pt"), (2, "step_200.pt"), (3, "step_500.pt")):
        first[name] = _uniter(tmp_path, seed)
        torch.save(dict(first[name].state_dict()), d / name)
    torch.save({"global_step": 300, "state_dict": dict(_uniter(tmp_path, 4).state_dict())}, d / "last.pt")
    newer = _uniter(tmp_path, 9)

    def fake_suite(backbone, suite, data):  # the row's number says which weights were measured
        w = float(backbone.uniter.embeddings.word_embeddings.weight[0, 0])
        return {"metrics": {"w": w}, "skipped": {}, "forwards": 0, "seconds": 0.0}

    real_checksum = D.checksum

    def trainer_saves_meanwhile(path):
        if path.endswith("step_200.pt") and (d / "step_500.pt").exists():
            torch.save({"global_step": 400, "state_dict": dict(newer.state_dict())}, d / "last.pt")
            (d / "step_500.pt").unlink()  # deleted after it was listed, before it is reached
        return real_checksum(path)

    monkeypatch.setattr(D, "run_suite", fake_suite)
    monkeypatch.setattr(D, "checksum", trainer_saves_meanwhile)
    common = [f"checkpoints={d}/*.pt", "backbone=uniter", f"backbone.config={tmp_path}/tiny.json",
              "backbone.tokenizer=minilm", "backbone.img_dim=64", f"data.root={demo_root}", f"out={tmp_path}/run",
              *SMALL]
    res = compare(compose(common, "compare"))
    assert [(Path(r["checkpoint"]).name, r["step"]) for r in res["rows"]] == [("step_100.pt", 100), ("step_200.pt", 200)]
    w = {r["step"]: r["metrics"]["w"] for r in res["rows"]}
    assert w[100] == float(first["step_100.pt"].uniter.embeddings.word_embeddings.weight[0, 0])
    assert {Path(c["checkpoint"]).name: c["reason"].split(" ")[0] for c in res["not_compared"]} == {
        "last.pt": "changed", "step_500.pt": "removed"}
    out = capsys.readouterr().out
    assert "2 not compared" in out and "## Checkpoints not compared" in (tmp_path / "run" / "compare.md").read_text()
    assert len(list((tmp_path / "run" / "cache").glob("*-*.json"))) == 2  # rows (checksums.json aside)

    # the next run: last.pt at its new step, with its new weights
    monkeypatch.setattr(D, "checksum", real_checksum)
    res = compare(compose(common, "compare"))
    rows = {Path(r["checkpoint"]).name: r for r in res["rows"]}
    assert rows["last.pt"]["step"] == 400 and rows["last.pt"]["computed"] and res["not_compared"] == []
    assert rows["last.pt"]["metrics"]["w"] == float(newer.uniter.embeddings.word_embeddings.weight[0, 0])

    # a damaged file that is not changing: an error, which names it
    b = (d / "step_100.pt").read_bytes()
    (d / "step_150.pt").write_bytes(b[: len(b) // 2])
    with pytest.raises(Exception) as e:
        compare(compose(common, "compare"))
    assert any("step_150.pt" in n for n in getattr(e.value, "__notes__", [])), e.value


def test_compare_measures_again_a_damaged_cache_row(tmp_path, demo_root, monkeypatch, capsys):
    """A cache row cut short (a run killed while writing it, or a concurrent run reading it half-written) is measured
    again, with a message, instead of failing this and every later run; rows are written whole (rename)."""
    import value_pl.compare.driver as D
    from value_pl.compare import compare

    d = tmp_path / "ck"
    d.mkdir()
    torch.save(dict(_uniter(tmp_path, 1).state_dict()), d / "step_10.pt")
    monkeypatch.setattr(D, "run_suite", lambda backbone, suite, data: {
        "metrics": {"w": 1.0}, "skipped": {}, "forwards": 0, "seconds": 0.0})
    common = [f"checkpoints={d}/*.pt", "backbone=uniter", f"backbone.config={tmp_path}/tiny.json",
              "backbone.tokenizer=minilm", "backbone.img_dim=64", f"data.root={demo_root}", f"out={tmp_path}/run",
              *SMALL]
    assert compare(compose(common, "compare"))["built"] == 1
    (row,) = (tmp_path / "run" / "cache").glob("*-*.json")
    text = row.read_text()
    row.write_text(text[: len(text) // 2])
    capsys.readouterr()
    res = compare(compose(common, "compare"))
    assert res["built"] == 1 and res["rows"][0]["metrics"] == {"w": 1.0}
    assert "unreadable" in capsys.readouterr().out
    # whole again, no temporary left
    assert sorted(p.name for p in (tmp_path / "run" / "cache").iterdir()) == sorted([row.name, "checksums.json"])
    assert json.loads(row.read_text())["metrics"] == {"w": 1.0}
    assert compare(compose(common, "compare"))["built"] == 0


def test_discover_leaves_out_a_stepless_file_being_written(tmp_path, monkeypatch, capsys):
    """``last.pt`` (no step in its name) is being written while it is listed: its step cannot be read, but it is not
    "a checkpoint without a step" that fails the whole run; it is left out and said, and the others are listed."""
    import value_pl.compare.checkpoints as C

    for s in (100, 200):
        torch.save({"w": torch.zeros(1)}, tmp_path / f"u_step{s}.pt")
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 half a zip")
    real = C.step_from_file

    def still_writing(path):
        if path.endswith("last.pt"):
            with open(path, "ab") as f:
                f.write(b"more bytes")
        return real(path)

    monkeypatch.setattr(C, "step_from_file", still_writing)
    assert [(Path(c.path).name, c.step) for c in C.discover(str(tmp_path / "*.pt"))] == [
        ("u_step100.pt", 100), ("u_step200.pt", 200)]
    out = capsys.readouterr().out
    assert "being written" in out and "last.pt" in out
    monkeypatch.setattr(C, "step_from_file", real)  # finished but unreadable, and no step: the error as before
    with pytest.raises(ValueError, match=r"no training step found for .*last\.pt"):
        C.discover(str(tmp_path / "*.pt"))


def test_a_rerun_hashes_only_new_or_changed_checkpoints(tmp_path, demo_root, monkeypatch, capsys):
    """``compare`` run again while the pretraining keeps saving reads the bytes of new and changed checkpoints only
    (a memo of sha256 by size, mtime and inode, in the cache); a rewritten file is hashed again and measured anew, and
    a damaged memo is said and rebuilt."""
    import os

    import value_pl.compare.driver as D
    from value_pl.compare import compare

    d = tmp_path / "ck"
    d.mkdir()
    for seed in (1, 2):
        torch.save(dict(_uniter(tmp_path, seed).state_dict()), d / f"step_{seed}00.pt")
    hashed = []
    real_checksum = D.checksum
    monkeypatch.setattr(D, "checksum", lambda path: hashed.append(Path(path).name) or real_checksum(path))
    monkeypatch.setattr(D, "run_suite", lambda backbone, suite, data: {
        "metrics": {"w": float(backbone.uniter.embeddings.word_embeddings.weight[0, 0])}, "skipped": {},
        "forwards": 0, "seconds": 0.0})
    common = [f"checkpoints={d}/*.pt", "backbone=uniter", f"backbone.config={tmp_path}/tiny.json",
              "backbone.tokenizer=minilm", "backbone.img_dim=64", f"data.root={demo_root}", f"out={tmp_path}/run",
              *SMALL]
    assert compare(compose(common, "compare"))["built"] == 2 and sorted(hashed) == ["step_100.pt", "step_200.pt"]
    hashed.clear()
    torch.save(dict(_uniter(tmp_path, 3).state_dict()), d / "step_300.pt")  # saved since
    res = compare(compose(common, "compare"))
    assert hashed == ["step_300.pt"] and res["built"] == 1 and len(res["rows"]) == 3
    # step_100.pt rewritten in place with other weights: hashed and measured again, not served from the cache
    hashed.clear()
    other = _uniter(tmp_path, 7)
    st = os.stat(d / "step_100.pt")
    torch.save(dict(other.state_dict()), d / "step_100.pt")
    os.utime(d / "step_100.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    res = compare(compose(common, "compare"))
    assert hashed == ["step_100.pt"] and res["built"] == 1
    assert res["rows"][0]["metrics"]["w"] == float(other.uniter.embeddings.word_embeddings.weight[0, 0])
    # a damaged memo: said, every checkpoint hashed again, nothing measured again
    (tmp_path / "run" / "cache" / "checksums.json").write_text("{")
    hashed.clear()
    capsys.readouterr()
    res = compare(compose(common, "compare"))
    assert sorted(hashed) == ["step_100.pt", "step_200.pt", "step_300.pt"] and res["built"] == 0
    assert "checksum memo" in capsys.readouterr().out
