"""Feature caching: one frozen forward per batch, every head's inputs kept in memory.

The SentEval protocol (a hyper-parameter grid per layer) and the MDL online code (one probe per data
block) train many small probes on the same inputs. Running the backbone once per split and training the
heads on cached tensors makes them cheap; :meth:`ProbeModule.extract` gives exactly the inputs that the
Lightning training loop feeds the heads.
"""
from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.collate import COUNTERS

log = logging.getLogger(__name__)


def pick_device(cfg) -> torch.device:
    acc = str(cfg.trainer.get("accelerator", "cpu"))
    if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def fast_dev_batches(cfg) -> int | None:
    f = cfg.trainer.get("fast_dev_run", False)
    if f is True:
        return 1
    if isinstance(f, int) and not isinstance(f, bool) and f > 0:
        return f
    return None


@torch.no_grad()
def extract_split(module, dm, stage: str, max_batches: int | None = None, max_examples: int | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, tuple[Tensor, ...]], Tensor, dict[str, int]]:
    """Every head's inputs and the labels over one split, read once in shard order.

    Returns ``(features {head key: tuple of (N, ...) tensors on CPU}, labels (N,), counts)``; ``counts`` sums the
    collator's counters (:data:`~value_pl.data.collate.COUNTERS`: samples, pairs, pairs dropped, texts truncated,
    phrases dropped, images with regions cut) over the batches read, zeros included: what
    :func:`~value_pl.driver.results.results_dict` reports per split.
    """
    loader = dm.loader(stage, train=False)  # every sample exactly once, in shard order
    feats: dict[str, list[list[Tensor]]] = {}
    labels: list[Tensor] = []
    counts = dict.fromkeys(COUNTERS, 0)
    n = 0
    dev = module.device
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        for k in COUNTERS:  # also of a batch with no example: its pairs may all have been dropped
            counts[k] += int(batch["counts"].get(k, 0))
        y = batch["labels"]
        if y.numel() == 0:
            continue
        batch = {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        out = module.extract(batch)
        for k, v in out.items():
            slots = feats.setdefault(k, [[] for _ in v])
            for s, t in zip(slots, v):
                s.append(t.detach().to("cpu", dtype))
        labels.append(y.cpu())
        n += y.numel()
        if max_examples is not None and n >= max_examples:
            break
    if not labels:
        raise ValueError(f"{dm.root}: split {dm.splits[stage]!r} gave no examples for task {module.task['name']}")
    y = torch.cat(labels)
    out = {k: tuple(torch.cat(s) for s in slots) for k, slots in feats.items()}
    if max_examples is not None:
        y = y[:max_examples]
        out = {k: tuple(t[:max_examples] for t in v) for k, v in out.items()}
    return out, y, counts


def take(x: tuple[Tensor, ...], idx) -> tuple[Tensor, ...]:
    return tuple(t[idx] for t in x)


@torch.no_grad()
def predict_logits(head: nn.Module, x: tuple[Tensor, ...], batch_size: int = 1024,
                   device: torch.device | str = "cpu") -> Tensor:
    head.eval()
    n = x[0].shape[0]
    out = [head(*(t[i:i + batch_size].to(device).float() for t in x)).float().cpu() for i in range(0, n, batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(head: nn.Module, x, y: Tensor, device="cpu") -> float:
    if y.numel() == 0:
        return float("nan")
    return float((predict_logits(head, x, device=device).argmax(-1) == y).float().mean())


def fit_head(head: nn.Module, x, y: Tensor, x_dev=None, y_dev=None, *, lr: float = 1e-3, weight_decay: float = 0.0,
             batch_size: int = 64, max_epochs: int = 20, patience: int = 3, seed: int = 0,
             device: torch.device | str = "cpu") -> tuple[nn.Module, int]:
    """Adam on cross-entropy; with dev data, early stopping on the dev loss (best state kept)."""
    head = head.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(int(seed))
    n = y.shape[0]
    best, best_state, bad, epochs = math.inf, None, 0, 0
    for ep in range(max_epochs):
        head.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(*(t[idx].to(device).float() for t in x)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs = ep + 1
        if x_dev is None or y_dev is None or y_dev.numel() == 0:
            continue
        dl = float(F.cross_entropy(predict_logits(head, x_dev, device=device), y_dev, reduction="mean"))
        if dl < best - 1e-6:
            best, bad = dl, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, epochs
