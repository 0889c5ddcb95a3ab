"""Capture by request: what a caller wants kept from a forward pass, and the attention rows computed from a layer's
own queries and keys (so the forward itself keeps sdpa / flash attention).

A :class:`CaptureSpec` says which hidden states and attention maps to keep (``fnmatch`` patterns over the
canonical names of :mod:`value_pl.backbones.base`) and, optionally, which query rows. With rows requested, an
attention map is stored as ``(B, H, R, N_k)`` with the rows listed in ``BackboneOutput.rows`` -- the full
``N x N`` map is never materialised.
"""
from __future__ import annotations

import fnmatch
import math
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


def attention_probs(q: Tensor, k: Tensor, key_bias: Tensor, rows: Tensor | None, num_heads: int) -> Tensor:
    """Softmax attention probabilities from projected queries and keys.

    q: (B, Nq, H*dh) output of the query projection; k: (B, Nk, H*dh); key_bias: (B, Nk) additive
    mask (0 keep, large negative drop); rows: (B, R) query positions (-1 pad) or None for all.
    Returns (B, H, R or Nq, Nk) in float32. Padding keys get 0 in every row. With ``rows``, the ``-1``
    (padding) rows come back as zeros; with ``rows=None`` every query row is kept as the model computes it,
    padding query positions included (a softmax over the real keys, as transformers' ``output_attentions``
    returns them): mask those rows with the query stream's mask.
    """
    B, Nq, hd = q.shape
    dh = hd // num_heads
    if rows is not None:
        valid = rows >= 0
        q = torch.gather(q, 1, rows.clamp(min=0)[..., None].expand(-1, -1, hd))
    qh = q.float().view(B, q.shape[1], num_heads, dh).transpose(1, 2)
    kh = k.float().view(B, k.shape[1], num_heads, dh).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) / math.sqrt(dh)
    scores = scores + key_bias.float()[:, None, None, :]
    probs = torch.softmax(scores, dim=-1)
    if rows is not None:
        probs = probs * valid[:, None, :, None].to(probs.dtype)
    return probs


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

    def __init__(self, module: nn.Module, key_bias: Tensor, rows: Tensor | None, num_heads: int):
        self.module, self.key_bias, self.rows, self.num_heads = module, key_bias, rows, num_heads
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
                self.probs = attention_probs(self.q, self.k, self.key_bias, self.rows, self.num_heads)
                self.q = self.k = None

        return fn

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

