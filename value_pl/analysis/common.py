"""Shared pieces of the training-free analyses: the analysis interface, map lists, row requests."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..backbones.base import BackboneOutput
from ..backbones.capture import CaptureSpec


class Unsupported(Exception):
    """An analysis that does not apply to this backbone (the message says why)."""


@dataclass
class Figure:
    name: str  # file stem: <name>.png
    title: str
    caption: str = ""


class Analysis:
    """One training-free analysis, fed batch by batch (bounded memory: only running sums are kept).

    ``capture(batch)`` says what the backbone must keep for this batch (``None``: skip the batch);
    ``update(out, batch)`` consumes the :class:`BackboneOutput`; ``result()`` returns the JSON-able
    result; ``markdown(res)`` the paper-style table; ``figures(res, rdir)`` writes PNGs.
    """

    name = "base"

    def __init__(self, backbone, cfg):
        self.backbone = backbone
        self.cfg = cfg
        self.missing: dict[str, int] = {}
        self.samples = 0

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.missing[reason] = self.missing.get(reason, 0) + int(n)

    def capture(self, batch: dict) -> CaptureSpec | None:
        raise NotImplementedError

    def update(self, out: BackboneOutput, batch: dict) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError

    def markdown(self, res: dict) -> str:
        raise NotImplementedError

    def figures(self, res: dict, rdir) -> list:
        return []

    def wandb_payload(self, res: dict) -> dict:
        """Extra W&B objects: ``{"tables": {key: (columns, rows)}, "lines": {key: (xs, {series: ys}, xname)}}``."""
        return {}


def head_maps(backbone, pair_kind: str) -> list[tuple[str, str]]:
    """All (a->b, b->a) attention maps of a pair layout, one tuple per attention layer, in layer order.

    phrase_region: a = phrase (text), b = region, so ``[0]`` is T->V and ``[1]`` V->T; single-stream
    models give the joint self-attention twice, LXMERT its cross maps (l2v, v2l). region_region: the
    self-attention maps over the regions (joint, or LXMERT's visual stream incl. the cross layers).
    """
    try:
        layout = backbone.pair_layout(pair_kind)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise Unsupported(f"backbone {getattr(backbone, 'family', '?')} has no {pair_kind} attention layout: {e}")
    allh = [l for l in layout.layers if l.name == "all_heads"]
    maps = allh[0].attn if allh else [m for l in layout.attn_layers() for m in l.attn]
    if not maps:
        raise Unsupported(f"backbone {getattr(backbone, 'family', '?')} exposes no {pair_kind} attention maps")
    return list(maps)


def fusion_layers(backbone) -> list[tuple[int, str, str]]:
    """(layer number, hidden a, hidden b) of the layers where both modalities are present.

    Single-stream: the embeddings (0) and every layer; two-stream: the cross layers (1..X), with the
    language and visual halves of each cross layer taken together.
    """
    try:
        layout = backbone.pair_layout("phrase_region")
    except (NotImplementedError, ValueError, KeyError) as e:
        raise Unsupported(f"backbone {getattr(backbone, 'family', '?')} has no image-text layers: {e}")
    out = []
    for l in layout.emb_layers():
        out.append((int(l.name.split("_")[-1]), l.emb[0], l.emb[1]))
    if not out:
        raise Unsupported("backbone exposes no layers with both modalities")
    return out


def table1_label(layer: int) -> str:
    """A fused layer as the paper's Table 1 numbers it: 0 = the first Transformer layer (UNITER 0-11, LXMERT's
    cross layers 0-4), so our layer ``k`` (``layer_k``, "Layer k" elsewhere) is ``k - 1``; ``emb.`` for the
    embedding output (index 0 here), which Table 1 does not show."""
    return "emb." if int(layer) == 0 else str(int(layer) - 1)


def head_name(layer: int, head: int) -> str:
    """1-based ``layer-head`` as in the paper (``9-12``) from 0-based indices."""
    return f"{layer + 1}-{head + 1}"


def rows_from_spans(b: Tensor, spans: Tensor, B: int) -> Tensor:
    """(P,) sample index + (P, 2) [start, end) spans -> (B, R) sorted unique positions, -1 padded."""
    sets: list[set[int]] = [set() for _ in range(B)]
    for bi, (s, e) in zip(b.tolist(), spans.tolist()):
        if s >= 0 and e > s:
            sets[bi].update(range(s, e))
    R = max((len(s) for s in sets), default=0)
    out = torch.full((B, max(R, 0)), -1, dtype=torch.long)
    for bi, s in enumerate(sets):
        if s:
            out[bi, : len(s)] = torch.tensor(sorted(s), dtype=torch.long)
    return out


def merge_rows(parts: list[Tensor]) -> Tensor:
    """Union of several (B, R_i) row requests (-1 padded) -> (B, R) sorted unique positions, -1 padded."""
    parts = [p for p in parts if p is not None and p.numel()]
    if not parts:
        return None
    allr = torch.cat([p.cpu() for p in parts], 1)
    sets = [sorted(set(r for r in row if r >= 0)) for row in allr.tolist()]
    out = torch.full((allr.shape[0], max(max((len(s) for s in sets), default=0), 1)), -1, dtype=torch.long)
    for b, s in enumerate(sets):
        if s:
            out[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def merge_captures(specs: list[CaptureSpec]) -> CaptureSpec:
    """One capture request serving several analyses: hidden/attn patterns and rows united.

    A map requested without rows by one analysis is captured in full (rows=None) for all.
    """
    hidden = sorted({h for s in specs for h in (s.hidden or [])})
    attn = sorted({a for s in specs for a in (s.attn or [])})
    if any(s.hidden is None for s in specs):
        hidden = None
    full = any(s.attn and s.rows is None for s in specs)
    rows = None
    if not full:
        mods = {m for s in specs if s.rows for m in s.rows}
        rows = {m: merge_rows([s.rows.get(m) for s in specs if s.rows]) for m in mods}
        rows = {m: r for m, r in rows.items() if r is not None} or None
    return CaptureSpec(hidden=hidden, attn=attn, rows=rows)


def captured_positions(out: BackboneOutput, name: str) -> Tensor:
    """(B, R) stream positions of the query rows of map ``name`` (-1 pad), whether rows or full maps."""
    q_stream = out.attn_streams[name][0]
    if q_stream in out.rows:
        return out.rows[q_stream]
    a = out.attn[name]
    B, Nq = a.shape[0], a.shape[2]
    return torch.arange(Nq, device=a.device).expand(B, Nq)


@dataclass
class HeadSums:
    """Running per-group, per-head sums: ``sum[g]`` (L*H,) and counts ``n[g]``."""

    shape: tuple[int, int]
    sums: dict = field(default_factory=dict)
    n: dict = field(default_factory=dict)

    def add(self, group: str, values: Tensor) -> None:
        """values: (P, L*H) rows to add to ``group``."""
        if values.numel() == 0:
            return
        v = values.detach().double().sum(0).cpu()
        self.sums[group] = self.sums.get(group, torch.zeros_like(v)) + v
        self.n[group] = self.n.get(group, 0) + int(values.shape[0])

    def mean(self, group: str) -> Tensor | None:
        if not self.n.get(group):
            return None
        return (self.sums[group] / self.n[group]).view(*self.shape)
