"""Collate backbone-agnostic samples into model batches.

Shards hold words, phrase spans, pixel boxes and fp16 features. Tokenisation and box encoding happen
here, per backbone, through an :class:`InputEncoder` the backbone provides. Pairs are turned into
*spans within a modality*: a phrase becomes its ``[start, end)`` text-token span, a region ``[r, r+1)``.
Backbones place those modalities into their streams; probers go through
:class:`~value_pl.backbones.base.BackboneOutput`, so nothing here depends on a stream layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .schema import PHRASE_REGION_TASKS, REGION_REGION_TASKS, SchemaError


def encode_boxes(boxes: np.ndarray, width: float, height: float, mode: str) -> np.ndarray:
    """Pixel ``x1,y1,x2,y2`` boxes -> the backbone's box input.

    ``uniter7``: x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)*(h/H)  (UNITER's norm_bb plus area).
    ``xyxy4``: x1/W, y1/H, x2/W, y2/H (LXMERT, VisualBERT-style).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = np.stack([b[:, 0] / width, b[:, 1] / height, b[:, 2] / width, b[:, 3] / height], 1)
    if mode == "xyxy4":
        return n
    if mode == "uniter7":
        w, h = n[:, 2] - n[:, 0], n[:, 3] - n[:, 1]
        return np.concatenate([n, w[:, None], h[:, None], (w * h)[:, None]], 1)
    raise ValueError(f"unknown box encoding {mode!r} (use uniter7 or xyxy4)")


BOX_DIMS = {"uniter7": 7, "xyxy4": 4}


class InputEncoder:
    """Word-by-word tokenisation plus box encoding for one backbone. Picklable (runs in workers)."""

    def __init__(self, tokenizer, box_mode: str = "uniter7", max_text_len: int = 64, max_regions: int = 100):
        self.tokenizer = tokenizer
        self.box_mode = box_mode
        self.max_text_len = max_text_len
        self.max_regions = max_regions

    @property
    def box_dim(self) -> int:
        return BOX_DIMS[self.box_mode]

    def encode_text(self, word_lists: list[list[str]]):
        tok = self.tokenizer(word_lists, is_split_into_words=True, add_special_tokens=True, truncation=True,
                             max_length=self.max_text_len, padding=True, return_tensors="pt",
                             return_special_tokens_mask=True)
        B, T = tok["input_ids"].shape
        W = max((len(w) for w in word_lists), default=0)
        w2t = torch.full((B, max(W, 1), 2), -1, dtype=torch.long)
        for b in range(B):
            ids = tok.word_ids(b)
            for t, w in enumerate(ids):
                if w is None:
                    continue
                if w2t[b, w, 0] < 0:
                    w2t[b, w, 0] = t
                w2t[b, w, 1] = t + 1
        return {
            "input_ids": tok["input_ids"],
            "text_mask": tok["attention_mask"],
            "special_mask": tok["special_tokens_mask"] * tok["attention_mask"],
            "word_to_token": w2t,
        }


@dataclass
class TaskSpec:
    """What a collator extracts for one task."""

    name: str
    kind: str  # phrase_region | region_region | sentence | none
    labels: list[str]
    label_map: dict[str, str] | None = None  # control tasks: (key of pair) handled by caller

    @property
    def index(self) -> dict[str, int]:
        return {l: i for i, l in enumerate(self.labels)}


class Collator:
    """List of decoded samples -> batch dict of tensors.

    Batch keys: ``keys``, ``input_ids``, ``text_mask``, ``special_mask``, ``word_to_token`` (B, W, 2),
    ``region_feats`` (B, R, Dv) float32, ``region_boxes`` (B, R, box_dim), ``region_mask`` (B, R),
    and for pair tasks ``pair_b`` (P,), ``a_span``/``b_span`` (P, 2) spans within the side's modality,
    ``labels`` (P,) -- or for sentence tasks ``labels`` (B,).
    """

    def __init__(self, encoder: InputEncoder, task: TaskSpec | None = None, relabel=None, text_only: bool = False):
        self.encoder = encoder
        self.task = task
        self.relabel = relabel  # optional callable(sample_key, pair_idx, label[, context]) -> label (control tasks)
        self.text_only = text_only

    def __call__(self, samples: list[dict]) -> dict:
        enc = self.encoder
        words = [s["meta"]["words"] for s in samples]
        batch = enc.encode_text(words)
        B = len(samples)
        nreg = [0 if self.text_only else min(len(s["meta"]["regions"]["boxes"]), enc.max_regions) for s in samples]
        R = max(nreg) if nreg else 0
        dv = max((s["feats"].shape[1] for s in samples if s["feats"].ndim == 2), default=0)
        feats = torch.zeros(B, R, dv)
        boxes = torch.zeros(B, R, enc.box_dim)
        rmask = torch.zeros(B, R, dtype=torch.long)
        for b, s in enumerate(samples):
            n = nreg[b]
            if n == 0:
                continue
            m = s["meta"]
            f = s["feats"][:n].astype(np.float32)
            if not np.isfinite(f).all():
                raise SchemaError(f"sample {s['key']}: non-finite region features")
            feats[b, :n] = torch.from_numpy(f)
            bx = np.asarray(m["regions"]["boxes"][:n], dtype=np.float32)
            boxes[b, :n] = torch.from_numpy(encode_boxes(bx, m["image"]["width"], m["image"]["height"], enc.box_mode))
            rmask[b, :n] = 1
        batch.update(region_feats=feats, region_boxes=boxes, region_mask=rmask, keys=[s["key"] for s in samples])
        if self.task is not None:
            if self.task.kind == "sentence":
                batch["labels"] = self._sentence_labels(samples)
            elif self.task.kind in ("phrase_region", "region_region"):
                batch.update(self._pairs(samples, batch["word_to_token"], nreg))
        return batch

    def _label(self, key: str, lab: str, j: int, context: dict | None = None) -> int:
        if self.relabel is not None:
            if getattr(self.relabel, "wants_context", False):
                # control tasks need the pair's input (its "type"): context = {"task", "meta", "pair"}
                lab = self.relabel(key, j, lab, context or {})
            else:
                lab = self.relabel(key, j, lab)
        try:
            return self.task.index[lab]
        except KeyError:
            raise SchemaError(f"sample {key}: label {lab!r} is not one of the {len(self.task.labels)} "
                              f"labels of task {self.task.name}") from None

    def _sentence_labels(self, samples):
        out = []
        for s in samples:
            lab = s["meta"].get("sentence_labels", {}).get(self.task.name)
            if lab is None:
                raise SchemaError(f"sample {s['key']}: no sentence label for task {self.task.name}")
            out.append(self._label(s["key"], lab, 0, {"task": self.task.name, "meta": s["meta"], "pair": None}))
        return torch.tensor(out, dtype=torch.long)

    def _pairs(self, samples, w2t, nreg):
        task = self.task.name
        pb, a_sp, b_sp, labs = [], [], [], []
        dropped = 0
        for b, s in enumerate(samples):
            m = s["meta"]
            for j, (a, r, lab) in enumerate(m.get("pairs", {}).get(task, [])):
                if r >= nreg[b] or (task in REGION_REGION_TASKS and a >= nreg[b]):
                    dropped += 1  # region cut by max_regions: counted, reported by the module
                    continue
                if task in PHRASE_REGION_TASKS:
                    s0, e0 = m["phrases"][a]["span"]
                    ts, te = int(w2t[b, s0, 0]), int(w2t[b, e0 - 1, 1])
                    if ts < 0 or te <= ts:
                        dropped += 1  # phrase truncated away by max_text_len
                        continue
                    a_sp.append((ts, te))
                else:
                    a_sp.append((a, a + 1))
                b_sp.append((r, r + 1))
                pb.append(b)
                labs.append(self._label(s["key"], lab, j, {"task": task, "meta": m, "pair": (a, r, lab)}))
        return {
            "pair_b": torch.tensor(pb, dtype=torch.long),
            "a_span": torch.tensor(a_sp, dtype=torch.long).reshape(-1, 2),
            "b_span": torch.tensor(b_sp, dtype=torch.long).reshape(-1, 2),
            "labels": torch.tensor(labs, dtype=torch.long),
            "pairs_dropped": torch.tensor(dropped),
        }
