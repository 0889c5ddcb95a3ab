"""``ProbeModule``: a frozen backbone feeding one prober head per selected layer, in one forward pass.

* The backbone is frozen (eval mode, no grad) and is *not* a registered submodule: it is not in the
  optimizer, not wrapped by DDP and not saved in checkpoints. Checkpoints hold the prober heads, the
  per-head best snapshots and the backbone's identity (family, name, path, checksum) and effective model config;
  ``eval`` rebuilds the backbone from the saved config and refuses another checksum or model config.
* Heads are independent: the loss is the sum of the heads' losses and Adam is per-parameter, so training
  all layers at once updates each head exactly as training that layer alone would. Heads of one class and
  size are stacked (:mod:`value_pl.probers.heads`): one batched matmul per weight serves every layer.
* Model selection is per head: after every validation epoch each head whose validation accuracy improved
  is snapshotted; test uses each head's best snapshot (``use_best_heads``).
* Counting is exact and per split: samples, pairs, dropped pairs and truncations of every epoch, summed over
  ranks (:class:`~value_pl.probers.metrics.Counters`).
"""
from __future__ import annotations

import enum
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..backbones.capture import CaptureSpec
from ..backbones.checks import check_saved_backbone
from ..backbones.graphs import GraphedForward
from ..data.cache import unpack_cached
from ..data.collate import GEOMETRY
from ..data.pinning import CopyStreams, to_device
from .features import HeadGroup, PairPlan, sentence_groups, sentence_inputs
from .heads import (AttentionProber, LayerEmbProber, SentenceProber, StackedAttention, StackedLayerEmb,
                    StackedSentence, seeded)
from .metrics import Counters, HeadAccuracy, LabelCounts, sum_over_ranks

log = logging.getLogger(__name__)
# ProbeModule.transfer_batch_to_device is meant to serve the DataModule's batches too
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device` in `LightningModule`.*")

#: checkpoint layout of the heads (stacked groups); older checkpoints are refused with a clear message
HEADS_FORMAT = 2
#: Eq. 4 rank of the ``boxes`` control head unless ``prober.rank`` is set: fixed, so that the row does not depend on
#: the backbone; 64 = 8 x 8 lets each class's bilinear form over the 8-d geometry be any 8 x 8 matrix
GEOMETRY_RANK = 64
#: heads that are controls, not layers: left out of ``val/acc/best`` (the checkpoint monitor) unless alone
CONTROL_HEADS = ("emb:raw", "emb:boxes")


def layer_number(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else -1


def _finite(x: float):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def plain(obj):
    """``obj`` with only what ``torch.load(weights_only=True)`` reads: tensors, dicts, lists, tuples, str, numbers,
    None (OmegaConf containers and other mappings -> dicts, paths -> str, NumPy scalars/arrays -> numbers/tensors)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return obj
    if hasattr(obj, "_metadata") and hasattr(obj, "_get_node"):  # an OmegaConf container (no import needed)
        from omegaconf import OmegaConf

        return plain(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, Mapping):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, enum.Enum):
        return plain(obj.value)
    raise TypeError(f"cannot store a {type(obj).__name__} in a prober checkpoint (it would need pickle to load)")


class ProbeModule(pl.LightningModule):
    def __init__(self, backbone: Backbone, task: dict, prober: dict, optim: dict | None = None,
                 layers: list[str] | None = None, seed: int = 0, backbone_cfg: dict | None = None,
                 use_best_heads: bool = True, raw_baseline: bool = False, geometry_baseline: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.transfer_s = 0.0  # host seconds spent moving batches to the device (value_pl.driver.throughput)
        object.__setattr__(self, "_backbone", backbone.freeze())
        self.task = task
        self.kind = task["kind"]
        self.labels = list(task["labels"])
        C = len(self.labels)
        self.prober_name = prober["name"]
        self.optim_cfg = dict(optim or {"lr": 1e-3, "weight_decay": 0.0})
        self.use_best_heads = use_best_heads
        self.plan = None
        d = backbone.hidden_size
        if self.kind == "sentence":
            names = backbone.sentence_layers()
            if layers is not None:
                known = [f"layer_{layer_number(n):02d}" for n in names]
                unknown = [x for x in layers if x not in known]
                if unknown:
                    raise ValueError(f"layers={list(layers)}: {unknown} are not layers of this backbone for sentence "
                                     f"tasks; available: {known}")
                names = [n for n in names if f"layer_{layer_number(n):02d}" in layers]
            self.sentence_names = names
            self.groups: list[HeadGroup] = sentence_groups(names)
            nhid, drop = int(prober.get("nhid", 0) or 0), float(prober.get("dropout", 0.0))
            single = {k: seeded(seed, k, lambda: SentenceProber(d, C, nhid, drop)) for k in self.groups[0].keys}
            stacked = {"sent": StackedSentence(len(names), d, C, nhid, drop)}
        else:
            self.plan = PairPlan.make(backbone.pair_layout(self.kind), self.kind, self.prober_name, layers,
                                      raw=raw_baseline, boxes=geometry_baseline)
            self.groups = self.plan.groups
            rank = prober.get("rank") or d
            bias = bool(prober.get("bias", False))
            single, stacked = {}, {}
            for g in self.groups:
                if g.kind == "emb":
                    stacked[g.name] = StackedLayerEmb(len(g.keys), d, d, C, rank, bias)
                    single.update({k: seeded(seed, k, lambda: LayerEmbProber(d, d, C, rank, bias)) for k in g.keys})
                elif g.kind == "raw":  # Eq. 4 on the raw region features (input dim = feature dim)
                    dv = int(getattr(backbone, "img_dim", 0) or (backbone_cfg or {}).get("img_dim") or 0)
                    if dv <= 0:
                        raise ValueError("raw_baseline needs the backbone's region feature dim (backbone.img_dim)")
                    r = prober.get("rank") or d
                    stacked[g.name] = StackedLayerEmb(1, dv, dv, C, r, bias)
                    single["emb:raw"] = seeded(seed, "emb:raw", lambda: LayerEmbProber(dv, dv, C, r, bias))
                elif g.kind == "boxes":  # Eq. 4 on the box geometry alone (a control row; no backbone input)
                    G, r = len(GEOMETRY), prober.get("rank") or GEOMETRY_RANK
                    stacked[g.name] = StackedLayerEmb(1, G, G, C, r, bias)
                    single["emb:boxes"] = seeded(seed, "emb:boxes", lambda: LayerEmbProber(G, G, C, r, bias))
                else:
                    n_heads = backbone.num_heads * len(g.maps[0])
                    stacked[g.name] = StackedAttention(len(g.keys), n_heads, C, bias)
                    single.update({k: seeded(seed, k, lambda: AttentionProber(n_heads, C, bias)) for k in g.keys})
        self.heads = nn.ModuleDict(stacked)
        self.slot: dict[str, tuple[str, int]] = {}
        for g in self.groups:  # every head starts from its own seeded init, as if trained alone
            for i, k in enumerate(g.keys):
                self.heads[g.name].load_head(i, single[k])
                self.slot[k] = (g.name, i)
        self.head_names = [k for g in self.groups for k in g.keys]
        n = len(self.head_names)
        self.val_acc, self.test_acc = HeadAccuracy(n), HeadAccuracy(n)
        self.counts_train, self.counts_val, self.counts_test = Counters(), Counters(), Counters()
        self.labels_train, self.labels_test = LabelCounts(C), LabelCounts(C)
        self.label_counts: dict[str, list[int]] = {}  # per split, the last pass, summed over ranks
        self.seen: dict[str, list[dict]] = {"train": [], "val": [], "test": []}  # per epoch, summed over ranks
        self._loss_sum, self._loss_n = None, 0  # this epoch's training loss (device sum, samples)
        self.pairs_evaluated: dict[str, int] = {}
        self.best_val: dict[str, float] = {}
        self.best_epoch: dict[str, int] = {}
        self.best_state: dict[str, dict] = {}
        self.test_results: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.graphs: GraphedForward | None = None  # use_cuda_graphs()
        self.copy_streams = CopyStreams()  # data.copy_stream: batches copied to a CUDA device on a side stream

    # ------------------------------------------------------------------ names
    @property
    def backbone(self) -> Backbone:
        return self._backbone

    def display_name(self, key: str) -> str:
        kind, name = key.split(":", 1)
        if kind == "sent":
            return f"layer_{layer_number(name):02d}"
        if kind == "attn" and f"emb:{name}" in self.slot:  # prober "both": the Eq. 4 head keeps the layer's name
            return f"attn_{name}"
        return name

    def head(self, key: str) -> nn.Module:
        """A standalone copy of one head (the single-head class) with its current weights."""
        g, i = self.slot[key]
        return self.heads[g].head(i)

    # ---------------------------------------------------------------- forward
    def _to_device(self):
        p = next(self._backbone.parameters(), None)
        if p is not None and p.device != self.device:
            self._backbone.to(self.device)

    def use_cuda_graphs(self, enabled: bool = True, **options) -> None:
        """Replay the frozen forward from CUDA graphs on a GPU (:mod:`value_pl.backbones.graphs`; ``options``:
        ``multiples``, ``max_graphs``, ``engine``). Off: the plain forward. The probers' numbers are the same up to
        the rounding of kernels that see padded lengths (``tests/test_graphs.py``)."""
        self.graphs = GraphedForward(self._backbone, **options) if enabled else None

    def _forward(self, batch: dict, spec: CaptureSpec) -> tuple:
        """The frozen forward and the capture request its output answers (the graphs' answers padded rows)."""
        if self.graphs is not None:
            return self.graphs(batch, spec)
        return self._backbone(batch, spec), spec

    @torch.no_grad()
    def extract_inputs(self, batch: dict) -> dict[str, tuple]:
        """Frozen forward -> {group: stacked inputs ``(n, P, ...)``}; ``{}`` for a batch without examples."""
        self._to_device()
        if self.kind == "sentence":
            out, _ = self._forward(batch, CaptureSpec(hidden=self.sentence_names, attn=[]))
            return {"sent": (sentence_inputs(out, self.sentence_names),)}
        if batch["labels"].numel() == 0:
            return {}
        if not self.plan.needs_forward:  # pseudo-layers only (raw, boxes): their inputs are in the batch
            return self.plan.inputs(None, batch)
        out, spec = self._forward(batch, self.plan.capture(batch))
        return self.plan.inputs(out, batch, spec)

    def per_head(self, inputs: dict[str, tuple]) -> dict[str, tuple]:
        return {k: tuple(t[i] for t in inputs[g.name]) for g in self.groups if g.name in inputs
                for i, k in enumerate(g.keys)}

    def stack(self, feats: dict[str, tuple]) -> dict[str, tuple]:
        """Per-head inputs (a feature cache's) -> stacked group inputs."""
        out = {}
        for g in self.groups:
            if all(k in feats for k in g.keys):
                out[g.name] = tuple(torch.stack(ts) for ts in zip(*(feats[k] for k in g.keys)))
        return out

    def extract(self, batch: dict) -> dict:
        """Frozen forward -> {head key: inputs} (feature caches, MDL and SentEval fit heads one by one); a feature
        cache's batch gives its stored inputs (``train mdl=true data.cache=CACHE`` codes the cached features)."""
        if "cached_flat" in batch:
            return unpack_cached(batch)
        return self.per_head(self.extract_inputs(batch))

    def group_logits(self, inputs: dict[str, tuple]) -> dict[str, torch.Tensor]:
        return {g: self.heads[g](*x) for g, x in inputs.items()}

    def logits(self, feats: dict) -> dict:
        """Per-head logits for per-head inputs (every key of a group present)."""
        out = {}
        for g, lg in self.group_logits(self.stack(feats)).items():
            grp = next(x for x in self.groups if x.name == g)
            out.update({k: lg[i] for i, k in enumerate(grp.keys)})
        return out

    def forward(self, batch: dict) -> dict:
        return self.logits(self.extract(batch))

    def _inputs(self, batch) -> dict[str, tuple]:
        if "cached_flat" in batch:  # a feature cache's batch (value_pl.data.cache)
            return self.stack(unpack_cached(batch))
        return self.extract_inputs(batch)

    def loss(self, inputs: dict[str, tuple], y: torch.Tensor) -> torch.Tensor:
        """Sum over heads of each head's mean cross-entropy."""
        total = 0.0
        for lg in self.group_logits(inputs).values():
            total = total + F.cross_entropy(lg.flatten(0, 1).float(), y.repeat(lg.shape[0]), reduction="sum")
        return total / y.numel()

    # --------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        self.counts_train.update(batch.get("counts", {}))
        inputs = self._inputs(batch)
        y = batch["labels"]
        self.labels_train.update(batch.get("label_counts", ()))
        if not inputs or y.numel() == 0:
            return sum(p.sum() * 0.0 for p in self.heads.parameters())
        loss = self.loss(inputs, y)
        # Lightning's self.log costs ~0.5 ms of host time per call (a GPU step is ~10 ms of host time): the epoch mean
        # is summed on the device (one op) and logged at the epoch's end (the progress bar's "loss"; no .item()
        # per step), and the step curve is logged only on the steps the logger writes (every log_every_n_steps)
        mean = loss.detach() / len(self.head_names)
        n = y.numel()
        self._loss_sum = mean * n if self._loss_sum is None else torch.add(self._loss_sum, mean, alpha=n)
        self._loss_n += n
        every = max(int(getattr(self.trainer, "log_every_n_steps", 1) or 1), 1)
        if (self.global_step + 1) % every == 0:
            self.log("train/loss", mean, batch_size=n)
        return loss

    def on_train_epoch_start(self):
        self._loss_sum, self._loss_n = None, 0

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Our batches (dicts of tensors, nested dicts/tuples, lists of keys) moved by a direct walk: Lightning's
        generic one costs ~0.4 ms of host time per batch. Pinned tensors copy asynchronously, on a CUDA device on a
        side stream (:class:`value_pl.data.pinning.CopyStreams`, :func:`value_pl.data.pinning.to_device`)."""
        if type(batch) is not dict:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        t = time.perf_counter()
        out = to_device(batch, device, self.copy_streams.for_device(device))
        self.transfer_s += time.perf_counter() - t  # (the host's part: non-blocking copies are only issued here)
        return out

    def _eval_step(self, batch, metric, stage):
        getattr(self, f"counts_{stage}").update(batch.get("counts", {}))
        inputs = self._inputs(batch)
        y = batch["labels"]
        if stage == "test":
            self.labels_test.update(batch.get("label_counts", ()))
        if not inputs or y.numel() == 0:
            return
        preds = torch.cat([lg.argmax(-1) for lg in self.group_logits(inputs).values()])  # (n heads, P)
        metric.update(preds, y)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_acc, "test")

    def _compute(self, metric) -> dict[str, float]:
        # under DDP every rank joins compute()'s all-reduce, also one that saw no batch
        if metric.update_called or (torch.distributed.is_available() and torch.distributed.is_initialized()):
            accs = metric.compute().reshape(-1).tolist()
        else:
            accs = [float("nan")] * len(self.head_names)
        metric.reset()
        return dict(zip(self.head_names, accs))

    def _count(self, stage: str) -> dict:
        c = getattr(self, f"counts_{stage}").compute()
        getattr(self, f"counts_{stage}").reset()
        self.seen[stage].append(c)
        self.pairs_evaluated[stage] = c["pairs"]
        return c

    def _count_labels(self, stage: str) -> None:
        m = getattr(self, f"labels_{stage}")
        self.label_counts[stage] = m.compute()  # every rank: the sum over ranks
        m.reset()

    def on_train_epoch_end(self):
        self._count("train")
        self._count_labels("train")
        total, n = sum_over_ranks(self._loss_sum, self._loss_n, self.device)  # the epoch over every rank's pairs
        if n:
            self.log("loss", total / n, prog_bar=True)

    def on_validation_epoch_end(self):
        self._count("val")
        accs = self._compute(self.val_acc)
        self.last_val = accs
        for k, a in accs.items():
            if a == a:
                self.log(f"val/acc/{self.display_name(k)}", a, sync_dist=False)
        layers = {k: a for k, a in accs.items() if k not in CONTROL_HEADS} or accs
        finite = [a for a in layers.values() if a == a]
        self.log("val/acc/best", max(finite) if finite else 0.0, prog_bar=True)
        self.log("chance", 1.0 / len(self.labels))
        if getattr(self, "eval_only", False):  # evaluating a saved checkpoint: report, do not select
            self.best_val = dict(accs)
            return
        if self.trainer is not None and self.trainer.sanity_checking:
            return
        for k, a in accs.items():
            if a == a and a > self.best_val.get(k, -1.0):
                g, i = self.slot[k]
                self.best_val[k] = a
                self.best_epoch[k] = int(self.current_epoch)
                self.best_state[k] = {n: t.cpu() for n, t in self.heads[g].slot_state(i).items()}

    def _load_best(self) -> dict:
        saved = {}
        for k, sd in self.best_state.items():
            g, i = self.slot[k]
            saved[k] = self.heads[g].slot_state(i)
            self.heads[g].load_slot_state(i, sd)
        return saved

    def on_test_start(self):
        self._swapped = self._load_best() if (self.use_best_heads and self.best_state) else None

    def on_test_epoch_end(self):
        self._count("test")
        self._count_labels("test")
        accs = self._compute(self.test_acc)
        self.test_results = accs
        for k, a in accs.items():
            if a == a:
                self.log(f"test/acc/{self.display_name(k)}", a, sync_dist=False)
        self.log("chance", 1.0 / len(self.labels))

    def on_test_end(self):
        for k, sd in (getattr(self, "_swapped", None) or {}).items():
            g, i = self.slot[k]
            self.heads[g].load_slot_state(i, sd)
        self._swapped = None

    def use_best_snapshots(self) -> None:
        """Load every head's best-by-validation snapshot (for evaluation of a saved checkpoint)."""
        self._load_best()
        self.use_best_heads = False
        self.eval_only = True

    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        cuda = next(self.heads.parameters()).is_cuda
        # fused on CUDA: one kernel for every head's update (same math as the per-parameter loop)
        return torch.optim.Adam(self.heads.parameters(), lr=float(self.optim_cfg.get("lr", 1e-3)),
                                weight_decay=float(self.optim_cfg.get("weight_decay", 0.0)), fused=cuda or None)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint):
        checkpoint["value_pl"] = {
            "heads_format": HEADS_FORMAT, "backbone_identity": self._backbone.describe(),
            "backbone_config": getattr(self._backbone, "config_record", None) or None,
            "best_val": self.best_val, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "task": self.task, "labels": self.labels, "labelling": getattr(self, "labelling", None),
        }
        # everything must load with torch.load(weights_only=True): plain containers, str, numbers, tensors
        checkpoint.pop(self.CHECKPOINT_HYPER_PARAMS_TYPE, None)  # a class (e.g. DictConfig): needs pickle
        for k in list(checkpoint):
            checkpoint[k] = plain(checkpoint[k])

    def on_load_checkpoint(self, checkpoint):
        v = checkpoint.get("value_pl", {})
        if v.get("heads_format") != HEADS_FORMAT:
            raise ValueError(f"this prober checkpoint stores its heads in layout {v.get('heads_format', 1)}, this "
                             f"value-pl reads layout {HEADS_FORMAT} (stacked heads): retrain it with this version")
        self.best_val = dict(v.get("best_val", {}))
        self.best_epoch = dict(v.get("best_epoch", {}))
        self.best_state = dict(v.get("best_state", {}))
        check_saved_backbone(self._backbone, v.get("backbone_identity", {}), v.get("backbone_config"))

    # ---------------------------------------------------------------- results
    def layer_rows(self) -> list[dict]:
        """One row per head; accuracies that could not be measured are ``None`` (never NaN)."""
        rows = []
        for k in self.head_names:
            name = self.display_name(k)
            base = name[len("attn_"):] if name.startswith("attn_") else name
            rows.append({
                "layer": layer_number(name) if name.startswith("layer_") else -1,
                "name": name,
                "title": self._backbone.layer_title(self.kind, base) + (" (attention prober)" if base != name else ""),
                "val_acc": _finite(self.best_val.get(k, self.last_val.get(k))),
                "test_acc": _finite(self.test_results.get(k)),
                "best_epoch": self.best_epoch.get(k),
            })
        return rows
