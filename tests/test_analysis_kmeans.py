"""Batched k-means (k=2) + NMI against scikit-learn's KMeans + normalized_mutual_info_score."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score as sk_nmi

from value_pl.analysis.kmeans import kmeans2, nmi_per_sample


def _batch(seed: int, sep: tuple[float, float], B=16, N=50, D=24, scale=1.0):
    """Per sample: a text group and a region group of random sizes, padding at the end (filled with junk)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(B, N, D)) * 50.0  # junk in the padding must not matter
    M = np.zeros((B, N), bool)
    T = np.zeros((B, N), int)
    for b in range(B):
        n = int(rng.integers(8, N + 1))
        nt = int(rng.integers(3, n - 2))
        X[b, :n] = rng.normal(size=(n, D)) * scale
        X[b, nt:n] += rng.uniform(*sep) * scale * rng.normal(size=D) / np.sqrt(D) * 3
        M[b, :n] = True
        T[b, nt:n] = 1
    return X, M, T


@pytest.mark.parametrize("case", ["separated", "realistic"])
def test_matches_sklearn(case):
    X, M, T = _batch(0 if case == "separated" else 1, (3.0, 6.0) if case == "separated" else (2.0, 3.0))
    lab, inertia = kmeans2(torch.tensor(X), torch.tensor(M), seed=0)
    assert torch.all(lab[~torch.tensor(M)] == -1)
    mine = nmi_per_sample(lab, torch.tensor(T), torch.tensor(M))
    for b in range(X.shape[0]):
        xb = X[b][M[b]]
        km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(xb)
        # the same partition (labels up to permutation) ...
        assert sk_nmi(km.labels_, lab[b][M[b]].numpy()) == pytest.approx(1.0, abs=1e-12), b
        assert float(inertia[b]) == pytest.approx(km.inertia_, rel=1e-6)
        # ... hence the same NMI against the modality labels
        assert mine[b] == pytest.approx(sk_nmi(T[b][M[b]], km.labels_), abs=1e-6)
    if case == "separated":
        assert np.all(mine > 0.99)
    else:
        assert mine.min() < 0.9  # a non-trivial case


def test_hard_case_is_as_good_as_sklearn():
    """Weak structure: many local optima. Neither is guaranteed to find the best one; ours is no worse."""
    X, M, _ = _batch(1, (0.9, 2.0))
    _, inertia = kmeans2(torch.tensor(X), torch.tensor(M), seed=0)
    ref = [KMeans(n_clusters=2, n_init=10, random_state=0).fit(X[b][M[b]]).inertia_ for b in range(X.shape[0])]
    assert float(inertia.sum()) <= 1.01 * float(np.sum(ref))


def test_float32_deterministic_and_batch_independent():
    X, M, T = _batch(2, (2.0, 3.0), B=10)
    x, m = torch.tensor(X, dtype=torch.float32), torch.tensor(M)
    a, _ = kmeans2(x, m, seed=3)
    b, _ = kmeans2(x, m, seed=3)
    assert torch.equal(a, b)
    one = torch.cat([kmeans2(x[i : i + 1], m[i : i + 1], seed=3)[0] for i in range(10)])
    t = torch.tensor(T)
    assert np.allclose(nmi_per_sample(one, t, m), nmi_per_sample(a, t, m), atol=1e-6)


def test_nmi_per_sample_is_sklearn():
    rng = np.random.default_rng(5)
    p = torch.tensor(rng.integers(0, 2, size=(30, 40)))
    t = torch.tensor(rng.integers(0, 2, size=(30, 40)))
    m = torch.tensor(rng.random((30, 40)) < 0.8)
    t[:3] = 0  # one-cluster truth: sklearn's conventions apply
    p[1] = 0
    got = nmi_per_sample(p, t, m)
    want = [sk_nmi(t[b][m[b]].numpy(), p[b][m[b]].numpy()) for b in range(30)]
    assert np.allclose(got, want, atol=1e-12)


def test_row_seeds_make_a_samples_partition_independent_of_its_batch():
    """With one generator per row (the run's seed, the sample's key, the layer) a sample gets the same restarts,
    hence the same partition and inertia, alone or in any batch; with one generator per batch it need not."""
    from value_pl.analysis.kmeans import row_seed

    X, M, _ = _batch(7, (0.3, 0.4), B=12)  # barely separated clusters: the restarts matter
    x, m = torch.tensor(X), torch.tensor(M)
    keys = [f"img{i}" for i in range(12)]
    seeds = [row_seed(5, k, 3) for k in keys]
    full, inert = kmeans2(x, m, n_init=3, row_seeds=seeds)
    for lo, hi in [(0, 1), (3, 7), (5, 12)]:
        part, pi = kmeans2(x[lo:hi], m[lo:hi], n_init=3, row_seeds=seeds[lo:hi])
        assert torch.equal(part, full[lo:hi]) and torch.allclose(pi, inert[lo:hi], rtol=1e-12)
    assert len(set(seeds)) == 12 and row_seed(5, "img0", 3) != row_seed(5, "img0", 4) != row_seed(6, "img0", 4)
    with pytest.raises(ValueError, match="2 row seeds for 12 rows"):
        kmeans2(x, m, row_seeds=seeds[:2])
