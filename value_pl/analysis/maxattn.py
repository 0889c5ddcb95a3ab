"""Maximum attention between linked tokens: Table 2 (visual coreference), Table 7 (does the selected
head prefer the linked pair?), Table 4 (visual relations), Figs. 7-10 (per-head maps).

For a (phrase, region) pair and a head, the attention between them is the maximum over the phrase's
tokens (VALUE footnote 8; :meth:`BackboneOutput.attention_between`). Every number is a per-head mean
of one type; a table cell is the maximum of that mean over all heads, with the arg-max head as
``layer-head`` (1-based, as the paper's ``9-12``). ``maxattn.average`` says what is averaged: ``pairs``
(the default) = the linked pairs of the type, so a sample with three links counts three times;
``samples`` = first each sample's pairs of the type, then the samples that have one (Table 2's caption
says "averaged across all data samples"). A sample's pairs are all in its batch, so both are
independent of the batch size. Table 7's ratio is a share of pairs either way.

* V->T: the region as query, attending to the phrase (single-stream: the joint self-attention of
  every layer; two-stream: the cross layers' vision->language maps ``attn.cross.x.v2l``).
* T->V: the phrase as query, attending to the region (``attn.cross.x.l2v``).
* V->T (Rand.): the same region against a random other phrase of the sample (not linked to it);
  T->V (Rand.): the same phrase against a random other region (not linked to it). Seeded.
* Table 7: for each type, the head selected by the V->T column; the share of linked pairs for which
  that head gives the region's linked phrase more attention than every other (unlinked) phrase of
  the sample. Pairs whose sample has no other phrase are not counted (reported).
* Table 4: for a ``vrc`` pair (subject, object) the mean of subject->object and object->subject
  (single-stream: joint maps; two-stream: the visual stream's self-attention, layers 1-10); Rand.: the
  subject against a random third region, both directions.
"""
from __future__ import annotations

import numpy as np
import torch

from ..backbones.base import REGION, TEXT
from ..backbones.capture import CaptureSpec
from ..data.schema import COREF_TYPES
from .common import Analysis, Figure, HeadSums, head_maps, head_name, rows_from_spans
from .fusion import _missing_md


#: ``maxattn.average``: what the per-head mean of Tables 2 and 4 is over
AVERAGES = ("pairs", "samples")


def averaging(cfg) -> str:
    """``cfg.maxattn.average`` (``pairs`` when unset), checked."""
    m = cfg.get("maxattn") if cfg is not None else None
    v = str((m.get("average") if m is not None else None) or "pairs")
    if v not in AVERAGES:
        raise ValueError(f"maxattn.average={v!r}: use one of {', '.join(AVERAGES)} (pairs = the mean over linked pairs, "
                         f"samples = the mean over samples of each sample's mean over its pairs)")
    return v


def per_sample_mean(values: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(P, K) rows of pairs and (P,) their samples (batch index) -> (S, K): each sample's mean over its rows, one
    row per sample present (float64)."""
    uniq, inv = torch.unique(b, return_inverse=True)
    sums = torch.zeros(len(uniq), values.shape[1], dtype=torch.float64, device=values.device)
    sums.index_add_(0, inv, values.double())
    return sums / torch.bincount(inv, minlength=len(uniq)).to(sums)[:, None]


class _Means:
    """Per-type, per-head running means of one analysis, over pairs or over samples (:func:`averaging`), with
    the number of pairs and of samples of each type."""

    def __init__(self, shape, keys, average: str):
        self.average = average
        self.acc = {k: HeadSums(shape) for k in keys}
        self.pairs: dict[str, int] = {}
        self.samples: dict[str, int] = {}

    def count(self, t: str, b: torch.Tensor) -> None:
        self.pairs[t] = self.pairs.get(t, 0) + int(b.numel())
        self.samples[t] = self.samples.get(t, 0) + int(torch.unique(b).numel())

    def add(self, key: str, t: str, values: torch.Tensor, b: torch.Tensor) -> None:
        if values.shape[0]:
            self.acc[key].add(t, per_sample_mean(values, b) if self.average == "samples" else values)

    def mean(self, key: str, t: str):
        return self.acc[key].mean(t)


def _between(out, maps: list[str], b, qm, qs, km, ks) -> torch.Tensor:
    """(P, L*H) attention of every head of ``maps`` from query spans to key spans."""
    return torch.cat([out.attention_between(m, b, qm, qs, km, ks) for m in maps], 1)


def _best(mean: torch.Tensor | None) -> dict | None:
    if mean is None:
        return None
    flat = mean.flatten()
    i = int(flat.argmax())
    L, H = mean.shape
    return {"value": float(flat[i]), "head": head_name(i // H, i % H)}


def _cell(d, bold=False) -> str:
    if d is None:
        return "–"
    s = f"{d['value']:.3f} ({d['head']})"
    return f"**{s}**" if bold else s


def _over(res: dict) -> str:
    """What a result's means are over, in words."""
    if (res.get("maxattn") or {}).get("average") == "samples":
        return "over samples of each sample's mean over its pairs"
    return "over pairs"


def _order(types, known=()) -> list[str]:
    first = [t for t in known if t in types]
    return first + sorted(t for t in types if t not in first)


class Coref(Analysis):
    name = "coref"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        maps = head_maps(backbone, "phrase_region")
        self.tv_maps = [a for a, _ in maps]
        self.vt_maps = [b for _, b in maps]
        self.shape = (len(maps), backbone.num_heads)
        self.average = averaging(cfg)
        self.acc = _Means(self.shape, ("vt", "tv", "vt_rand", "tv_rand"), self.average)
        self.wins = HeadSums(self.shape)  # Table 7: 1 where linked > every other phrase (a share of pairs)

    def capture(self, batch):
        if batch["coref_b"].numel() == 0:
            return None
        B = batch["input_ids"].shape[0]
        b = batch["coref_b"]
        return CaptureSpec(hidden=[], attn=sorted(set(self.tv_maps + self.vt_maps)),
                           rows={TEXT: rows_from_spans(b, batch["coref_phrase"], B),
                                 REGION: rows_from_spans(b, batch["coref_region"], B)})

    def update(self, out, batch):
        b, ph, rg = batch["coref_b"], batch["coref_phrase"], batch["coref_region"]
        types = batch["coref_type"]
        P = b.numel()
        if P == 0:
            return
        vt = _between(out, self.vt_maps, b, REGION, rg, TEXT, ph)
        tv = _between(out, self.tv_maps, b, TEXT, ph, REGION, rg)
        rp, rr = batch["coref_rand_phrase"], batch["coref_rand_region"]
        okp, okr = rp[:, 0] >= 0, rr[:, 0] >= 0
        vt_r = torch.full_like(vt, float("nan"))
        tv_r = torch.full_like(tv, float("nan"))
        if bool(okp.any()):
            vt_r[okp] = _between(out, self.vt_maps, b[okp], REGION, rg[okp], TEXT, rp[okp])
        if bool(okr.any()):
            tv_r[okr] = _between(out, self.tv_maps, b[okr], TEXT, ph[okr], REGION, rr[okr])
        # Table 7 competitors: the region against every other phrase of its sample
        qi = batch["cmp_pair"]
        other = torch.full_like(vt, float("-inf"))
        if qi.numel():
            q = _between(out, self.vt_maps, b[qi], REGION, rg[qi], TEXT, batch["cmp_phrase"])
            other = other.scatter_reduce(0, qi[:, None].expand_as(q), q, reduce="amax")
        has_cmp = torch.isfinite(other[:, 0])
        win = (vt > other).to(vt.dtype)
        self.count("coref table 7: no other phrase in the sample", int((~has_cmp).sum()))
        for t in set(types):
            idx = torch.tensor([i for i, x in enumerate(types) if x == t], device=vt.device)
            bt = b[idx]
            self.acc.count(t, bt)
            self.acc.add("vt", t, vt[idx], bt)
            self.acc.add("tv", t, tv[idx], bt)
            self.acc.add("vt_rand", t, vt_r[idx][okp[idx]], bt[okp[idx]])
            self.acc.add("tv_rand", t, tv_r[idx][okr[idx]], bt[okr[idx]])
            self.wins.add(t, win[idx][has_cmp[idx]])
        self.samples += P

    def result(self):
        rows = []
        for t in _order(self.acc.pairs, COREF_TYPES):
            vt_mean = self.acc.mean("vt", t)
            sel = _best(vt_mean)
            r = {"type": t, "pairs": self.acc.pairs[t], "samples": self.acc.samples[t],
                 "vt": sel, "tv": _best(self.acc.mean("tv", t)),
                 "vt_rand": _best(self.acc.mean("vt_rand", t)), "tv_rand": _best(self.acc.mean("tv_rand", t)),
                 "vt_heads": vt_mean.tolist(), "tv_heads": self.acc.mean("tv", t).tolist()}
            w = self.wins.mean(t)
            if w is not None:
                L, H = self.shape
                l, h = (int(x) - 1 for x in sel["head"].split("-"))
                r["table7"] = {"head": sel["head"], "ratio": float(w[l, h]), "pairs": self.wins.n[t]}
            else:
                r["table7"] = None
            rows.append(r)
        return {"analysis": "coref", "kind": self.backbone.kind, "pairs": self.samples,
                "maxattn": {"average": self.average},
                "maps": {"v2t": self.vt_maps, "t2v": self.tv_maps}, "types": rows, "missing": dict(self.missing)}

    def markdown(self, res):
        ss = "single-stream" if res["kind"] == "single" else "two-stream"
        lines = ["## Visual coreference: maximum attention between linked tokens (Table 2)", "",
                 f"*Results on the {ss} model* ({res['pairs']} linked pairs). Each cell: the maximum over heads "
                 f"of the mean ({_over(res)}) maximum attention between the linked tokens, with the head as "
                 "layer-head.",
                 "", "| Coref Type | V→T | T→V | V→T (Rand.) | T→V (Rand.) | pairs |", "|---|---|---|---|---|---:|"]
        for r in res["types"]:
            bv = r["vt"] and r["tv"] and r["vt"]["value"] >= r["tv"]["value"]
            lines.append(f"| {r['type']} | {_cell(r['vt'], bv)} | {_cell(r['tv'], not bv)} | {_cell(r['vt_rand'])} "
                         f"| {_cell(r['tv_rand'])} | {r['pairs']} |")
        t7 = [r for r in res["types"] if r.get("table7")]
        lines += ["", "## Does the selected head prefer the linked pair? (Table 7)", "",
                  "Share of linked pairs for which the type's V→T head gives the linked phrase more attention than "
                  "every other phrase of the sample.", "",
                  "| Coref Type | " + " | ".join(r["type"] for r in t7) + " |", "|---|" + "---:|" * len(t7),
                  "| Ratio | " + " | ".join(f"{r['table7']['ratio']:.2f}" for r in t7) + " |",
                  "| head | " + " | ".join(r["table7"]["head"] for r in t7) + " |",
                  "", "![V->T attention per head](coref_v2t_heads.png)"]
        return "\n".join(lines) + "\n" + _missing_md(res)

    def figures(self, res, rdir):
        from .figures import heatmaps

        if not res["types"]:
            return []
        heatmaps(rdir / "coref_v2t_heads.png", {r["type"]: np.array(r["vt_heads"]) for r in res["types"]},
                 "Coreference V→T: mean max attention per head (Figs. 7/8)")
        return [Figure("coref_v2t_heads", "V->T attention per head and coreference type (Figs. 7/8)")]

    def wandb_payload(self, res):
        cols = ["type", "v2t", "v2t_head", "t2v", "t2v_head", "v2t_rand", "t2v_rand", "table7_ratio", "pairs"]
        g = lambda d, k: (d or {}).get(k)
        rows = [[r["type"], g(r["vt"], "value"), g(r["vt"], "head"), g(r["tv"], "value"), g(r["tv"], "head"),
                 g(r["vt_rand"], "value"), g(r["tv_rand"], "value"), g(r.get("table7"), "ratio"), r["pairs"]]
                for r in res["types"]]
        return {"tables": {"coref/table2": (cols, rows)}}


class Relation(Analysis):
    name = "relation"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        maps = head_maps(backbone, "region_region")
        self.ab = [a for a, _ in maps]
        self.ba = [b for _, b in maps]
        self.shape = (len(maps), backbone.num_heads)
        self.average = averaging(cfg)
        self.acc = _Means(self.shape, ("rel", "rand"), self.average)

    def capture(self, batch):
        if batch["rel_b"].numel() == 0:
            return None
        B = batch["input_ids"].shape[0]
        b = batch["rel_b"]
        spans = torch.cat([batch["rel_s"], batch["rel_o"], batch["rel_rand"]], 0)
        return CaptureSpec(hidden=[], attn=sorted(set(self.ab + self.ba)),
                           rows={REGION: rows_from_spans(torch.cat([b, b, b]), spans, B)})

    def update(self, out, batch):
        b, s, o, rnd = batch["rel_b"], batch["rel_s"], batch["rel_o"], batch["rel_rand"]
        types = batch["rel_type"]
        if b.numel() == 0:
            return
        val = 0.5 * (_between(out, self.ab, b, REGION, s, REGION, o) + _between(out, self.ba, b, REGION, o, REGION, s))
        ok = rnd[:, 0] >= 0
        rv = torch.full_like(val, float("nan"))
        if bool(ok.any()):
            rv[ok] = 0.5 * (_between(out, self.ab, b[ok], REGION, s[ok], REGION, rnd[ok])
                            + _between(out, self.ba, b[ok], REGION, rnd[ok], REGION, s[ok]))
        for t in set(types):
            idx = torch.tensor([i for i, x in enumerate(types) if x == t], device=val.device)
            bt = b[idx]
            self.acc.count(t, bt)
            self.acc.add("rel", t, val[idx], bt)
            self.acc.add("rand", t, rv[idx][ok[idx]], bt[ok[idx]])
        self.samples += b.numel()

    def result(self):
        n = self.acc.pairs
        rows = [{"type": t, "pairs": n[t], "samples": self.acc.samples[t], "max": _best(self.acc.mean("rel", t)),
                 "rand": _best(self.acc.mean("rand", t)), "heads": self.acc.mean("rel", t).tolist()}
                for t in sorted(n, key=lambda t: (-n[t], t))]
        return {"analysis": "relation", "kind": self.backbone.kind, "pairs": self.samples,
                "maxattn": {"average": self.average}, "maps": self.ab, "types": rows, "missing": dict(self.missing)}

    def markdown(self, res):
        k = "SS" if res["kind"] == "single" else "TS"
        lines = ["## Visual relations: maximum attention between related regions (Table 4)", "",
                 f"{res['pairs']} subject-object pairs; mean of both directions, then {_over(res)}; {k}: "
                 + ("single-stream" if k == "SS" else "two-stream") + ".", "",
                 f"| Relation Type | {k} | {k} (Rand.) | pairs |", "|---|---|---|---:|"]
        lines += [f"| {r['type']} | {_cell(r['max'], True)} | {_cell(r['rand'])} | {r['pairs']} |" for r in res["types"]]
        lines += ["", "![relation attention per head](relation_heads.png)"]
        return "\n".join(lines) + "\n" + _missing_md(res)

    def figures(self, res, rdir):
        from .figures import heatmaps

        if not res["types"]:
            return []
        heatmaps(rdir / "relation_heads.png", {r["type"]: np.array(r["heads"]) for r in res["types"]},
                 "Relations: mean max attention per head (Figs. 9/10)")
        return [Figure("relation_heads", "attention between related regions per head (Figs. 9/10)")]

    def wandb_payload(self, res):
        g = lambda d, k: (d or {}).get(k)
        rows = [[r["type"], g(r["max"], "value"), g(r["max"], "head"), g(r["rand"], "value"), g(r["rand"], "head"),
                 r["pairs"]] for r in res["types"]]
        return {"tables": {"relation/table4": (["type", "max", "head", "rand", "rand_head", "pairs"], rows)}}
