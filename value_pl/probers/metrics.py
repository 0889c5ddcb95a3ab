"""Per-split metrics of a probing run, exact under DDP: accuracy of every head at once, the data counters, and
the labels the heads were trained and tested on; and a sum over ranks (the logged epoch loss).

Both keep integer sums as torchmetrics states (reduced by summation over ranks), so a DDP run reports the
same numbers as one process reading the same samples.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ..data.collate import COUNTERS


class HeadAccuracy(Metric):
    """Micro accuracy of ``n`` heads on the same labels: ``update(preds (n, P), labels (P,))``."""

    full_state_update = False

    def __init__(self, n: int):
        super().__init__()
        self.n = int(n)
        self.add_state("correct", default=torch.zeros(self.n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, labels: Tensor) -> None:
        self.correct += (preds == labels[None]).sum(1)
        self.total += labels.numel()

    def compute(self) -> Tensor:
        """(n,) accuracies; NaN where no example was seen (the caller reports those as missing)."""
        t = self.total.to(torch.float64)
        return torch.where(t > 0, self.correct.to(torch.float64) / t.clamp(min=1), torch.full_like(t, float("nan")))


class Counters(Metric):
    """Sums of the collator's per-batch counters (:data:`value_pl.data.collate.COUNTERS`).

    ``update`` adds the batch's Python ints on the host (no device op per step: on a GPU each would be a kernel
    launch in the step's host time); the sums enter the device states before every sync and compute."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for k in COUNTERS:
            self.add_state(k, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self._pending = dict.fromkeys(COUNTERS, 0)

    def update(self, counts: dict) -> None:
        for k in COUNTERS:
            self._pending[k] += int(counts.get(k, 0))

    def _flush(self) -> None:
        for k, v in self._pending.items():
            if v:
                setattr(self, k, getattr(self, k) + v)
        self._pending = dict.fromkeys(COUNTERS, 0)

    def sync(self, *args, **kwargs):
        self._flush()  # this rank's host sums join the reduction over ranks
        return super().sync(*args, **kwargs)

    def compute(self) -> dict[str, int]:
        self._flush()
        return {k: int(getattr(self, k)) for k in COUNTERS}

    def reset(self) -> None:
        super().reset()
        self._pending = dict.fromkeys(COUNTERS, 0)


class LabelCounts(Metric):
    """How often each of ``C`` labels occurred. ``update`` takes a batch's label histogram, which the collator
    counted in the loader worker (``batch["label_counts"]``), and adds it on the host, as :class:`Counters` does:
    no device op in the step. These are the labels after any relabelling (control task, shuffled labels), i.e. the
    ones the heads saw, so the majority baseline of :func:`majority_baseline` is that of the task actually
    trained."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.add_state("counts", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self._pending = [0] * self.num_classes

    def update(self, histogram) -> None:
        """``histogram[i]``: how many labels ``i`` the batch has (shorter than ``C`` when the last ones are absent)."""
        for i, n in enumerate(histogram):
            self._pending[i] += int(n)

    def _flush(self) -> None:
        if any(self._pending):
            self.counts = self.counts + torch.tensor(self._pending, dtype=torch.long, device=self.counts.device)
        self._pending = [0] * self.num_classes

    def sync(self, *args, **kwargs):
        self._flush()  # this rank's host sums join the reduction over ranks
        return super().sync(*args, **kwargs)

    def compute(self) -> list[int]:
        self._flush()
        return [int(c) for c in self.counts.tolist()]

    def reset(self) -> None:
        super().reset()
        self._pending = [0] * self.num_classes


def majority_baseline(train: list[int] | None, test: list[int] | None) -> float | None:
    """Test accuracy of always predicting the most frequent *training* label (the first in label order on
    ties): the majority-class baseline, with the class chosen without looking at the test set. ``None`` if
    either split has no labels."""
    if not train or not test or sum(train) == 0 or sum(test) == 0:
        return None
    k = max(range(len(train)), key=lambda i: (train[i], -i))
    return test[k] / sum(test)


def sum_over_ranks(total: torch.Tensor | None, n: int, device) -> tuple[torch.Tensor | None, float]:
    """A sum and its count over every DDP rank (each rank joins, also one with nothing: ``total=None``); as they are
    without a process group. E.g. the epoch's training loss, summed over pairs: the mean of all ranks' pairs, not
    rank 0's."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return total, float(n)
    both = torch.stack([total.detach().float().reshape(()).to(device) if total is not None
                        else torch.zeros((), device=device), torch.tensor(float(n), device=device)])
    torch.distributed.all_reduce(both)
    return both[0], float(both[1])
