"""From one frozen forward to the inputs of every selected prober head, stacked per head group.

Everything here reads only :class:`~value_pl.backbones.base.BackboneOutput` and the pair indices the
collator computed on the CPU (``a_pos``/``b_pos``, ``rows``, ``a_slot``/``b_slot``), so the step has no
host synchronisation and no Python loop per layer or per pair: the hidden states of the probed layers are
stacked once and every pair of every layer is gathered by one indexing op; the attention rows of all maps
likewise. Heads of one class and size form a *group* (``emb``, ``raw``, ``boxes``, ``attn``, ``attn_x<L>`` for
the all-heads prober over L maps, ``sent``) whose inputs are ``(n heads, P, ...)`` tensors.

Two pseudo-layers need no forward: ``raw`` (the detector's region features, region-region tasks) and ``boxes``
(the geometry-only control: each region's :data:`~value_pl.data.collate.GEOMETRY`, read from the batch's encoded
boxes; a phrase side has no geometry and is the constant alone, so on phrase-region tasks the Eq. 4 head is a linear
map of the region's geometry).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..backbones.base import REGION, TEXT, BackboneOutput, LayerSpec, PairLayout
from ..backbones.capture import CaptureSpec, row_offset
from ..data.collate import box_geometry

SIDE_MODALITIES = {"phrase_region": (TEXT, REGION), "region_region": (REGION, REGION)}
#: the pseudo-layers: names ``layers=`` accepts beside a backbone's layers (no backbone layer is called so)
PSEUDO_LAYERS = ("raw", "boxes")


@dataclass
class HeadGroup:
    """Heads of one kind and input size, fed by stacked inputs (slot ``i`` = ``keys[i]``)."""

    name: str
    kind: str  # emb | raw | boxes | attn | sent
    keys: list[str]
    emb: tuple[list[str], list[str]] | None = None  # emb: hidden names of side a / side b per slot
    maps: list[list[int]] = field(default_factory=list)  # attn: per slot, indices into the plan's map lists
    sent: list[str] | None = None  # sent: hidden names per slot

    def map_index(self, device) -> Tensor:
        cache = self.__dict__.setdefault("_idx", {})
        if device not in cache:  # made once per device: no host-to-device copy in the step
            cache[device] = torch.tensor(self.maps, dtype=torch.long, device=device)
        return cache[device]


def _stack_hidden(out: BackboneOutput, names: list[str]) -> tuple[Tensor, str]:
    streams = {n.split(".")[1] for n in names}
    if len(streams) != 1:
        raise ValueError(f"hidden states {names} span streams {sorted(streams)}")
    return torch.stack([out.hidden[n] for n in names]), streams.pop()


def pair_embeddings(out: BackboneOutput, names: list[str], modality: str, b: Tensor, pos: Tensor,
                    valid: Tensor) -> Tensor:
    """Mean hidden state over each pair side's tokens, for every layer in ``names``: ``(L, P, D)``."""
    hs, stream = _stack_hidden(out, names)
    g = hs[:, b[:, None], pos + out.streams[stream].offset(modality)]  # (L, P, S, D)
    if g.shape[2] == 1:
        return g[:, :, 0]
    w = valid.to(g.dtype)[None, :, :, None]
    return (g * w).sum(2) / w.sum(2).clamp(min=1.0)


def pair_attention(out: BackboneOutput, names: list[str], batch: dict, q: str, k: str,
                   rows: dict[str, Tensor] | None, stacked: dict | None = None, merged: bool = False) -> Tensor:
    """Max attention weight from side ``q``'s tokens to side ``k``'s, per map and head: ``(M, P, H)``.
    ``stacked`` (optional) keeps the stacked maps for a second call over the same maps (the other direction of
    a single-stream model's self-attention). Captured rows are found by the collator's slots, which index the
    batch's own row request (``rows``); ``merged``: the rows were captured for a request merged with others
    (:func:`value_pl.analysis.common.merge_captures`), so each query token's row is looked up by its position."""
    q_stream, k_stream = out.attn_streams[names[0]]
    if any(out.attn_streams[n] != (q_stream, k_stream) for n in names):
        raise ValueError(f"attention maps {names} do not share their query/key streams")
    mods = dict(zip("ab", batch["pair_modalities"]))
    key = tuple(names)
    A = stacked.get(key) if stacked is not None else None
    if A is None:
        A = torch.stack([out.attn[n] for n in names])  # (M, B, H, Rq, Nk)
        if stacked is not None:
            stacked[key] = A
    if q_stream in out.rows and merged:  # rows of a merged request: each query token's row by its position
        pos = batch[f"{q}_pos"] + out.streams[q_stream].offset(mods[q])
        qi = out.row_columns(q_stream)[batch["pair_b"][:, None], pos]
        if bool(((qi < 0) & batch[f"{q}_valid"]).any()):
            raise KeyError(f"{names[0]}: a pair's query token has no captured attention row")
        qi = qi.clamp(min=0)
    elif q_stream in out.rows:  # rows captured: the collator's slot of each query token
        qi = batch[f"{q}_slot"] + row_offset(rows, out.streams[q_stream], mods[q])
    else:  # full maps
        qi = batch[f"{q}_pos"] + out.streams[q_stream].offset(mods[q])
    ki = batch[f"{k}_pos"] + out.streams[k_stream].offset(mods[k])
    g = A[:, batch["pair_b"][:, None, None], :, qi[:, :, None], ki[:, None, :]]  # (P, Sq, Sk, M, H)
    if g.shape[1] * g.shape[2] == 1:
        return g[:, 0, 0].transpose(0, 1)
    ok = batch[f"{q}_valid"][:, :, None] & batch[f"{k}_valid"][:, None, :]
    g = g.masked_fill(~ok[..., None, None], float("-inf"))
    return g.amax(dim=(1, 2)).transpose(0, 1)


@dataclass
class PairPlan:
    """Which layers/heads to feed, what to capture for them, and how their inputs are stacked."""

    pair_kind: str
    emb_layers: list[LayerSpec]
    attn_layers: list[LayerSpec]
    raw: bool = False  # baseline head "emb:raw" on the raw region features (VALUE Fig. 4 dashed line)
    boxes: bool = False  # control head "emb:boxes" on the regions' box geometry alone (GEOMETRY)

    @classmethod
    def make(cls, layout: PairLayout, pair_kind: str, prober: str, select: list[str] | None,
             raw: bool = False, boxes: bool = False) -> "PairPlan":
        def keep(l: LayerSpec) -> bool:
            return select is None or l.name in select

        if select is not None:  # a name that is no layer of this backbone is a typo or another model's layer
            known = [l.name for l in layout.layers] + list(PSEUDO_LAYERS)
            unknown = [n for n in select if n not in known]
            if unknown:
                raise ValueError(f"layers={list(select)}: {unknown} are not layers of this backbone for "
                                 f"{pair_kind} tasks; available: {known}")

        emb = [l for l in layout.emb_layers() if keep(l)] if prober in ("layer_emb", "both") else []
        att = [l for l in layout.attn_layers() if keep(l)] if prober in ("attention", "both") else []
        # "original visual embedding": the detector's region features themselves, region-region tasks only
        raw = (pair_kind == "region_region" and prober in ("layer_emb", "both")
               and (raw or (select is not None and "raw" in select)))
        # the geometry-only control: the regions' boxes alone (phrase-region: the region's), any pair task
        boxes = prober in ("layer_emb", "both") and (boxes or (select is not None and "boxes" in select))
        if (raw or boxes) and not emb and not att:
            return cls(pair_kind, [], [], raw, boxes)
        if not emb and not att:
            avail = [l.name for l in (layout.emb_layers() if prober == "layer_emb" else layout.attn_layers())]
            raise ValueError(f"no layer selected for prober={prober}; available: {avail}")
        return cls(pair_kind, emb, att, raw, boxes)

    # ------------------------------------------------------------------ groups
    def __post_init__(self):
        self.maps_ab: list[str] = []
        self.maps_ba: list[str] = []
        for l in self.attn_layers:
            for ab, ba in l.attn:
                if ab not in self.maps_ab:
                    self.maps_ab.append(ab)
                    self.maps_ba.append(ba)
        self.groups: list[HeadGroup] = []
        if self.emb_layers:
            self.groups.append(HeadGroup("emb", "emb", ["emb:" + l.name for l in self.emb_layers],
                                         emb=([l.emb[0] for l in self.emb_layers], [l.emb[1] for l in self.emb_layers])))
        if self.raw:
            self.groups.append(HeadGroup("raw", "raw", ["emb:raw"]))
        if self.boxes:
            self.groups.append(HeadGroup("boxes", "boxes", ["emb:boxes"]))
        by_width: dict[int, HeadGroup] = {}
        for l in self.attn_layers:
            n = len(l.attn)
            g = by_width.get(n)
            if g is None:
                g = by_width[n] = HeadGroup("attn" if n == 1 else f"attn_x{n}", "attn", [])
                self.groups.append(g)
            g.keys.append("attn:" + l.name)
            g.maps.append([self.maps_ab.index(ab) for ab, _ in l.attn])

    @property
    def needs_forward(self) -> bool:
        """False for a plan of pseudo-layers only (``raw``, ``boxes``): their inputs are in the batch."""
        return bool(self.emb_layers or self.attn_layers)

    @property
    def head_keys(self) -> list[str]:
        return [k for g in self.groups for k in g.keys]

    # ----------------------------------------------------------------- capture
    def capture(self, batch: dict) -> CaptureSpec:
        hidden = sorted({n for l in self.emb_layers for n in l.emb})
        attn = sorted(set(self.maps_ab) | set(self.maps_ba))
        rows = None
        if attn:  # the collator listed the rows every pair needs (no GPU work to find them)
            rows = {m: batch["rows"][m] for m in (TEXT, REGION) if m in batch["rows"]}
        return CaptureSpec(hidden=hidden, attn=attn, rows=rows)

    # ------------------------------------------------------------------ inputs
    def inputs(self, out: BackboneOutput, batch: dict, spec: CaptureSpec | None = None,
               merged: bool = False) -> dict[str, tuple]:
        """group name -> stacked inputs: ``(e_a, e_b)`` ``(n, P, D)`` for emb/raw, ``(a_ij, a_ji)`` ``(n, P, H*m)``
        for attn groups. ``out`` answers :meth:`capture`'s request (``spec``: as the forward padded it), or, with
        ``merged``, a request merged with others' (the probe suite: one forward for every probe and analysis)."""
        ma, mb = SIDE_MODALITIES[self.pair_kind]
        b = batch["pair_b"]
        res: dict[str, tuple] = {}
        ab = ba = None
        if self.maps_ab:
            rows = (spec.rows if spec is not None else None) or self.capture(batch).rows
            stacked: dict = {}
            ab = pair_attention(out, self.maps_ab, batch, "a", "b", rows, stacked, merged)  # (M, P, H)
            ba = pair_attention(out, self.maps_ba, batch, "b", "a", rows, stacked, merged)
        for g in self.groups:
            if g.kind == "emb":
                res[g.name] = (pair_embeddings(out, g.emb[0], ma, b, batch["a_pos"], batch["a_valid"]).float(),
                               pair_embeddings(out, g.emb[1], mb, b, batch["b_pos"], batch["b_valid"]).float())
            elif g.kind == "raw":
                rf = batch["region_feats"]
                res[g.name] = (rf[b, batch["a_pos"][:, 0]].float()[None], rf[b, batch["b_pos"][:, 0]].float()[None])
            elif g.kind == "boxes":
                res[g.name] = pair_geometry(batch, self.pair_kind)
            else:
                idx = g.map_index(ab.device)  # (n, m)
                n, m = idx.shape

                def take(x):  # (M, P, H) -> (n, P, m*H), maps of a head side by side
                    t = x[idx.reshape(-1)].reshape(n, m, x.shape[1], x.shape[2])
                    return t.permute(0, 2, 1, 3).reshape(n, x.shape[1], m * x.shape[2]).float()

                res[g.name] = (take(ab), take(ba))
        return res


def pair_geometry(batch: dict, pair_kind: str) -> tuple[Tensor, Tensor]:
    """The ``boxes`` control's inputs ``(1, P, 8)`` per side: each region's :data:`GEOMETRY`; the phrase side of a
    phrase-region pair is the constant alone (``[1, 0, ..., 0]``), so Eq. 4 reduces to a linear map of the
    region's geometry."""
    geo = box_geometry(batch["region_boxes"])  # (B, R, 8), the same for every box mode
    b = batch["pair_b"]
    e_b = geo[b, batch["b_pos"][:, 0]]
    if pair_kind == "region_region":
        e_a = geo[b, batch["a_pos"][:, 0]]
    else:
        e_a = torch.zeros_like(e_b)
        e_a[:, 0] = 1.0
    return e_a[None], e_b[None]


def sentence_groups(names: list[str]) -> list[HeadGroup]:
    return [HeadGroup("sent", "sent", ["sent:" + n for n in names], sent=list(names))]


def sentence_inputs(out: BackboneOutput, names: list[str]) -> Tensor:
    """Per layer, the mean hidden state over the sentence's word tokens ([CLS]/[SEP] and padding excluded):
    ``(L, B, D)``."""
    tm = out.text_mask.bool() & ~out.special_mask.bool()
    hs, stream = _stack_hidden(out, names)
    off = out.streams[stream].offset(TEXT)
    h = hs[:, :, off:off + tm.shape[1]].float()
    w = tm.to(h.dtype)[None, ..., None]
    return (h * w).sum(2) / w.sum(2).clamp(min=1.0)
