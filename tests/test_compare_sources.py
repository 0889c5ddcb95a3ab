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
