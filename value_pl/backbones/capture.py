"""Capture by request: what a caller wants kept from a forward pass, and the attention rows computed from a layer's
own queries and keys (so the forward itself keeps sdpa / flash attention).

A :class:`CaptureSpec` says which hidden states and attention maps to keep (``fnmatch`` patterns over the
canonical names of :mod:`value_pl.backbones.base`) and, optionally, which query rows. With rows requested, an
attention map is stored as ``(B, H, R, N_k)`` with the rows listed in ``BackboneOutput.rows`` -- the full
``N x N`` map is never materialised.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import TEXT, StreamInfo


@dataclass
class CaptureSpec:
    """What the caller wants kept from a forward pass.

    hidden / attn: lists of fnmatch patterns over canonical names (``None`` = everything, ``[]`` = nothing).
    rows: ``{modality: LongTensor (B, R)}`` of query indices *within the modality* (text token
    index or region index), ``-1`` for padding. ``None`` keeps full maps.
    full_forward: run every layer even past the last one anything was asked of (backbones otherwise
    stop early: a probe of layer 3 does not pay for layers 4-12). Benchmarks of the bare forward set it.
    """

    hidden: Sequence[str] | None = None
    attn: Sequence[str] | None = ()
    rows: dict[str, Tensor] | None = None
    full_forward: bool = False

    def wants_hidden(self, name: str) -> bool:
        return _wants(self.hidden, name)

    def wants_attn(self, name: str) -> bool:
        return _wants(self.attn, name)

    @classmethod
    def everything(cls) -> "CaptureSpec":
        return cls(hidden=None, attn=None, rows=None)


def _wants(patterns, name: str) -> bool:
    """``name`` matches one of ``patterns`` (None = all); exact names by set lookup, the rest by fnmatch."""
    if patterns is None:
        return True
    if not isinstance(patterns, (list, tuple, set, frozenset)):
        patterns = list(patterns)
    if name in patterns:
        return True
    return any(fnmatch.fnmatchcase(name, p) for p in patterns if any(c in p for c in "*?["))


def rows_for_stream(spec_rows: dict[str, Tensor] | None, info: StreamInfo) -> Tensor | None:
    """Translate modality-level row requests into positions of one stream (B, R), -1 padded."""
    if spec_rows is None:
        return None
    parts = []
    for modality, idx in spec_rows.items():
        off = info.text_offset if modality == TEXT else info.region_offset
        if off is None or idx.numel() == 0:
            continue
        parts.append(torch.where(idx >= 0, idx + off, torch.full_like(idx, -1)))
    if not parts:
        return None
    return torch.cat(parts, dim=1)


def row_offset(spec_rows: dict[str, Tensor], info: StreamInfo, modality: str) -> int:
    """Column where ``modality``'s requested rows start among one stream's captured rows (the order of
    :func:`rows_for_stream`): callers that know a query's slot within its modality's request find its row."""
    off = 0
    for m, idx in spec_rows.items():
        if m == modality:
            return off
        if (info.text_offset if m == TEXT else info.region_offset) is not None and idx.numel() > 0:
            off += idx.shape[1]
    raise KeyError(f"no {modality} rows were requested")


class RowSoftmax:
    """Attention rows from projected queries and keys, with what every layer of a stream shares -- the key bias,
    the row index and the row mask -- prepared once per forward, so a layer costs a handful of ops (gather,
    casts, one batched matmul, scale + bias, softmax, mask): the row capture adds host work per layer, and on a
    GPU host work is what a step costs (docs/performance.md).

    key_bias: (B, Nk) additive mask (0 keep, large negative drop); rows: (B, R) query positions (-1 pad) or None
    for all. :meth:`probs` returns (B, H, R or Nq, Nk) in float32, computed in float32 also under autocast.
    Padding keys get 0 in every row (a row whose keys are all padding, e.g. LXMERT's attention to a sample
    without regions, is uniform, as in the model). With ``rows``, the ``-1`` (padding) rows come back as zeros; with
    ``rows=None`` every query row is kept as the model computes it, padding query positions included (a softmax
    over the real keys, as transformers' ``output_attentions`` returns them): mask those rows with the query
    stream's mask.
    """

    def __init__(self, key_bias: Tensor, rows: Tensor | None, num_heads: int):
        self.num_heads = int(num_heads)
        self.key_bias = key_bias.float()
        self.rows = rows
        self._index: Tensor | None = None
        self._bias: Tensor | None = None
        if rows is not None:
            self.valid = (rows >= 0).float()[:, None, :, None]  # (B, 1, R, 1)

    def probs(self, q: Tensor, k: Tensor) -> Tensor:
        B, _, hd = q.shape
        H = self.num_heads
        dh = hd // H
        with torch.autocast(q.device.type, enabled=False):
            if self.rows is not None:
                if self._index is None or self._index.shape[-1] != hd:
                    self._index = self.rows.clamp(min=0)[..., None].expand(-1, -1, hd)
                q = torch.gather(q, 1, self._index)
            R, Nk = q.shape[1], k.shape[1]
            if self._bias is None:  # (B*H, 1, Nk): one batch entry per (sample, head), as baddbmm wants it
                self._bias = self.key_bias[:, None, None, :].expand(B, H, 1, Nk).reshape(B * H, 1, Nk)
            # float32 copies laid out (B, H, ., .) so that (sample, head) is one batch dimension: no further copies
            qh = torch.empty((B, H, R, dh), dtype=torch.float32, device=q.device)
            qh.copy_(q.view(B, R, H, dh).transpose(1, 2))
            kh = torch.empty((B, H, dh, Nk), dtype=torch.float32, device=k.device)
            kh.copy_(k.view(B, Nk, H, dh).permute(0, 2, 3, 1))
            scores = torch.baddbmm(self._bias, qh.view(B * H, R, dh), kh.view(B * H, dh, Nk), alpha=dh ** -0.5)
            probs = torch.softmax(scores.view(B, H, R, Nk), dim=-1)
            if self.rows is not None:
                probs.mul_(self.valid)
        return probs


def attention_probs(q: Tensor, k: Tensor, key_bias: Tensor, rows: Tensor | None, num_heads: int) -> Tensor:
    """Softmax attention probabilities of one layer from projected queries ``q`` (B, Nq, H*dh) and keys ``k``
    (B, Nk, H*dh): :class:`RowSoftmax` for a single use."""
    return RowSoftmax(key_bias, rows, num_heads).probs(q, k)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, N) 0/1 -> (B, N) additive bias (0 keep, finfo.min drop)."""
    return (1.0 - mask.to(dtype)) * torch.finfo(dtype).min


class QKRecorder:
    """Forward hooks on an attention module's ``query``/``key`` projections.

    Records the projected queries and keys of every call (a shared cross-attention module is called
    twice per layer: once per direction), so that attention rows can be computed afterwards without
    asking the model to materialise full maps.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.q: dict[str, list[Tensor]] = {}
        self.k: dict[str, list[Tensor]] = {}
        self.handles = []
        self.active: set[str] = set()

    def __enter__(self):
        for name, mod in self.modules.items():
            if name not in self.active:
                continue
            self.q[name], self.k[name] = [], []
            self.handles.append(mod.query.register_forward_hook(self._hook(self.q[name])))
            self.handles.append(mod.key.register_forward_hook(self._hook(self.k[name])))
        return self

    @staticmethod
    def _hook(store: list):
        def fn(_mod, _inp, out):
            store.append(out)

        return fn

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


class RowRecorder:
    """Hooks on one self-attention's ``query``/``key`` projections that compute the requested attention rows as
    soon as both exist: neither the layer's full queries nor its keys are held past their projection, so what
    capture adds to a forward's peak memory is the kept rows (``benchmarks/run.py``)."""

    def __init__(self, module: nn.Module, softmax: RowSoftmax):
        self.module, self.softmax = module, softmax
        self.q = self.k = self.probs = None
        self.handles = []

    def __enter__(self):
        self.handles = [self.module.query.register_forward_hook(self._store("q")),
                        self.module.key.register_forward_hook(self._store("k"))]
        return self

    def _store(self, which: str):
        def fn(_mod, _inp, out):
            setattr(self, which, out)
            if self.q is not None and self.k is not None:
                self.probs = self.softmax.probs(self.q, self.k)
                self.q = self.k = None

        return fn

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

