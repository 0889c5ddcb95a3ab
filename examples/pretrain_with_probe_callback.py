"""A toy pretraining loop with :class:`value_pl.callbacks.ProbeCallback` (about 20 s on 2 CPU cores).

    python examples/pretrain_with_probe_callback.py --steps 12 --every 4

The "pretraining" is masked-region-feature regression on the demo shards with a tiny randomly initialised
UNITER-style encoder (hidden 32, 2 layers). Every ``--every`` optimizer steps the callback runs a small
probe suite (fusion NMI, [CLS] modality importance, VCC/VRC layer-embedding probers) on the current
weights and logs it to the trainer's logger (CSV here: ``<out>/csv/metrics.csv``, keys ``probe/...``).

Your own pretraining module only needs an adapter ``pl_module -> value_pl Backbone``; here the encoder
*is* a :class:`~value_pl.backbones.uniter.UniterBackbone`, so ``attr_adapter("encoder")`` is enough.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from value_pl.backbones.capture import CaptureSpec
from value_pl.backbones.uniter import UniterBackbone
from value_pl.backbones.common import load_tokenizer, resolve_path, seeded_init
from value_pl.callbacks import ProbeCallback, attr_adapter
from value_pl.compare.suite import SuiteData, suite_config

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, type_vocab_size=2)

#: a small suite for the toy (the default is value_pl.compare.suite.QUICK, i.e. configs/suite/quick.yaml)
TOY_SUITE = dict(batch_size=16, analysis_samples=16, kmeans={"n_init": 2, "max_iter": 20}, train_samples=48,
                 val_samples=16, test_samples=16, epochs=2, rank=16)


def tiny_encoder(img_dim: int, seed: int = 0) -> UniterBackbone:
    from transformers import BertConfig

    enc = UniterBackbone(BertConfig(**TINY), img_dim, load_tokenizer(resolve_path("minilm")), 32, 16)
    seeded_init(enc, 0.02, seed)
    enc.identity = {"family": "uniter", "name": "toy-uniter", "pretrained": False, "seed": seed}
    return enc


class ToyPretraining(pl.LightningModule):
    """Masked region feature regression: predict the features of randomly masked regions."""

    def __init__(self, img_dim: int, seed: int = 0, lr: float = 1e-3, mask_p: float = 0.3):
        super().__init__()
        self.encoder = tiny_encoder(img_dim, seed).unfreeze()  # trainable, dropout on in training
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(TINY["hidden_size"], img_dim))
        self.lr, self.mask_p = lr, mask_p

    def training_step(self, batch, batch_idx):
        rmask = batch["region_mask"].bool()
        masked = (torch.rand(rmask.shape, device=rmask.device) < self.mask_p) & rmask  # draws from the RNG
        inp = dict(batch, region_feats=batch["region_feats"].masked_fill(masked[..., None], 0.0))
        L = self.encoder.num_layers
        out = self.encoder(inp, CaptureSpec(hidden=[f"hidden.joint.{L}"], attn=[]))
        T = batch["input_ids"].shape[1]
        pred = self.head(out.hidden[f"hidden.joint.{L}"][:, T:])
        if not bool(masked.any()):
            return pred.sum() * 0.0
        loss = F.mse_loss(pred[masked], batch["region_feats"][masked])
        self.log("train/loss", loss, prog_bar=False, batch_size=int(rmask.shape[0]))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def toy_loader(data: SuiteData, collate, n: int = 96, batch_size: int = 8) -> DataLoader:
    """Shuffled batches of the first ``n`` training samples (the shuffle draws from torch's global RNG)."""
    return DataLoader(data.take("train", n), batch_size=batch_size, shuffle=True, collate_fn=collate, num_workers=0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="shards/demo")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--out", default="runs/example_probe_callback")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from value_pl.driver.setup import ensure_demo

    ensure_demo(a.shards, {"name": "demo"} if Path(a.shards).name == "demo" else {})
    pl.seed_everything(a.seed, verbose=False)
    data = SuiteData.load(a.shards, suite_config(TOY_SUITE))  # read once, shared by loader and suite
    model = ToyPretraining(img_dim=int(data.manifest["feature_dim"]), seed=a.seed)
    cb = ProbeCallback(adapter=attr_adapter("encoder"), data=data, suite=TOY_SUITE, every_n_steps=a.every)
    logger = pl.loggers.CSVLogger(a.out, name="csv", version="")
    trainer = pl.Trainer(max_steps=a.steps, logger=logger, callbacks=[cb], accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1)
    import time as _t

    t0 = _t.perf_counter()
    trainer.fit(model, toy_loader(data, model.encoder.collator()))
    fit_s = _t.perf_counter() - t0
    for step, m in cb.history:
        keys = ("probe/fusion/nmi/mean", "probe/modality/image", "probe/vcc/acc/best", "probe/vrc/acc/best")
        print(f"step {step}: " + ", ".join(f"{k}={m[k]:.3f}" for k in keys if k in m))
    print(f"[value-pl] fit {fit_s:.1f} s, of which probe suite runs {sum(cb.seconds):.1f} s ({cb.seconds})")
    print(f"[value-pl] probe metrics logged to {Path(a.out) / 'csv' / 'metrics.csv'}")
    summary = {"steps": [s for s, _ in cb.history], "history": cb.history}
    (Path(a.out) / "probe_history.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
