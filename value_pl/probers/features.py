"""From one frozen forward to the inputs of every selected prober head.

Everything here reads only :class:`~value_pl.backbones.base.BackboneOutput`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.base import REGION, TEXT, BackboneOutput, CaptureSpec, LayerSpec, PairLayout

SIDE_MODALITIES = {"phrase_region": (TEXT, REGION), "region_region": (REGION, REGION)}


def pack_rows(mask: Tensor) -> Tensor:
    """(B, N) bool -> (B, R) indices of the True entries, -1 padded (R = max count, at least 1)."""
    B, N = mask.shape
    ar = torch.arange(N, device=mask.device).expand(B, N)
    vals = torch.where(mask, ar, ar + N).sort(1).values
    R = max(int(mask.sum(1).max().item()) if B else 0, 1)
    vals = vals[:, :R]
    return torch.where(vals < N, vals, torch.full_like(vals, -1))


def span_mask(b: Tensor, span: Tensor, B: int, N: int) -> Tensor:
    m = torch.zeros(B, N, dtype=torch.bool, device=span.device)
    if span.numel() == 0:
        return m
    L = int((span[:, 1] - span[:, 0]).max().item())
    ar = torch.arange(max(L, 1), device=span.device)
    pos = span[:, :1] + ar[None]
    ok = pos < span[:, 1:2]
    m[b[:, None].expand_as(pos)[ok], pos[ok]] = True
    return m


@dataclass
class PairPlan:
    """Which layers/heads to feed, and what to capture for them."""

    pair_kind: str
    emb_layers: list[LayerSpec]
    attn_layers: list[LayerSpec]
    raw: bool = False  # baseline head "emb:raw" on the raw region features (VALUE Fig. 4 dashed line)

    @classmethod
    def make(cls, layout: PairLayout, pair_kind: str, prober: str, select: list[str] | None,
             raw: bool = False) -> "PairPlan":
        def keep(l: LayerSpec) -> bool:
            return select is None or l.name in select

        emb = [l for l in layout.emb_layers() if keep(l)] if prober in ("layer_emb", "both") else []
        att = [l for l in layout.attn_layers() if keep(l)] if prober in ("attention", "both") else []
        # "original visual embedding": the detector's region features themselves, region-region tasks only
        raw = (pair_kind == "region_region" and prober in ("layer_emb", "both")
               and (raw or (select is not None and "raw" in select)))
        if raw and not emb and not att:
            return cls(pair_kind, [], [], True)
        if not emb and not att:
            avail = [l.name for l in (layout.emb_layers() if prober == "layer_emb" else layout.attn_layers())]
            raise ValueError(f"no layer selected for prober={prober}; available: {avail}")
        return cls(pair_kind, emb, att, raw)

    def capture(self, batch: dict) -> CaptureSpec:
        hidden = sorted({n for l in self.emb_layers for n in l.emb})
        attn = sorted({n for l in self.attn_layers for pair in l.attn for n in pair})
        rows = None
        if attn:
            B, T = batch["input_ids"].shape
            R = batch["region_mask"].shape[1]
            ma, mb = SIDE_MODALITIES[self.pair_kind]
            need = {TEXT: torch.zeros(B, T, dtype=torch.bool, device=batch["input_ids"].device),
                    REGION: torch.zeros(B, R, dtype=torch.bool, device=batch["input_ids"].device)}
            pb = batch["pair_b"]
            need[ma] |= span_mask(pb, batch["a_span"], B, need[ma].shape[1])
            need[mb] |= span_mask(pb, batch["b_span"], B, need[mb].shape[1])
            rows = {m: pack_rows(v) for m, v in need.items() if v.shape[1] > 0}
        return CaptureSpec(hidden=hidden, attn=attn, rows=rows)

    def features(self, out: BackboneOutput, batch: dict) -> dict[str, tuple[Tensor, Tensor]]:
        """name -> (side-a input, side-b input): embeddings for emb heads, (a_ij, a_ji) per head for attn heads."""
        ma, mb = SIDE_MODALITIES[self.pair_kind]
        b, sa, sb = batch["pair_b"], batch["a_span"], batch["b_span"]
        feats: dict[str, tuple[Tensor, Tensor]] = {}
        for l in self.emb_layers:
            feats["emb:" + l.name] = (out.embed(l.emb[0], b, ma, sa).float(), out.embed(l.emb[1], b, mb, sb).float())
        if self.raw:
            rf = batch["region_feats"]
            feats["emb:raw"] = (rf[b, sa[:, 0]].float(), rf[b, sb[:, 0]].float())
        for l in self.attn_layers:
            fw = [out.attention_between(ab, b, ma, sa, mb, sb) for ab, _ in l.attn]
            bw = [out.attention_between(ba, b, mb, sb, ma, sa) for _, ba in l.attn]
            feats["attn:" + l.name] = (torch.cat(fw, -1).float(), torch.cat(bw, -1).float())
        return feats


def sentence_features(out: BackboneOutput, names: list[str]) -> dict[str, Tensor]:
    """Per layer, the mean hidden state over the sentence's word tokens ([CLS]/[SEP] and padding excluded)."""
    tm = out.text_mask.bool() & ~out.special_mask.bool()
    feats = {}
    for n in names:
        stream = n.split(".")[1]
        off = out.streams[stream].offset(TEXT)
        h = out.hidden[n][:, off : off + tm.shape[1]].float()
        w = tm.to(h.dtype)[..., None]
        feats["sent:" + n] = (h * w).sum(1) / w.sum(1).clamp(min=1.0)
    return feats
