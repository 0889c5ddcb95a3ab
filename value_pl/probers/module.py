"""``ProbeModule``: a frozen backbone feeding one prober head per selected layer, in one forward pass.

* The backbone is frozen (eval mode, no grad) and is *not* a registered submodule: it is not in the
  optimizer, not wrapped by DDP and not saved in checkpoints. Checkpoints hold the prober heads, the
  per-head best snapshots and the backbone's identity (family, name, path, checksum); ``eval`` rebuilds the
  backbone from the saved config and checks the checksum.
* Heads are independent: the loss is the sum of the heads' losses and Adam is per-parameter, so training
  all layers at once updates each head exactly as training that layer alone would.
* Model selection is per head: after every validation epoch each head whose validation accuracy improved
  is snapshotted; test uses each head's best snapshot (``use_best_heads``).
"""
from __future__ import annotations

import copy
import logging
import re

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from ..backbones.base import Backbone
from .features import PairPlan, sentence_features
from .heads import AttentionProber, LayerEmbProber, SentenceProber, seeded

log = logging.getLogger(__name__)


def layer_number(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _safe(name: str) -> str:
    return name.replace(":", "__").replace(".", "_")


class ProbeModule(pl.LightningModule):
    def __init__(self, backbone: Backbone, task: dict, prober: dict, optim: dict | None = None,
                 layers: list[str] | None = None, seed: int = 0, backbone_cfg: dict | None = None,
                 use_best_heads: bool = True, raw_baseline: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        object.__setattr__(self, "_backbone", backbone.freeze())
        self.task = task
        self.kind = task["kind"]
        self.labels = list(task["labels"])
        C = len(self.labels)
        self.prober_name = prober["name"]
        self.optim_cfg = dict(optim or {"lr": 1e-3, "weight_decay": 0.0})
        self.use_best_heads = use_best_heads
        heads: dict[str, nn.Module] = {}
        self.plan = None
        if self.kind == "sentence":
            names = backbone.sentence_layers()
            if layers is not None:
                names = [n for n in names if f"layer_{layer_number(n):02d}" in layers]
            self.sentence_names = names
            d = backbone.hidden_size
            for n in names:
                key = "sent:" + n
                heads[key] = seeded(seed, key, lambda: SentenceProber(d, C, int(prober.get("nhid", 0) or 0),
                                                                     float(prober.get("dropout", 0.0))))
        else:
            layout = backbone.pair_layout(self.kind)
            self.plan = PairPlan.make(layout, self.kind, self.prober_name, layers, raw=raw_baseline)
            d = backbone.hidden_size
            rank = prober.get("rank") or d
            bias = bool(prober.get("bias", False))
            for l in self.plan.emb_layers:
                key = "emb:" + l.name
                heads[key] = seeded(seed, key, lambda: LayerEmbProber(d, d, C, rank, bias))
            if self.plan.raw:  # pseudo-layer "raw": Eq. 4 on the raw region features (input dim = feature dim)
                dv = int(getattr(backbone, "img_dim", 0) or (backbone_cfg or {}).get("img_dim") or 0)
                if dv <= 0:
                    raise ValueError("raw_baseline needs the backbone's region feature dim (backbone.img_dim)")
                heads["emb:raw"] = seeded(seed, "emb:raw", lambda: LayerEmbProber(dv, dv, C, prober.get("rank") or d, bias))
            for l in self.plan.attn_layers:
                key = "attn:" + l.name
                n_heads = sum(backbone.num_heads for _ in l.attn)
                heads[key] = seeded(seed, key, lambda: AttentionProber(n_heads, C, bias))
        self.head_names = list(heads)
        self.heads = nn.ModuleDict({_safe(k): v for k, v in heads.items()})
        self.val_acc = nn.ModuleDict({_safe(k): MulticlassAccuracy(C, average="micro") for k in heads})
        self.test_acc = nn.ModuleDict({_safe(k): MulticlassAccuracy(C, average="micro") for k in heads})
        # pairs evaluated per stage, summed over ranks (DDP must count every sample exactly once)
        self.eval_pairs = nn.ModuleDict({"val": SumMetric(), "test": SumMetric()})
        self.pairs_evaluated: dict[str, int] = {}
        self.best_val: dict[str, float] = {}
        self.best_epoch: dict[str, int] = {}
        self.best_state: dict[str, dict] = {}
        self.test_results: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.pairs_dropped = {"train": 0, "val": 0, "test": 0}

    # ------------------------------------------------------------------ names
    @property
    def backbone(self) -> Backbone:
        return self._backbone

    def display_name(self, key: str) -> str:
        kind, name = key.split(":", 1)
        if kind == "sent":
            return f"layer_{layer_number(name):02d}"
        return name

    # ---------------------------------------------------------------- forward
    def _to_device(self):
        p = next(self._backbone.parameters(), None)
        if p is not None and p.device != self.device:
            self._backbone.to(self.device)

    @torch.no_grad()
    def extract(self, batch: dict) -> dict:
        """Frozen forward -> {head key: inputs}. Also usable for feature caching."""
        self._to_device()
        bb = self._backbone
        if self.kind == "sentence":
            from ..backbones.base import CaptureSpec

            out = bb(batch, CaptureSpec(hidden=self.sentence_names, attn=[]))
            return {k: (v,) for k, v in sentence_features(out, self.sentence_names).items()}
        if batch["labels"].numel() == 0:
            return {}
        out = bb(batch, self.plan.capture(batch))
        return self.plan.features(out, batch)

    def logits(self, feats: dict) -> dict:
        return {k: self.heads[_safe(k)](*v) for k, v in feats.items()}

    def forward(self, batch: dict) -> dict:
        return self.logits(self.extract(batch))

    # --------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        self.pairs_dropped["train"] += int(batch.get("pairs_dropped", 0))
        feats = batch["cached_features"] if "cached_features" in batch else self.extract(batch)
        y = batch["labels"]
        if not feats or y.numel() == 0:
            return sum(p.sum() * 0.0 for p in self.heads.parameters())
        losses = {k: F.cross_entropy(v, y) for k, v in self.logits(feats).items()}
        loss = torch.stack(list(losses.values())).sum()
        self.log("train/loss", loss / len(losses), prog_bar=True, batch_size=y.numel())
        return loss

    def _eval_step(self, batch, metrics, stage):
        self.pairs_dropped[stage] += int(batch.get("pairs_dropped", 0))
        feats = batch["cached_features"] if "cached_features" in batch else self.extract(batch)
        y = batch["labels"]
        self.eval_pairs[stage].update(float(y.numel()))
        if not feats or y.numel() == 0:
            return
        for k, v in self.logits(feats).items():
            metrics[_safe(k)].update(v.argmax(-1), y)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_acc, "test")

    def _compute(self, metrics) -> dict[str, float]:
        out = {}
        for k in self.head_names:
            m = metrics[_safe(k)]
            # under DDP every rank must join compute()'s all-gather, even one that saw no batch
            out[k] = float(m.compute()) if m.update_called or _distributed() else float("nan")
            m.reset()
        return out

    def _count_pairs(self, stage: str) -> None:
        self.pairs_evaluated[stage] = int(self.eval_pairs[stage].compute())
        self.eval_pairs[stage].reset()

    def on_validation_epoch_end(self):
        self._count_pairs("val")
        accs = self._compute(self.val_acc)
        self.last_val = accs
        for k, a in accs.items():
            self.log(f"val/acc/{self.display_name(k)}", a, sync_dist=False)
        finite = [a for a in accs.values() if a == a]
        self.log("val/acc/best", max(finite) if finite else 0.0, prog_bar=True)
        self.log("chance", 1.0 / len(self.labels))
        if getattr(self, "eval_only", False):  # evaluating a saved checkpoint: report, do not select
            self.best_val = dict(accs)
            return
        if self.trainer is not None and self.trainer.sanity_checking:
            return
        for k, a in accs.items():
            if a == a and a > self.best_val.get(k, -1.0):
                self.best_val[k] = a
                self.best_epoch[k] = int(self.current_epoch)
                self.best_state[k] = {n: t.detach().cpu().clone() for n, t in self.heads[_safe(k)].state_dict().items()}

    def on_test_start(self):
        self._swapped = None
        if self.use_best_heads and self.best_state:
            self._swapped = {k: copy.deepcopy(self.heads[_safe(k)].state_dict()) for k in self.best_state}
            for k, sd in self.best_state.items():
                self.heads[_safe(k)].load_state_dict(sd)

    def on_test_epoch_end(self):
        self._count_pairs("test")
        accs = self._compute(self.test_acc)
        self.test_results = accs
        for k, a in accs.items():
            self.log(f"test/acc/{self.display_name(k)}", a, sync_dist=False)
        self.log("chance", 1.0 / len(self.labels))

    def on_test_end(self):
        if getattr(self, "_swapped", None):
            for k, sd in self._swapped.items():
                self.heads[_safe(k)].load_state_dict(sd)
            self._swapped = None

    def use_best_snapshots(self) -> None:
        """Load every head's best-by-validation snapshot (for evaluation of a saved checkpoint)."""
        for k, sd in self.best_state.items():
            self.heads[_safe(k)].load_state_dict(sd)
        self.use_best_heads = False
        self.eval_only = True

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        return torch.optim.Adam(self.heads.parameters(), lr=float(self.optim_cfg.get("lr", 1e-3)),
                                weight_decay=float(self.optim_cfg.get("weight_decay", 0.0)))

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        checkpoint["value_pl"] = {
            "backbone_identity": self._backbone.describe(),
            "best_val": self.best_val, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "task": self.task, "labels": self.labels,
        }

    def on_load_checkpoint(self, checkpoint):
        v = checkpoint.get("value_pl", {})
        self.best_val = dict(v.get("best_val", {}))
        self.best_epoch = dict(v.get("best_epoch", {}))
        self.best_state = dict(v.get("best_state", {}))
        saved = v.get("backbone_identity", {})
        mine = self._backbone.describe()
        if saved.get("checksum") and mine.get("checksum") and saved["checksum"] != mine["checksum"]:
            raise ValueError(f"prober checkpoint was trained on backbone {saved.get('name')} with checksum "
                             f"{saved['checksum']}, but the backbone built now has checksum {mine['checksum']}")

    # ---------------------------------------------------------------- results
    def layer_rows(self) -> list[dict]:
        rows = []
        for k in self.head_names:
            name = self.display_name(k)
            rows.append({
                "layer": layer_number(name) if name.startswith("layer_") else -1,
                "name": name,
                "title": self._backbone.layer_title(self.kind, name),
                "val_acc": self.best_val.get(k, self.last_val.get(k, float("nan"))),
                "test_acc": self.test_results.get(k, float("nan")),
                "best_epoch": self.best_epoch.get(k),
            })
        return rows
