"""Collate backbone-agnostic samples into model batches, fast enough to feed a GPU from a few CPU workers.

Shards hold words, phrase spans, pixel boxes and fp16 features. Tokenisation and box encoding happen
here, per backbone, through an :class:`InputEncoder` the backbone provides. Pairs are turned into
*spans within a modality*: a phrase becomes its ``[start, end)`` text-token span, a region ``[r, r+1)``.
Backbones place those modalities into their streams; probers go through
:class:`~value_pl.backbones.base.BackboneOutput`, so nothing here depends on a stream layout.

Speed (``benchmarks/run.py``, loader row): words are tokenised once per worker and cached. A text is tokenised as
the tokenizer tokenises the sentence ``" ".join(words)`` (what the model was trained on): the first word alone,
every later word with its leading space -- the same pieces for WordPiece, which drops spaces, but ``Ġman``, not
``man``, for byte-level BPE (RoBERTa); so there is one cache for first words and one for the others (checked
against the tokenizer's sentence call in the tests, and on a probe sentence before the first batch:
:mod:`value_pl.backbones.checks`); features stay fp16 (converted on the device); everything the heads need per
pair -- token positions, the attention rows to capture and each pair's slot in them -- is computed here
on the CPU, so the GPU step has no host synchronisation.

Truncation is never silent: texts longer than ``max_text_len`` tokens (the backbone's position limit
unless configured lower) and images with more than ``max_regions`` regions are counted per batch
(``counts``), as are phrases cut by truncation, wholly or partly (a word whose pieces run past the limit is cut:
no phrase is probed on a shortened span), and the pairs dropped with them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .handover import batch_tensor
from .schema import PHRASE_REGION_TASKS, REGION_REGION_TASKS, SchemaError


def encode_boxes(boxes: np.ndarray, width: float, height: float, mode: str) -> np.ndarray:
    """Pixel ``x1,y1,x2,y2`` boxes -> the backbone's box input.

    ``uniter7``: x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)*(h/H)  (UNITER's norm_bb plus area).
    ``xyxy4``: x1/W, y1/H, x2/W, y2/H (LXMERT, VisualBERT-style).
    Every mode starts with x1/W, y1/H, x2/W, y2/H: :func:`box_geometry` reads only those.
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = b / np.array([width, height, width, height], dtype=np.float32)
    if mode == "xyxy4":
        return n
    if mode == "uniter7":
        w, h = n[:, 2] - n[:, 0], n[:, 3] - n[:, 1]
        return np.concatenate([n, w[:, None], h[:, None], (w * h)[:, None]], 1)
    raise ValueError(f"unknown box encoding {mode!r} (use uniter7 or xyxy4)")


BOX_DIMS = {"uniter7": 7, "xyxy4": 4}

#: the geometry-only control's encoding of a region (the ``boxes`` pseudo-layer), the same for every backbone: a
#: constant 1 (so that the bias-free Eq. 4 form also has each side's linear terms), then x1/W, y1/H, x2/W, y2/H,
#: w/W, h/H and the area fraction (w/W)*(h/H)
GEOMETRY = ("1", "x1/W", "y1/H", "x2/W", "y2/H", "w/W", "h/H", "wh/WH")


def box_geometry(region_boxes: torch.Tensor) -> torch.Tensor:
    """Encoded boxes ``(..., box_dim)`` of any box mode -> :data:`GEOMETRY` ``(..., 8)`` float32.

    Every mode of :func:`encode_boxes` starts with x1/W, y1/H, x2/W, y2/H (``tests/test_geometry.py`` checks it), so
    the result does not depend on the backbone's box encoding; the rest is recomputed from those four columns."""
    n = region_boxes[..., :4].float()
    w, h = n[..., 2:3] - n[..., 0:1], n[..., 3:4] - n[..., 1:2]
    return torch.cat([torch.ones_like(w), n, w, h, w * h], dim=-1)


#: per-batch counters every collated batch carries (summed over batches and ranks per split)
COUNTERS = ("samples", "pairs", "pairs_dropped", "texts_truncated", "phrases_dropped", "regions_truncated")


class InputEncoder:
    """Word-by-word tokenisation (cached per word) plus box encoding for one backbone. Picklable (runs in
    loader workers; each worker fills its own caches).

    Word ``i > 0`` is tokenised as ``" " + word`` and word 0 as ``word``, so that the pieces of a text equal the
    tokenizer's pieces of the sentence ``" ".join(words)`` for every pre-tokenizer that splits at spaces
    (WordPiece, byte-level BPE whose words after the first carry the space marker ``Ġ``, SentencePiece ``▁``)."""

    def __init__(self, tokenizer, box_mode: str = "uniter7", max_text_len: int = 512, max_regions: int = 100):
        self.tokenizer = tokenizer
        self.box_mode = box_mode
        self.max_text_len = int(max_text_len)
        self.max_regions = int(max_regions)
        self._pieces: dict[str, tuple[int, ...]] = {}  # words after the first (tokenised with a leading space)
        self._first: dict[str, tuple[int, ...]] = {}  # first words (tokenised alone)
        self._special: tuple[list[int], list[int]] | None = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_pieces"], d["_first"] = {}, {}  # workers start with empty caches
        return d

    @property
    def box_dim(self) -> int:
        return BOX_DIMS[self.box_mode]

    @property
    def special(self) -> tuple[list[int], list[int]]:
        """(ids before the words, ids after them): ``[CLS]`` / ``[SEP]`` for BERT tokenizers."""
        if self._special is None:
            tok = self.tokenizer
            bare = tok(["a"], add_special_tokens=False)["input_ids"][0]
            full = tok(["a"], add_special_tokens=True)["input_ids"][0]
            for i in range(len(full) - len(bare) + 1):
                if full[i:i + len(bare)] == bare:
                    self._special = (list(full[:i]), list(full[i + len(bare):]))
                    break
            else:  # pragma: no cover - no tokenizer we know of
                raise ValueError(f"cannot locate the words inside {type(tok).__name__}'s special-token template")
        return self._special

    def _cached(self, cache: dict, words: list[str], lead: str) -> list[tuple[int, ...]]:
        missing = [w for w in dict.fromkeys(words) if w not in cache]
        if missing:
            if len(cache) + len(missing) > 500_000:  # bounded memory on open-vocabulary corpora
                cache.clear()
            ids = self.tokenizer([lead + w for w in missing], add_special_tokens=False)["input_ids"]
            for w, i in zip(missing, ids):
                cache[w] = tuple(i)
        return [cache[w] for w in words]

    def pieces(self, words: list[str]) -> list[tuple[int, ...]]:
        """Each word's token ids as in the tokenizer's call on ``" ".join(words)``."""
        if not words:
            return []
        first = self._first.get(words[0])
        if first is None:
            first = self._cached(self._first, words[:1], "")[0]
        rest = self._cached(self._pieces, words[1:], " ")
        rest.insert(0, first)
        return rest

    def encode_text(self, word_lists: list[list[str]]) -> dict:
        """Token ids, masks and each word's ``[start, end)`` token span (``-1``: no pieces, or cut by truncation,
        wholly or partly: a word whose pieces run past ``max_text_len`` has no span); ``word_empty`` (B, W) marks
        the words with no pieces (e.g. a lone zero-width space under WordPiece), which no truncation cut."""
        pre, post = self.special
        B = len(word_lists)
        limit = self.max_text_len
        room = limit - len(pre) - len(post)
        if room < 1:
            raise ValueError(f"max_text_len={limit} leaves no room for words after the special tokens")
        rows, spans = [], []
        truncated = np.zeros(B, dtype=bool)
        word_empty = np.zeros((B, max((len(w) for w in word_lists), default=0)), dtype=bool)
        for i, words in enumerate(word_lists):
            pcs = self.pieces(words)
            lens = np.fromiter((len(p) for p in pcs), dtype=np.int64, count=len(pcs))
            ends = np.cumsum(lens) + len(pre)
            starts = ends - lens
            flat = [t for p in pcs for t in p]
            if len(flat) > room:
                truncated[i] = True
                flat = flat[:room]
                cut = len(pre) + room
                # a word is cut when any of its pieces is: wholly (starts at or after the cut) or partly (starts
                # before it, ends after it). A partly cut word keeps its first pieces in the text but has no span,
                # so a phrase ending in it is dropped (and counted), never probed on a shortened span.
                gone = ends > cut
                starts = np.where(gone, -1, starts)
                ends = np.where(gone, -1, ends)
            empty = lens == 0  # a word with no pieces has no tokens
            word_empty[i, :len(words)] = empty
            starts, ends = np.where(empty, -1, starts), np.where(empty, -1, ends)
            rows.append(pre + flat + post)
            spans.append((starts, ends))
        T = max(len(r) for r in rows) if rows else len(pre) + len(post)
        W = max((len(w) for w in word_lists), default=0)
        pad = self.tokenizer.pad_token_id or 0
        ids = np.full((B, T), pad, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        special = np.zeros((B, T), dtype=np.int64)
        w2t = np.full((B, max(W, 1), 2), -1, dtype=np.int64)
        for b, (r, (s, e)) in enumerate(zip(rows, spans)):
            n = len(r)
            ids[b, :n] = r
            mask[b, :n] = 1
            special[b, :len(pre)] = 1
            special[b, n - len(post):n] = 1
            w2t[b, :len(s), 0] = s
            w2t[b, :len(s), 1] = e
        return {"input_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask),
                "special_mask": torch.from_numpy(special), "word_to_token": torch.from_numpy(w2t),
                "truncated": truncated, "word_empty": word_empty}


def phrase_span(w2t: np.ndarray, empty: np.ndarray, s0: int, e0: int) -> tuple[int, int] | None:
    """The ``[start, end)`` token span of words ``[s0, e0)`` from one text's word spans ``w2t`` (W, 2) and its
    ``word_empty`` row: ``None`` when truncation cut one of its words (wholly or partly; no phrase is probed on a
    shortened span) or none of its words has pieces. Words with no pieces are skipped, wherever they are."""
    tok = w2t[s0:e0]
    ok = tok[:, 0] >= 0
    if not ok.any() or (~ok & ~empty[s0:e0]).any():
        return None
    return int(tok[ok, 0].min()), int(tok[ok, 1].max())


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


def _non_finite(x: np.ndarray) -> bool:
    """Any NaN/inf: for fp16, the largest magnitude's bits (NaN/inf have all exponent bits set), ~4x faster
    than ``np.isfinite``."""
    if x.dtype == np.float16 and x.size:
        mag = np.bitwise_and(np.ascontiguousarray(x).view(np.uint16), 0x7FFF)
        return bool(mag.max() >= 0x7C00)
    return not bool(np.isfinite(x).all())


def _padded(rows: list[list[int]], fill: int = -1, min_width: int = 1) -> np.ndarray:
    W = max([len(r) for r in rows] + [min_width])
    out = np.full((len(rows), W), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def label_histogram(labels: np.ndarray) -> list[int]:
    """``out[i]``: how many of ``labels`` are ``i`` (counted here, in the loader worker: the probe module adds these
    on the host for its majority baseline, with no device op in the step)."""
    return np.bincount(labels.astype(np.int64, copy=False)).tolist() if labels.size else []


class Collator:
    """List of decoded samples -> batch dict of tensors.

    Inputs: ``keys``, ``input_ids``, ``text_mask``, ``special_mask``, ``word_to_token`` (B, W, 2),
    ``region_feats`` (B, R, Dv) in the shards' dtype (fp16), ``region_boxes`` (B, R, box_dim) float32,
    ``region_mask`` (B, R); ``counts``: {counter: int} (:data:`COUNTERS`).

    Pair tasks add ``pair_b`` (P,), ``a_span``/``b_span`` (P, 2) spans within the side's modality,
    ``labels`` (P,), and for the heads: ``a_pos``/``b_pos`` (P, S) the positions of each side's tokens
    within its modality (``a_valid``/``b_valid`` mark the real ones), ``rows`` {modality: (B, R)} the
    positions whose attention rows the pairs need (-1 padded), and ``a_slot``/``b_slot`` (P, S) each
    position's column in ``rows`` of its sample. Sentence tasks add ``labels`` (B,).
    """

    def __init__(self, encoder: InputEncoder, task: TaskSpec | None = None, relabel=None, text_only: bool = False):
        self.encoder = encoder
        self.task = task
        self.relabel = relabel  # optional callable(sample_key, pair_idx, label[, context]) -> label (control tasks)
        self.text_only = text_only
        self._index = task.index if task is not None else {}

    def __call__(self, samples: list[dict]) -> dict:
        enc = self.encoder
        batch = enc.encode_text([s["meta"]["words"] for s in samples])
        B = len(samples)
        nbox = [0 if self.text_only else len(s["meta"]["regions"]["boxes"]) for s in samples]
        nreg = [min(n, enc.max_regions) for n in nbox]
        R = max(nreg) if nreg else 0
        dv = max((s["feats"].shape[1] for s in samples if s["feats"].ndim == 2), default=0)
        fdt = next((s["feats"].dtype for s in samples if s["feats"].ndim == 2 and s["feats"].shape[0]), np.float16)
        feats_t = batch_tensor((B, R, dv), fdt)  # shared memory in a worker
        feats = feats_t.numpy()
        boxes = np.zeros((B, R, enc.box_dim), dtype=np.float32)
        rmask = np.zeros((B, R), dtype=np.int64)
        for b, s in enumerate(samples):
            n = nreg[b]
            if n == 0:
                feats[b] = 0
                continue
            m = s["meta"]
            f = s["feats"]
            if f.ndim != 2 or f.shape[0] < n or f.shape[1] != dv:  # never broadcast one row (or column) to many
                raise SchemaError(f"{s.get('source', ['?'])[0]}: sample {s['key']}: features of shape {f.shape} for "
                                  f"{nbox[b]} box(es), batch feature width {dv}")
            if _non_finite(f[:n]):  # checked while the sample is in cache
                raise SchemaError(f"{s.get('source', ['?'])[0]}: sample {s['key']}: non-finite region features")
            feats[b, :n] = f[:n]
            feats[b, n:] = 0
            img = m["image"]
            boxes[b, :n] = encode_boxes(m["regions"]["boxes"][:n], img["width"], img["height"], enc.box_mode)
            rmask[b, :n] = 1
        counts = {k: 0 for k in ("samples", "pairs", "pairs_dropped", "phrases_dropped")}
        truncated = batch.pop("truncated")
        word_empty = batch.pop("word_empty")
        counts.update(samples=B, texts_truncated=int(truncated.sum()),
                      regions_truncated=sum(1 for a, b in zip(nbox, nreg) if a > b))
        batch.update(region_feats=feats_t, region_boxes=torch.from_numpy(boxes),
                     region_mask=torch.from_numpy(rmask), keys=[s["key"] for s in samples], counts=counts)
        if self.task is not None:
            if self.task.kind == "sentence":
                batch["labels"] = self._sentence_labels(samples)
                counts["pairs"] = B
            elif self.task.kind in ("phrase_region", "region_region"):
                batch.update(self._pairs(samples, batch["word_to_token"].numpy(), nreg, word_empty, counts))
            if "labels" in batch:
                batch["label_counts"] = label_histogram(batch["labels"].numpy())
        return batch

    def _label(self, key: str, lab: str, j: int, context: dict | None = None) -> int:
        if self.relabel is not None:
            if getattr(self.relabel, "wants_context", False):
                # control tasks need the pair's input (its "type"): context = {"task", "meta", "pair"}
                lab = self.relabel(key, j, lab, context or {})
            else:
                lab = self.relabel(key, j, lab)
        try:
            return self._index[lab]
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

    def _pairs(self, samples, w2t: np.ndarray, nreg: list[int], word_empty: np.ndarray, counts: dict) -> dict:
        task = self.task.name
        phrase_task = task in PHRASE_REGION_TASKS
        pb, a_sp, b_sp, labs = [], [], [], []
        rows_a: list[list[int]] = []  # per sample: positions of side a's modality (text or region) needed
        rows_b: list[list[int]] = []  # per sample: region positions needed
        a_slot, b_slot = [], []
        for b, s in enumerate(samples):
            m = s["meta"]
            need_a: dict[int, int] = {}
            need_b: dict[int, int] = {} if phrase_task else need_a  # region_region: one row set
            dead_phrases = set()
            for j, (a, r, lab) in enumerate(m.get("pairs", {}).get(task, [])):
                if r >= nreg[b] or (task in REGION_REGION_TASKS and a >= nreg[b]):
                    counts["pairs_dropped"] += 1  # region cut by max_regions
                    continue
                if phrase_task:
                    span = phrase_span(w2t[b], word_empty[b], *m["phrases"][a]["span"])
                    if span is None:
                        counts["pairs_dropped"] += 1  # the phrase was cut (wholly or partly) by truncation
                        dead_phrases.add(a)
                        continue
                    ts, te = span
                else:
                    ts, te = a, a + 1
                a_sp.append((ts, te))
                b_sp.append((r, r + 1))
                pb.append(b)
                labs.append(self._label(s["key"], lab, j, {"task": task, "meta": m, "pair": (a, r, lab)}))
                a_slot.append([need_a.setdefault(t, len(need_a)) for t in range(ts, te)])
                b_slot.append([need_b.setdefault(r, len(need_b))])
            counts["phrases_dropped"] += len(dead_phrases)
            rows_a.append(list(need_a))
            rows_b.append(list(need_b))
        P = len(pb)
        counts["pairs"] = P
        a_span = np.asarray(a_sp, dtype=np.int64).reshape(-1, 2)
        b_span = np.asarray(b_sp, dtype=np.int64).reshape(-1, 2)
        lens = a_span[:, 1] - a_span[:, 0]
        ar = np.arange(max(int(lens.max()) if P else 1, 1))
        a_valid = ar[None] < lens[:, None]
        a_pos = np.where(a_valid, a_span[:, :1] + ar[None], 0)
        a_slot = _padded(a_slot, fill=0)
        b_slot = np.asarray(b_slot, dtype=np.int64).reshape(-1, 1) if P else np.zeros((0, 1), np.int64)
        a_mod, b_mod = ("text", "region") if phrase_task else ("region", "region")
        rows = {"region": torch.from_numpy(_padded(rows_b))}
        if phrase_task:
            rows["text"] = torch.from_numpy(_padded(rows_a))
        t = torch.from_numpy
        return {
            "pair_b": torch.tensor(pb, dtype=torch.long),
            "a_span": t(a_span), "b_span": t(b_span),
            "labels": torch.tensor(labs, dtype=torch.long),
            "a_pos": t(a_pos), "a_valid": t(a_valid), "a_slot": t(a_slot),
            "b_pos": t(b_span[:, :1].copy()), "b_valid": torch.ones(P, 1, dtype=torch.bool), "b_slot": t(b_slot),
            "rows": rows, "pair_modalities": (a_mod, b_mod),
        }
