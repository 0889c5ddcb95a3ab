"""SentEval linguistic probing per layer (VALUE Sec. 3.5, Tables 5 and 11), with SentEval's protocol.

Sentence representation (documented choice): for each layer, the **mean of the hidden states over the
sentence's word tokens** ([CLS]/[SEP] and padding excluded; :func:`value_pl.probers.features.sentence_inputs`).
Input is text only: single-stream models (UNITER, VisualBERT) get the sentence with no regions; the
two-stream model (LXMERT) is probed on its embedding output and its 9 language layers (the cross layers
need an image); BERT on its embedding output and 12 layers. Layer 0 is the embedding output.

Protocol (facebookresearch/SentEval, ``tools/classifier.py`` + ``tools/validation.py``; Conneau et al. 2018):

* classifier ``Linear -> Dropout -> Sigmoid -> Linear`` (``prober=senteval_mlp``) or logistic regression
  (``prober=senteval_lr``; ``task.force_lr: true`` forces it, as SentEval does for WordContent);
* Adam (lr 1e-3), L2 (Adam weight decay) from {1e-5, 1e-4, 1e-3, 1e-2}, nhid from {50, 100, 200},
  dropout from {0, 0.1, 0.2}, batch 64; every configuration trained on train and scored on dev;
* one "epoch" = ``epoch_size`` (4) passes over train, then a dev evaluation; training stops after
  ``tenacity`` (5) evaluations without a dev improvement or at ``max_epoch`` (200); the best-dev model is kept;
* per layer the configuration with the best dev accuracy is chosen (ties: the first in grid order) and its
  test accuracy reported.

Features are extracted once per split (one frozen forward per batch) and the grid runs on cached tensors.
:func:`fit_senteval` / :func:`probe_layer` are SentEval's loop, one configuration at a time (the reference).
:func:`probe_layers` trains **every configuration of every layer at once** with
:func:`value_pl.protocols.batched.train_units`: the same initial weights, the same permutation of the
training set in every pass, the same Adam update, the same stopping rule per configuration; it differs from
the reference only in floating-point rounding and in the dropout masks (drawn from another random stream).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F

from ..probers.heads import SentenceProber, seeded
from .batched import StopRule, Unit, train_units
from .fitting import accuracy

DEFAULT_GRID = {"nhid": [50, 100, 200], "dropout": [0.0, 0.1, 0.2], "l2": [1e-5, 1e-4, 1e-3, 1e-2]}


def fit_senteval(clf, x, y, x_dev, y_dev, *, l2: float, lr: float = 1e-3, batch_size: int = 64, tenacity: int = 5,
                 epoch_size: int = 4, max_epoch: int = 200, seed: int = 1111, device="cpu"):
    """SentEval's PyTorchClassifier.fit: returns (best-dev model, best dev accuracy, passes run).

    Its stopping rule as written there: every ``epoch_size`` passes the dev accuracy is taken; a non-improving
    evaluation first checks, then increments a counter that is never reset (``if early_stop_count >= tenacity:
    stop_train = True; early_stop_count += 1``), so the fit stops at the (tenacity + 1)-th non-improving
    evaluation overall; and it trains on while ``nepoch <= max_epoch`` (up to 204 passes for 200 and 4)."""
    clf = clf.to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=l2)
    g = torch.Generator().manual_seed(int(seed))
    n = y.shape[0]
    best_acc, best_state, bad, nepoch, stop = -1.0, None, 0, 0, False
    while not stop and nepoch <= max_epoch:
        clf.train()
        for _ in range(epoch_size):
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                loss = F.cross_entropy(clf(x[idx].to(device)), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        nepoch += epoch_size
        acc = accuracy(clf, (x_dev,), y_dev, device)
        if acc > best_acc:
            best_acc = acc
            best_state = copy.deepcopy(clf.state_dict())
        else:
            if bad >= tenacity:
                stop = True
            bad += 1
    clf.load_state_dict(best_state)
    clf.eval()
    return clf, best_acc, nepoch


def grid_of(prober: dict, task: dict, quick: bool = False) -> list[dict]:
    g = {**DEFAULT_GRID, **(prober.get("grid") or {})}
    lr_only = prober["name"] == "senteval_lr" or bool(task.get("force_lr", False))
    nhids = [0] if lr_only else list(g["nhid"])
    drops = [0.0] if lr_only else list(g["dropout"])
    combos = [dict(nhid=int(h), dropout=float(d), l2=float(l)) for h, d, l in itertools.product(nhids, drops, g["l2"])]
    return combos[:1] if quick else combos


def init_prober(d: int, C: int, hp: dict, seed: int, key: str) -> SentenceProber:
    """The seeded initial classifier of configuration ``hp`` on head ``key`` (the same in both loops)."""
    return seeded(seed, f"{key}:{hp}", lambda: SentenceProber(d, C, hp["nhid"], hp["dropout"]))


def probe_layer(x_tr, y_tr, x_va, y_va, x_te, y_te, C: int, grid: list[dict], opts: dict, seed: int, key: str,
                device="cpu") -> dict:
    """The reference: every configuration of one layer trained alone, one after the other."""
    tried = []
    best = None
    for hp in grid:
        clf = init_prober(x_tr.shape[1], C, hp, seed, key)
        clf, dev_acc, passes = fit_senteval(clf, x_tr, y_tr, x_va, y_va, l2=hp["l2"], seed=seed, device=device, **opts)
        tried.append({**hp, "val_acc": dev_acc, "passes": passes})
        if best is None or dev_acc > best[0]:
            best = (dev_acc, hp, clf, passes)
    dev_acc, hp, clf, passes = best
    return {"val_acc": dev_acc, "test_acc": accuracy(clf, (x_te,), y_te, device), **hp, "passes": passes,
            "grid": tried}


def senteval_rule(opts: dict) -> StopRule:
    """SentEval's stopping rule: dev accuracy every ``epoch_size`` passes, ``tenacity``, ``max_epoch`` passes."""
    return StopRule(metric="acc", patience=int(opts.get("tenacity", 5)), passes_per_eval=int(opts.get("epoch_size", 4)),
                    max_passes=int(opts.get("max_epoch", 200)), senteval=True)


def probe_layers(train: tuple[list, torch.Tensor], val: tuple[list, torch.Tensor], test: tuple[list, torch.Tensor],
                 C: int, grid: list[dict], opts: dict, seed: int, keys: list[str], device="cpu",
                 progress: bool = False, eval_batch: int | None = None) -> list[dict]:
    """:func:`probe_layer` for every layer at once: ``train``/``val``/``test`` = (per-layer features, labels),
    features in the order of ``keys``. Returns one row per layer, as :func:`probe_layer` does."""
    (xs, y), (xs_va, y_va), (xs_te, y_te) = train, val, test
    units = [Unit(li, hp["nhid"], hp["dropout"], hp["l2"], init_prober(xs[li].shape[1], C, hp, seed, key).state_dict())
             for li, key in enumerate(keys) for hp in grid]
    out = train_units(xs, y, xs_va, y_va, units, C, lr=float(opts.get("lr", 1e-3)),
                      batch_size=int(opts.get("batch_size", 64)), rule=senteval_rule(opts), seed=seed, device=device,
                      progress=progress, eval_batch=eval_batch, desc="SentEval grid")
    rows = []
    for li, key in enumerate(keys):
        res = out[li * len(grid):(li + 1) * len(grid)]
        tried = [{**hp, "val_acc": r["score"], "passes": r["passes"]} for hp, r in zip(grid, res)]
        k = max(range(len(grid)), key=lambda j: res[j]["score"])  # first of the best: the reference's tie rule
        hp = grid[k]
        clf = SentenceProber(xs[li].shape[1], C, hp["nhid"], hp["dropout"])
        clf.load_state_dict(res[k]["state"])
        rows.append({"val_acc": res[k]["score"], "test_acc": accuracy(clf.to(device), (xs_te[li],), y_te, device), **hp,
                     "passes": res[k]["passes"], "grid": tried})
    return rows
