"""MDL probing with the online code (Voita & Titov 2020), for any pair or sentence task: ``mdl=true``.

The training examples (pairs, or sentences) are put in a seeded random order and cut at the block
boundaries ``t_i = ceil(f_i * N)`` for the fractions ``mdl_opts.fractions`` (default 0.1, 0.2, 0.4, 0.8,
1.6, 3.2, 6.25, 12.5, 25, 50, 100 % as in the paper). The first block is sent with the uniform code
(``t_1 * log2 K`` bits); each later block ``(t_i, t_{i+1}]`` is sent with a probe trained from its
seeded initial state on the first ``t_i`` examples (90 % for training, 10 % held out for early stopping on
the loss), costing ``sum -log2 p(y | x)`` bits. Reported per head (layer):

* ``codelength_bits``: the online codelength; ``uniform_bits = N log2 K``;
* ``compression = uniform_bits / codelength_bits`` (higher = the labels are easier to extract);
* ``val_acc`` / ``test_acc`` of a probe trained on all N examples (early stopping on the val split).

The backbone runs once per batch (features cached in memory); each head is the same head class as in
plain training (``prober``): Eq. 3/4 heads for pair tasks, ``SentenceProber`` for sentence tasks.
Sentence heads (``SentenceProber``) of all layers train together in each block
(:func:`online_codelength_batched`, :mod:`value_pl.protocols.batched`); pair heads one after the other.
A control task (``control=true``) is coded the same way: a planted-signal task compresses much better
than its control. Results go to ``results.json`` (``mdl`` block and per-layer fields) and ``mdl.json``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ..probers.heads import SentenceProber
from .batched import StopRule, train_units, unit_of
from .fitting import fit_head, predict_logits, take

PAPER_FRACTIONS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


def check_fractions(fractions) -> tuple[float, ...]:
    """``fractions`` as floats, each a share of the training set in (0, 1]; a value outside (e.g. the paper's
    percentages written as ``0.1 ... 100``) is a ``ValueError``: clamped, it would silently move the block
    boundaries (``[0.1, ..., 100]`` codes the first 10 % uniformly, in 5 blocks instead of 11)."""
    fr = tuple(float(f) for f in fractions)
    bad = [f for f in fr if not 0.0 < f <= 1.0]
    if not fr or bad:
        raise ValueError(f"mdl_opts.fractions must be shares of the training set in (0, 1] (the paper's 0.1 %, 0.2 %, "
                         f"..., 100 % are 0.001, 0.002, ..., 1.0); got {list(fr)}" + (f", out of range: {bad}" if bad else ""))
    return fr


def block_ends(n: int, fractions=PAPER_FRACTIONS) -> list[int]:
    ends = sorted({min(n, max(1, math.ceil(f * n))) for f in check_fractions(fractions)} | {n})
    return ends


def online_codelength(head0, x, y: torch.Tensor, num_classes: int, fractions=PAPER_FRACTIONS, *, seed: int = 0,
                      lr: float = 1e-3, batch_size: int = 64, max_epochs: int = 20, patience: int = 3,
                      device="cpu") -> dict:
    """Online code of labels ``y`` given inputs ``x`` (tuple of tensors), in the given (already random) order."""
    n = y.shape[0]
    ends = block_ends(n, fractions)
    bits_uniform_per = math.log2(num_classes)
    blocks = [{"start": 0, "end": ends[0], "bits": ends[0] * bits_uniform_per, "code": "uniform"}]
    for i in range(len(ends) - 1):
        t, t_next = ends[i], ends[i + 1]
        n_dev = t // 10 if t >= 10 else 0
        tr, dv = slice(0, t - n_dev), slice(t - n_dev, t)
        head = copy.deepcopy(head0)
        head, epochs = fit_head(head, take(x, tr), y[tr], take(x, dv) if n_dev else None, y[dv] if n_dev else None,
                                lr=lr, batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                                seed=seed + i, device=device)
        logits = predict_logits(head, take(x, slice(t, t_next)), device=device)
        nats = float(F.cross_entropy(logits, y[t:t_next], reduction="sum"))
        blocks.append({"start": t, "end": t_next, "bits": nats / math.log(2), "code": "online", "epochs": epochs})
    code = sum(b["bits"] for b in blocks)
    uniform = n * bits_uniform_per
    return {"codelength_bits": code, "uniform_bits": uniform, "compression": uniform / code if code > 0 else math.inf,
            "num_examples": n, "blocks": blocks}


def mdl_rule(max_epochs: int, patience: int) -> StopRule:
    """:func:`~value_pl.protocols.fitting.fit_head`'s stopping rule (dev loss every pass, min delta 1e-6)."""
    return StopRule(metric="loss", patience=int(patience), passes_per_eval=1, max_passes=int(max_epochs),
                    min_delta=1e-6)


def online_codelength_batched(heads0: list[SentenceProber], xs: list[torch.Tensor], y: torch.Tensor,
                              num_classes: int, fractions=PAPER_FRACTIONS, *, seed: int = 0, lr: float = 1e-3,
                              batch_size: int = 64, max_epochs: int = 20, patience: int = 3, device="cpu",
                              progress: bool = False) -> list[dict]:
    """:func:`online_codelength` of several sentence heads at once (head k reads ``xs[k]``): each block's probes
    of all heads train together (:func:`~value_pl.protocols.batched.train_units`, the same permutations as
    ``fit_head``: seed + block index). Blocks stay one after the other: each has its own training size,
    permutation stream and stopping point, and the last blocks (25 %, 50 % of the data) carry most of the work."""
    n = y.shape[0]
    ends = block_ends(n, fractions)
    per = math.log2(num_classes)
    units = [unit_of(h, k) for k, h in enumerate(heads0)]
    blocks = [[{"start": 0, "end": ends[0], "bits": ends[0] * per, "code": "uniform"}] for _ in heads0]
    rule = mdl_rule(max_epochs, patience)
    for i in range(len(ends) - 1):
        t, t_next = ends[i], ends[i + 1]
        n_dev = t // 10 if t >= 10 else 0
        tr, dv = slice(0, t - n_dev), slice(t - n_dev, t)
        res = train_units([x[tr] for x in xs], y[tr], [x[dv] for x in xs] if n_dev else None, y[dv] if n_dev else None,
                          units, num_classes, lr=lr, batch_size=batch_size, rule=rule, seed=seed + i, device=device,
                          progress=progress, desc=f"MDL block {i + 1}/{len(ends) - 1}")
        for k, (h0, r) in enumerate(zip(heads0, res)):
            head = copy.deepcopy(h0)
            head.load_state_dict(r["state"])
            head.to(device)
            logits = predict_logits(head, (xs[k][t:t_next],), device=device)
            nats = float(F.cross_entropy(logits, y[t:t_next], reduction="sum"))
            blocks[k].append({"start": t, "end": t_next, "bits": nats / math.log(2), "code": "online",
                              "epochs": r["passes"]})
    out = []
    uniform = n * per
    for b in blocks:
        code = sum(x["bits"] for x in b)
        out.append({"codelength_bits": code, "uniform_bits": uniform,
                    "compression": uniform / code if code > 0 else math.inf, "num_examples": n, "blocks": b})
    return out
