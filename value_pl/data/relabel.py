"""Label transforms applied at collate time (picklable: they run in loader workers)."""
from __future__ import annotations

import bisect
import hashlib


def _unit(*parts) -> float:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


class ShuffledLabels:
    """Replace every label by one drawn, independently of the input, from the task's label distribution.

    Deterministic per (seed, sample key, pair index): a sanity baseline with no learnable signal, so a
    prober trained on it must stay near the majority/chance level.
    """

    def __init__(self, counts: dict[str, int], seed: int = 0):
        items = sorted((k, v) for k, v in counts.items() if v > 0)
        if not items:
            raise ValueError("ShuffledLabels needs non-empty label counts")
        total = sum(v for _, v in items)
        self.labels = [k for k, _ in items]
        acc, self.cum = 0, []
        for _, v in items:
            acc += v
            self.cum.append(acc / total)
        self.seed = seed

    def __call__(self, key: str, j: int, label: str) -> str:
        u = _unit("shuffle", self.seed, key, j)
        return self.labels[min(bisect.bisect_right(self.cum, u), len(self.labels) - 1)]
