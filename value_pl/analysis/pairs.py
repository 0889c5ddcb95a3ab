"""Collate for the analyses: the backbone's own :class:`~value_pl.data.collate.Collator` (inputs only),
plus the linked pairs the max-attention tables need, with their types and random partners.

Added batch keys (all spans are ``[start, end)`` within the modality, as the Collator's):

``coref_*`` -- one row per ``vcd`` pair labelled ``coref`` (a noun phrase and the region it refers to):
    ``coref_b`` (P,), ``coref_phrase`` (P, 2) text-token span, ``coref_region`` (P, 2),
    ``coref_type`` list of the phrase's coarse type (``phrases[i].label``), ``coref_rand_phrase``
    (P, 2) a random other phrase of the sample not linked to the region (``-1`` when there is none),
    ``coref_rand_region`` (P, 2) a random other region not linked to the phrase (``-1``: none);
    ``cmp_pair`` (Q,) / ``cmp_phrase`` (Q, 2): every other phrase not linked to the pair's region
    (Table 7's competitors).
``rel_*`` -- one row per ``vrc`` pair: ``rel_b``, ``rel_s``/``rel_o`` (P, 2) subject/object regions,
    ``rel_type`` list of predicates, ``rel_rand`` (P, 2) a random region other than both (``-1``: none).
``analysis_missing`` -- ``{reason: count}`` of pairs or partners that could not be formed (a region cut
    by ``max_regions``, a phrase truncated by ``max_text_len`` or with no tokens, no other phrase/region), and of
    the pairs whose random region was drawn without the near-duplicates of their own regions; never dropped
    silently. Phrase spans are the Collator's (:func:`~value_pl.data.collate.phrase_span`).

Random partners are drawn from a generator seeded by ``(seed, crc32(sample key))``: the same on every
run, independent of batching and of the order of the shards. A random *region* is never a near-duplicate of
the pair's own regions (IoU >= ``rand_iou`` with the phrase's linked regions, or with the relation's subject
or object): real detectors return several overlapping boxes of one object, and such a box is the same object,
not a random one -- it would lift the Rand. baseline towards the real pair (the VCD builder keeps them out of
its negatives for the same reason).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from ..data.collate import Collator, phrase_span
from ..datasets.regions.combine import iou_matrix


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _t(rows: list, width: int = 2) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long).reshape(-1, width)


class AnalysisCollator:
    """Wraps a backbone collator (called with no task) and adds coreference and relation pairs."""

    def __init__(self, base: Collator, seed: int = 0, coref_task: str = "vcd", coref_label: str = "coref",
                 relation_task: str = "vrc", rand_iou: float | None = 0.5):
        self.base = base
        self.seed = int(seed)
        self.rand_iou = None if rand_iou is None else float(rand_iou)
        self.coref_task, self.coref_label, self.relation_task = coref_task, coref_label, relation_task

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.base(samples)
        w2t = batch["word_to_token"].numpy()
        nreg = batch["region_mask"].sum(1).tolist()
        missing: dict[str, int] = {}

        def miss(k):
            missing[k] = missing.get(k, 0) + 1

        cb, cph, creg, ctype, crp, crr, qp, qph = [], [], [], [], [], [], [], []
        rb, rs, ro, rtype, rr = [], [], [], [], []
        for b, s in enumerate(samples):
            m = s["meta"]
            rng = _rng(self.seed, s["key"])
            nr = int(nreg[b])
            near = self._near(m, nr)

            def random_region(own, why):  # a region other than the pair's own and their near-duplicates
                cands = [j for j in range(nr) if j not in own]
                if near is not None:
                    kept = [j for j in cands if not any(near[j, o] for o in own if o < nr)]  # own: maybe cut
                    if len(kept) < len(cands):
                        miss(f"{why}: near-duplicates of the pair's own regions (not drawn as the random region)")
                    cands = kept
                return cands[int(rng.integers(len(cands)))] if cands else None
            phrases = m.get("phrases", [])
            # the Collator's phrase spans: words with no pieces skipped, a phrase with a word cut by truncation lost
            empty = np.array([not p for p in self.base.encoder.pieces(m["words"])], dtype=bool)
            spans = [phrase_span(w2t[b], empty, *p["span"]) for p in phrases]
            links = [(a, r) for a, r, lab in m.get("pairs", {}).get(self.coref_task, []) if lab == self.coref_label]
            linked_to_region: dict[int, set] = {}
            linked_to_phrase: dict[int, set] = {}
            for a, r in links:
                linked_to_region.setdefault(r, set()).add(a)
                linked_to_phrase.setdefault(a, set()).add(r)
            for a, r in links:
                if r >= nr:
                    miss("coref: region absent (or cut by max_regions)")
                    continue
                if spans[a] is None:
                    s0, e0 = phrases[a]["span"]
                    miss("coref: phrase with no tokens" if empty[s0:e0].all() else
                         "coref: phrase truncated by max_text_len")
                    continue
                P = len(cb)
                cb.append(b)
                cph.append(spans[a])
                creg.append((r, r + 1))
                ctype.append(str(phrases[a].get("label") or "unknown"))
                others = [i for i, sp in enumerate(spans) if sp is not None and i not in linked_to_region.get(r, ())]
                if others:
                    crp.append(spans[others[int(rng.integers(len(others)))]])
                    for i in others:
                        qp.append(P)
                        qph.append(spans[i])
                else:
                    crp.append((-1, -1))
                    miss("coref rand: no other phrase")
                j = random_region(linked_to_phrase.get(a, {r}), "coref rand")
                if j is not None:
                    crr.append((j, j + 1))
                else:
                    crr.append((-1, -1))
                    miss("coref rand: no other region")
            for sb, ob, lab in m.get("pairs", {}).get(self.relation_task, []):
                if sb >= nr or ob >= nr:
                    miss("relation: region absent (or cut by max_regions)")
                    continue
                rb.append(b)
                rs.append((sb, sb + 1))
                ro.append((ob, ob + 1))
                rtype.append(str(lab))
                j = random_region({sb, ob}, "relation rand")
                if j is not None:
                    rr.append((j, j + 1))
                else:
                    rr.append((-1, -1))
                    miss("relation rand: no other region")
        batch.update(
            coref_b=torch.tensor(cb, dtype=torch.long), coref_phrase=_t(cph), coref_region=_t(creg),
            coref_type=ctype, coref_rand_phrase=_t(crp), coref_rand_region=_t(crr),
            cmp_pair=torch.tensor(qp, dtype=torch.long), cmp_phrase=_t(qph),
            rel_b=torch.tensor(rb, dtype=torch.long), rel_s=_t(rs), rel_o=_t(ro), rel_type=rtype, rel_rand=_t(rr),
            analysis_missing=missing,
        )
        return batch

    def _near(self, meta: dict, nr: int) -> np.ndarray | None:
        """(nr, nr) bool: regions that overlap at IoU >= ``rand_iou`` (None: no threshold, or no boxes)."""
        boxes = (meta.get("regions") or {}).get("boxes")
        if self.rand_iou is None or boxes is None or nr == 0:
            return None
        bx = np.asarray(boxes, np.float64).reshape(-1, 4)[:nr]
        if len(bx) < nr:
            return None
        return iou_matrix(bx, bx) >= self.rand_iou
