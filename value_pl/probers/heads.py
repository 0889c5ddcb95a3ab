"""Prober heads.

* :class:`LayerEmbProber` -- VALUE Eq. 4: ``p_k(c|i,j) ∝ w_cls^T (W_w e_i ⊙ W_mu e_j)`` with
  ``W_w, W_mu ∈ R^{d×d}`` and one ``w_cls`` per class (no biases, as in the equation).
* :class:`AttentionProber` -- VALUE Eq. 3: ``p(c|i,j) ∝ Σ_k (w_k a_ij^k + mu_k a_ji^k)`` over the N
  heads, one (w_k, mu_k) per class: a linear map of the 2N attention weights (no bias by default).
* :class:`SentenceProber` -- SentEval's classifier: Linear -> Dropout -> Sigmoid -> Linear
  (``nhid=0``: logistic regression).

Each head is initialised from its own seed (``(seed * 1000003 + crc32(name)) mod 2**31``), so a head's start
does not depend on which other heads are trained beside it. For training, heads of one class and size are stacked
(:class:`StackedLayerEmb`, :class:`StackedAttention`, :class:`StackedSentence`): one batched matmul serves
every layer, with exactly the single heads' math.
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


# ------------------------------------------------------------------------------------ stacked heads
class StackedHeads(nn.Module):
    """``n`` independent heads of one class and size, their parameters stacked on a leading axis.

    ``forward`` evaluates all of them in one batched matmul per weight: inputs ``(n, P, ...)`` -> logits
    ``(n, P, C)``. Adam and weight decay act element-wise, and the loss is a sum over heads, so head ``i``
    trains exactly as the single head would alone. :meth:`load_head` / :meth:`head` copy one slot from / to
    the single-head reference class (the one the tests, MDL and SentEval fit use).
    """

    single: type[nn.Module] = nn.Module

    def load_head(self, i: int, head: nn.Module) -> None:
        with torch.no_grad():
            for name, p in self.slot_params(head).items():
                getattr(self, name)[i].copy_(p)

    def _filled(self, head: nn.Module, i: int) -> nn.Module:
        """``head`` (a fresh single head) with slot ``i``'s weights."""
        with torch.no_grad():
            for name, p in self.slot_params(head).items():
                p.copy_(getattr(self, name)[i].reshape(p.shape))
        return head

    def slot_state(self, i: int) -> dict[str, Tensor]:
        return {n: p[i].detach().clone() for n, p in self.named_parameters()}

    def load_slot_state(self, i: int, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named_parameters():
                p[i].copy_(state[n])


class StackedLayerEmb(StackedHeads):
    """``n`` Eq. 4 heads: ``logits_k = w_cls_k (W_w,k e_a ⊙ W_mu,k e_b)``."""

    single = LayerEmbProber

    def __init__(self, n: int, d_a: int, d_b: int, num_classes: int, d: int, bias: bool = False):
        super().__init__()
        self.W_w = nn.Parameter(torch.zeros(n, d, d_a))
        self.W_mu = nn.Parameter(torch.zeros(n, d, d_b))
        self.w_cls = nn.Parameter(torch.zeros(n, num_classes, d))
        self.bias = bias
        if bias:
            self.b_w = nn.Parameter(torch.zeros(n, 1, d))
            self.b_mu = nn.Parameter(torch.zeros(n, 1, d))
            self.b_cls = nn.Parameter(torch.zeros(n, 1, num_classes))

    @staticmethod
    def slot_params(h: LayerEmbProber) -> dict[str, Tensor]:
        out = {"W_w": h.W_w.weight, "W_mu": h.W_mu.weight, "w_cls": h.w_cls.weight}
        if h.W_w.bias is not None:
            out.update(b_w=h.W_w.bias[None], b_mu=h.W_mu.bias[None], b_cls=h.w_cls.bias[None])
        return out

    def forward(self, e_a: Tensor, e_b: Tensor) -> Tensor:
        if self.bias:
            u = torch.baddbmm(self.b_w, e_a, self.W_w.transpose(1, 2))
            v = torch.baddbmm(self.b_mu, e_b, self.W_mu.transpose(1, 2))
            return torch.baddbmm(self.b_cls, u * v, self.w_cls.transpose(1, 2))
        u = torch.bmm(e_a, self.W_w.transpose(1, 2))
        v = torch.bmm(e_b, self.W_mu.transpose(1, 2))
        return torch.bmm(u * v, self.w_cls.transpose(1, 2))

    def head(self, i: int) -> LayerEmbProber:
        n, d, d_a = self.W_w.shape
        h = LayerEmbProber(d_a, self.W_mu.shape[2], self.w_cls.shape[1], d, self.bias)
        return self._filled(h, i)


class StackedAttention(StackedHeads):
    """``n`` Eq. 3 heads over ``(a_ij, a_ji)`` of N attention heads each."""

    single = AttentionProber

    def __init__(self, n: int, num_heads: int, num_classes: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, num_classes, 2 * num_heads))
        self.bias = bias
        if bias:
            self.b = nn.Parameter(torch.zeros(n, 1, num_classes))

    @staticmethod
    def slot_params(h: AttentionProber) -> dict[str, Tensor]:
        out = {"weight": h.linear.weight}
        if h.linear.bias is not None:
            out["b"] = h.linear.bias[None]
        return out

    def forward(self, a_ij: Tensor, a_ji: Tensor) -> Tensor:
        x = torch.cat([a_ij, a_ji], dim=-1)
        if self.bias:
            return torch.baddbmm(self.b, x, self.weight.transpose(1, 2))
        return torch.bmm(x, self.weight.transpose(1, 2))

    def head(self, i: int) -> AttentionProber:
        n, C, two_h = self.weight.shape
        h = AttentionProber(two_h // 2, C, self.bias)
        return self._filled(h, i)


class StackedSentence(StackedHeads):
    """``n`` SentEval classifiers (``nhid=0``: logistic regression) over per-layer sentence vectors."""

    single = SentenceProber

    def __init__(self, n: int, d: int, num_classes: int, nhid: int = 0, dropout: float = 0.0):
        super().__init__()
        self.nhid, self.p = int(nhid or 0), float(dropout)
        if self.nhid > 0:
            self.W1 = nn.Parameter(torch.zeros(n, self.nhid, d))
            self.b1 = nn.Parameter(torch.zeros(n, 1, self.nhid))
            self.W2 = nn.Parameter(torch.zeros(n, num_classes, self.nhid))
            self.b2 = nn.Parameter(torch.zeros(n, 1, num_classes))
        else:
            self.W2 = nn.Parameter(torch.zeros(n, num_classes, d))
            self.b2 = nn.Parameter(torch.zeros(n, 1, num_classes))

    @staticmethod
    def slot_params(h: SentenceProber) -> dict[str, Tensor]:
        if isinstance(h.net, nn.Linear):
            return {"W2": h.net.weight, "b2": h.net.bias[None]}
        return {"W1": h.net[0].weight, "b1": h.net[0].bias[None], "W2": h.net[3].weight, "b2": h.net[3].bias[None]}

    def forward(self, e: Tensor) -> Tensor:
        if self.nhid > 0:
            hid = torch.baddbmm(self.b1, e, self.W1.transpose(1, 2))
            hid = torch.sigmoid(nn.functional.dropout(hid, self.p, self.training))
            return torch.baddbmm(self.b2, hid, self.W2.transpose(1, 2))
        return torch.baddbmm(self.b2, e, self.W2.transpose(1, 2))

    def head(self, i: int) -> SentenceProber:
        C, d = self.W2.shape[1], (self.W1.shape[2] if self.nhid else self.W2.shape[2])
        h = SentenceProber(d, C, self.nhid, self.p)
        return self._filled(h, i)
