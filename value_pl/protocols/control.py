"""Label baselines: control tasks (Hewitt & Liang 2019) and shuffled labels.

Control tasks: the same inputs, labels that depend only on the input's *type*.

A control task keeps the probing task's inputs and output space but replaces each label by one assigned
to the pair's *type*, drawn once at random (seeded) from the task's empirical training label
distribution. A probe can only solve it by memorising type -> label; **selectivity** = task accuracy -
control accuracy (reported by ``python -m value_pl.report``) says how much of the probe's accuracy is
not explained by memorisation.

Type of a pair (deterministic from the shard's inputs; features are continuous, so types come from text)
------------------------------------------------------------------------------------------------------
* phrase-region (vcd, vcc): the lower-cased words of the phrase span, e.g. ``"a red shirt"``.
  (All pairs of one phrase text share a control label, like all tokens of a word type in H&L.)
* region-region (vri, vrc): ``(type(subject), type(object))`` where a region's type is the lower-cased
  phrase that names it -- the first phrase of the sample sharing a coreference chain with the region
  (``regions.chains`` / ``phrases[].chain``; for Visual Genome the object name), falling back to
  ``"<source>"`` (``annotated``/``detected``) for regions no phrase names.
* sentence (SentEval): the lower-cased first word of the sentence plus its length in words.

The label of a type is ``F^{-1}(u)`` with ``u = sha256(seed, task, type)`` mapped to [0, 1) and ``F`` the
cumulative training label distribution (``manifest.json``), so it needs no pass over the data, is the same
in every loader worker and every split, and types' labels are i.i.d. draws from the label distribution.
"""
from __future__ import annotations

import bisect
import hashlib


def _unit(*parts) -> float:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _words(meta: dict, span) -> str:
    s, e = span
    return " ".join(w.lower() for w in meta["words"][s:e])


def region_type(meta: dict, r: int) -> str:
    regions = meta.get("regions", {})
    chains = regions.get("chains") or []
    mine = set(chains[r]) if r < len(chains) else set()
    if mine:
        for p in meta.get("phrases", []):
            if p.get("chain") in mine:
                return _words(meta, p["span"])
    src = regions.get("source") or []
    return f"<{src[r] if r < len(src) else 'region'}>"


def pair_type(task_kind: str, context: dict, key: str = "", j: int = 0) -> str:
    """The documented type key of one example (see the module docstring)."""
    meta = context.get("meta") or {}
    pair = context.get("pair")
    if task_kind == "phrase_region" and pair is not None:
        return "phrase:" + _words(meta, meta["phrases"][pair[0]]["span"])
    if task_kind == "region_region" and pair is not None:
        return f"rel:{region_type(meta, pair[0])}|{region_type(meta, pair[1])}"
    if task_kind == "sentence":
        w = meta.get("words") or [""]
        return f"sent:{w[0].lower()}|{len(w)}"
    return f"example:{key}:{j}"  # no context given: every example is its own type


class ControlRelabel:
    """Picklable label transform ``(key, pair_index, label, context) -> control label``."""

    wants_context = True

    def __init__(self, counts: dict[str, int], task: str, kind: str, seed: int = 0):
        items = sorted((k, v) for k, v in counts.items() if v > 0)
        if not items:
            raise ValueError(f"control task for {task}: no training label counts")
        total = sum(v for _, v in items)
        self.labels = [k for k, _ in items]
        self.probs = [v / total for _, v in items]
        acc, self.cum = 0.0, []
        for p in self.probs:
            acc += p
            self.cum.append(acc)
        self.task, self.kind, self.seed = task, kind, int(seed)

    @classmethod
    def from_config(cls, cfg, spec, dm) -> "ControlRelabel":
        counts = dm.label_counts(spec.name, "train")
        seed = cfg.get("control_seed")
        return cls(counts, spec.name, spec.kind, int(cfg.seed if seed is None else seed))

    def label_of_type(self, t: str) -> str:
        u = _unit("control", self.seed, self.task, t)
        return self.labels[min(bisect.bisect_right(self.cum, u), len(self.labels) - 1)]

    def __call__(self, key: str, j: int, label: str, context: dict | None = None) -> str:
        return self.label_of_type(pair_type(self.kind, context or {}, key, j))


class ShuffledLabels:
    """Replace every label by one drawn, independently of the input, from the task's label distribution.

    Deterministic per (seed, sample key, pair index): a sanity baseline with no learnable signal, so a
    prober trained on it must stay near the majority/chance level.
    """

    def __init__(self, counts: dict[str, int], seed: int = 0):
        items = sorted((k, v) for k, v in counts.items() if v > 0)
        if not items:
            raise ValueError("ShuffledLabels needs non-empty label counts")
        total = sum(v for _, v in items)
        self.labels = [k for k, _ in items]
        acc, self.cum = 0, []
        for _, v in items:
            acc += v
            self.cum.append(acc / total)
        self.seed = seed

    def __call__(self, key: str, j: int, label: str) -> str:
        u = _unit("shuffle", self.seed, key, j)
        return self.labels[min(bisect.bisect_right(self.cum, u), len(self.labels) - 1)]
