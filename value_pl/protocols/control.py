"""Label baselines: control tasks (Hewitt & Liang 2019) and shuffled labels.

Control tasks: the same inputs, labels that depend only on the input's *type*.

A control task keeps the probing task's inputs and output space but replaces each label by one assigned
to the example's *type*, drawn once at random (seeded) from the task's empirical training label
distribution. A probe can only solve it by memorising type -> label; **selectivity** = task accuracy -
control accuracy (reported by ``python -m value_pl.report``) says how much of the probe's accuracy is
not explained by memorisation.

Type of an example (:func:`value_pl.data.schema.pair_type`, the one definition the shard builders also
use to count types into ``manifest.json`` ``control_types``)
-----------------------------------------------------------------------------------------------------
H&L: the type is the identity of the items. A region's identity is what the shards say it is,
``regions.names`` (schema 2): the Visual Genome object name(s) (``man``, ``tennis ball``), the
Flickr30k Entities coarse type(s) of its coreference chain(s) (``people``), or ``<unknown>`` for a
detection that carries no annotation.

* region-region (vri, vrc): ``rel:<subject identity>|<object identity>``, e.g. ``rel:man|hat``;
* phrase-region (vcd, vcc): ``phrase:<lower-cased phrase words>|<region identity>``;
* sentence (SentEval): ``sent:<lower-cased first word>|<number of words>``.

The label of a type is ``F^{-1}(u)`` with ``u = sha256(seed, task, type)`` mapped to [0, 1) and ``F`` the
cumulative training label distribution (``manifest.json``), so it needs no pass over the data, is the same
in every loader worker and every split, and types' labels are i.i.d. draws from the label distribution.

A control task with fewer than 2 types in a split would give every example one label (a probe reaches
100% by predicting a constant): :meth:`ControlRelabel.from_config` refuses it at start, naming the shard
set, split and task. A shard set of schema 1 (no region names) is refused earlier, by
:func:`value_pl.data.schema.load_manifest`, with a "rebuild" message.
"""
from __future__ import annotations

import bisect
import hashlib

from ..data.schema import control_types
from ..data.schema import pair_type as schema_pair_type


def _unit(*parts) -> float:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def pair_type(task_kind: str, context: dict, key: str = "", j: int = 0) -> str:
    """The documented type of one example given the collator's context ``{"task", "meta", "pair"}``."""
    meta = context.get("meta")
    pair = context.get("pair")
    if meta is not None and (task_kind == "sentence" or pair is not None):
        return schema_pair_type(task_kind, meta, pair)
    return f"example:{key}:{j}"  # no context given: every example is its own type


def check_types(man: dict, task: str, root="?", splits=("train", "val", "test")) -> dict[str, int]:
    """Distinct control types per split (from the manifest); raise if a split with pairs has fewer than 2."""
    out = {}
    for split in splits:
        info = (man.get("splits") or {}).get(split)
        if info is None:
            continue
        n_pairs = sum((info.get("pairs") or {}).get(task, {}).values())
        n = control_types(man, split, task, root)
        out[split] = n
        if n_pairs and n < 2:
            raise ValueError(f"control task for {task} on {root}, split {split!r}: {n} distinct control type(s) "
                             f"over {n_pairs} examples -- every example would get the same control label. "
                             f"Control types come from regions.names (schema 2); rebuild the shards if they "
                             f"should differ, or do not run control=true on this set.")
    return out


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
        self.types: dict[str, int] = {}  # distinct types per split (manifest), set by from_config

    @classmethod
    def from_config(cls, cfg, spec, dm) -> "ControlRelabel":
        """The control task of a run; refuses (ValueError) a split with fewer than 2 types."""
        splits = [dm.splits[s] for s in ("train", "val", "test") if s in dm.splits]
        types = check_types(dm.manifest, spec.name, dm.root, splits)
        counts = dm.label_counts(spec.name, "train")
        c = cls(counts, spec.name, spec.kind, control_seed(cfg))
        c.types = types
        return c

    def label_of_type(self, t: str) -> str:
        u = _unit("control", self.seed, self.task, t)
        return self.labels[min(bisect.bisect_right(self.cum, u), len(self.labels) - 1)]

    def __call__(self, key: str, j: int, label: str, context: dict | None = None) -> str:
        return self.label_of_type(pair_type(self.kind, context or {}, key, j))


def control_seed(cfg) -> int:
    """``control_seed`` if set, else the run's ``seed``."""
    seed = cfg.get("control_seed")
    return int(cfg.seed if seed is None else seed)


def control_info(cfg, dm, task: str) -> dict | bool:
    """``results.json`` ``"control"``: ``false``, or ``{"types": <distinct types in train>, "seed": ...}``."""
    if not cfg.get("control", False):
        return False
    splits = {s: dm.splits[s] for s in ("train", "val", "test") if s in dm.splits}
    per = {sp: control_types(dm.manifest, sp, task, dm.root) for sp in splits.values()}
    return {"types": per.get(splits.get("train", "train")), "types_per_split": per, "seed": control_seed(cfg)}


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
