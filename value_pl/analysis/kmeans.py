"""Batched k-means with k=2 (many samples at once, on the device) and per-sample NMI.

:func:`kmeans2` clusters the tokens of every sample of a batch in one set of tensor operations:
``x`` is ``(B, N, D)``, ``mask`` ``(B, N)`` marks the real tokens (padding never takes part). It
follows scikit-learn's ``KMeans(n_clusters=2)``: the data of each sample are centred, every restart is
seeded with k-means++ (restart 0 with the deterministic farthest-point pair), Lloyd iterations run until
no label changes (or ``max_iter``), and the restart with the lowest inertia wins. The random numbers
come from a fixed ``torch.Generator`` on the CPU, so results do not depend on the device; with ``row_seeds``
each sample draws them from its own generator (:func:`row_seed`: the run's seed, the sample's key, the layer),
so a sample's partition does not depend on the batch it was read in either.

NMI is scikit-learn's :func:`~sklearn.metrics.normalized_mutual_info_score` (arithmetic mean
normalisation, the same default as torchmetrics) per sample; nothing here re-implements it.
"""
from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor


def _sqdist(x: Tensor, xx: Tensor, c: Tensor) -> Tensor:
    """x (B, N, D), xx (B, N), c (B, I, K, D) -> squared distances (B, I, N, K), clamped at 0."""
    cc = (c * c).sum(-1)  # (B, I, K)
    d = xx[:, None, :, None] - 2.0 * torch.einsum("bnd,bikd->bink", x, c) + cc[:, :, None, :]
    return d.clamp_min(0.0)


def _pick(weights: Tensor, u: Tensor) -> Tensor:
    """Sample one index per row of ``weights`` (..., N) >= 0 by inverse CDF with uniforms ``u`` (...)."""
    cdf = weights.cumsum(-1)
    total = cdf[..., -1:]
    target = u[..., None] * total
    idx = (cdf <= target).sum(-1)  # first position whose cdf exceeds the target
    return idx.clamp(max=weights.shape[-1] - 1)


def row_seed(seed: int, key: str, layer: int = 0) -> int:
    """The seed of one sample's k-means restarts at one layer: the same in every batch and batch size."""
    return zlib.crc32(f"{int(seed)}\x1f{key}\x1f{int(layer)}".encode("utf-8"))


class _Uniforms:
    """Uniform draws for a batch: from one generator seeded with ``seed``, or, with ``row_seeds``, row ``b`` from
    its own generator (the same numbers for a sample whatever its batch)."""

    def __init__(self, B: int, seed: int, row_seeds):
        self.B = B
        if row_seeds is None:
            self.g, self.rows = torch.Generator(device="cpu").manual_seed(int(seed)), None
        else:
            if len(row_seeds) != B:
                raise ValueError(f"kmeans2: {len(row_seeds)} row seeds for {B} rows")
            self.g, self.rows = None, [torch.Generator(device="cpu").manual_seed(int(r)) for r in row_seeds]

    def __call__(self, *shape: int) -> Tensor:
        if self.rows is None:
            return torch.rand(self.B, *shape, generator=self.g, dtype=torch.float64)
        out = torch.empty(self.B, *shape, dtype=torch.float64)
        for b, g in enumerate(self.rows):
            out[b] = torch.rand(*shape, generator=g, dtype=torch.float64)
        return out


@torch.no_grad()
def kmeans2(x: Tensor, mask: Tensor, n_init: int = 10, max_iter: int = 100, seed: int = 0,
           local_trials: int = 4, row_seeds: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """k-means with k=2 for every sample of a batch.

    x: (B, N, D) float; mask: (B, N) bool/0-1 (real tokens). Returns ``(labels, inertia)``: labels
    (B, N) long in {0, 1} (-1 at masked positions) of the best restart, inertia (B,) of that restart.
    Samples with fewer than two real tokens get label 0 everywhere and inertia 0. ``row_seeds`` (B ints, e.g.
    :func:`row_seed`): each row's restarts from its own generator, independent of the other rows; else one
    generator seeded with ``seed`` for the batch.
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans2 expects (B, N, D), got {tuple(x.shape)}")
    B, N, D = x.shape
    dev = x.device
    m = mask.to(dev).bool()
    mf = m.to(x.dtype)
    n = mf.sum(1).clamp(min=1.0)  # (B,)
    x = (x - (x * mf[..., None]).sum(1, keepdim=True) / n[:, None, None]) * mf[..., None]
    xx = (x * x).sum(-1)  # (B, N)
    I = max(int(n_init), 1)
    bidx = torch.arange(B, device=dev)

    # ---- initial centres: restart 0 farthest-point, restarts >= 1 k-means++ (fixed CPU generator)
    draw = _Uniforms(B, seed, row_seeds)
    u1 = draw(I).to(dev)
    w_valid = mf[:, None, :].expand(B, I, N).double()
    first = _pick(w_valid, u1)  # (B, I) uniform over real tokens
    first[:, 0] = torch.where(m.any(1), (xx.masked_fill(~m, -1.0)).argmax(1), torch.zeros_like(first[:, 0]))
    c1 = x[bidx[:, None], first]  # (B, I, D)
    d1 = (xx[:, None, :] - 2.0 * torch.einsum("bnd,bid->bin", x, c1) + (c1 * c1).sum(-1)[..., None]).clamp_min(0)
    d1 = d1 * mf[:, None]  # (B, I, N) squared distance to the first centre
    # greedy k-means++ (as scikit-learn): several candidates for the second centre, keep the one that
    # lowers the potential most
    L = max(int(local_trials), 1)
    u2 = draw(I, L).to(dev)
    cand = _pick(d1.double()[:, :, None, :].expand(B, I, L, N), u2)  # (B, I, L)
    cx = x[bidx[:, None, None], cand]  # (B, I, L, D)
    dc = (xx[:, None, None, :] - 2.0 * torch.einsum("bnd,bild->biln", x, cx) + (cx * cx).sum(-1)[..., None]).clamp_min(0)
    pot = (torch.minimum(dc, d1[:, :, None, :]) * mf[:, None, None, :]).sum(-1)  # (B, I, L)
    second = torch.gather(cand, 2, pot.argmin(-1, keepdim=True))[..., 0]
    second[:, 0] = d1[:, 0].argmax(-1)
    c = torch.stack([c1, x[bidx[:, None], second]], 2)  # (B, I, 2, D)

    labels = None
    for _ in range(int(max_iter)):
        d = _sqdist(x, xx, c)
        new = d.argmin(-1)  # (B, I, N)
        if labels is not None and bool(((new != labels) & m[:, None]).sum() == 0):
            break
        labels = new
        onehot = torch.nn.functional.one_hot(labels, 2).to(x.dtype) * mf[:, None, :, None]  # (B, I, N, 2)
        cnt = onehot.sum(2)  # (B, I, 2)
        sums = torch.einsum("bink,bnd->bikd", onehot, x)
        newc = sums / cnt.clamp(min=1.0)[..., None]
        c = torch.where(cnt[..., None] > 0, newc, c)  # an emptied cluster keeps its centre
    d = _sqdist(x, xx, c)
    labels = d.argmin(-1)
    inertia = (d.min(-1).values * mf[:, None]).sum(-1)  # (B, I)
    best = inertia.argmin(1)  # first restart among equals
    lab = labels[bidx, best]
    lab = torch.where(m, lab, torch.full_like(lab, -1))
    lab = torch.where((m.sum(1) >= 2)[:, None] | ~m, lab, torch.zeros_like(lab))
    return lab, inertia[bidx, best]


@lru_cache(maxsize=65536)
def _nmi_of_table(table: tuple) -> float:
    """scikit-learn's NMI for the labelings that a contingency table (truth x pred counts) describes."""
    t, p = [], []
    k = int(round(len(table) ** 0.5))
    for i in range(k):
        for j in range(k):
            c = table[i * k + j]
            t += [i] * c
            p += [j] * c
    return float(normalized_mutual_info_score(t, p))


def nmi_per_sample(pred: Tensor, truth: Tensor, mask: Tensor) -> np.ndarray:
    """NMI (scikit-learn, arithmetic normalisation) between ``pred`` and ``truth`` over the masked tokens
    of every sample: (B, N) each, labels in {0, 1} -> (B,) float64.

    NMI depends only on the contingency table of the two labelings, so the tables are counted on the
    device for the whole batch and scikit-learn is asked once per distinct table (memoised).
    """
    m = mask.bool()
    if bool(((pred < 0) | (pred > 1) | (truth < 0) | (truth > 1))[m].any()):
        raise ValueError("nmi_per_sample expects labels in {0, 1} at the masked positions")
    cell = (truth.long() * 2 + pred.long()).masked_fill(~m, 4)
    counts = torch.nn.functional.one_hot(cell, 5)[..., :4].sum(1).cpu().tolist()  # (B, 4)
    return np.array([_nmi_of_table(tuple(c)) for c in counts], dtype=np.float64)
