"""Prober heads.

* :class:`LayerEmbProber` -- VALUE Eq. 4: ``p_k(c|i,j) ∝ w_cls^T (W_w e_i ⊙ W_mu e_j)`` with
  ``W_w, W_mu ∈ R^{d×d}`` and one ``w_cls`` per class (no biases, as in the equation).
* :class:`AttentionProber` -- VALUE Eq. 3: ``p(c|i,j) ∝ Σ_k (w_k a_ij^k + mu_k a_ji^k)`` over the N
  heads, one (w_k, mu_k) per class: a linear map of the 2N attention weights (no bias by default).
* :class:`SentenceProber` -- SentEval's classifier: Linear -> Dropout -> Sigmoid -> Linear
  (``nhid=0``: logistic regression).

Each head is initialised from its own seed (``seed + crc32(name)``), so a head's start does not depend on
which other heads are trained beside it.
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn


def head_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


class LayerEmbProber(nn.Module):
    def __init__(self, d_a: int, d_b: int, num_classes: int, d: int | None = None, bias: bool = False):
        super().__init__()
        d = d or max(d_a, d_b)
        self.W_w = nn.Linear(d_a, d, bias=bias)
        self.W_mu = nn.Linear(d_b, d, bias=bias)
        self.w_cls = nn.Linear(d, num_classes, bias=bias)

    def forward(self, e_a: Tensor, e_b: Tensor) -> Tensor:
        return self.w_cls(self.W_w(e_a) * self.W_mu(e_b))


class AttentionProber(nn.Module):
    """Input: ``(P, 2N)`` = ``[a_ij^1..a_ij^N, a_ji^1..a_ji^N]``."""

    def __init__(self, num_heads: int, num_classes: int, bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.linear = nn.Linear(2 * num_heads, num_classes, bias=bias)

    @property
    def w(self) -> Tensor:  # (C, N)
        return self.linear.weight[:, : self.num_heads]

    @property
    def mu(self) -> Tensor:  # (C, N)
        return self.linear.weight[:, self.num_heads :]

    def forward(self, a_ij: Tensor, a_ji: Tensor) -> Tensor:
        return self.linear(torch.cat([a_ij, a_ji], dim=-1))


class SentenceProber(nn.Module):
    def __init__(self, d: int, num_classes: int, nhid: int = 0, dropout: float = 0.0):
        super().__init__()
        if nhid and nhid > 0:
            self.net = nn.Sequential(nn.Linear(d, nhid), nn.Dropout(dropout), nn.Sigmoid(), nn.Linear(nhid, num_classes))
        else:
            self.net = nn.Linear(d, num_classes)

    def forward(self, e: Tensor) -> Tensor:
        return self.net(e)


def seeded(seed: int, name: str, factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed(seed, name))
        return factory()
