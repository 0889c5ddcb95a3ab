"""Deterministic, atomic writing of a shard set (tar shards per split + manifest.json)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import webdataset as wds

from ..data.hashing import sha256_path
from ..data.schema import SCHEMA_VERSION, count_pairs, encode_sample, task_types


class ShardSetWriter:
    """Write ``<root>/<split>-NNNNNN.tar`` + ``manifest.json`` atomically.

    Everything goes to ``<root>.partial`` first; :meth:`close` writes the manifest last and renames
    the directory into place, so an interrupted build never leaves a set that looks complete.
    Tar members get a fixed mtime/owner so the same inputs give byte-identical shards.
    """

    def __init__(self, root: str | Path, dataset: str, *, version: str = "1", maxcount: int = 1000,
                 maxsize: float = 256e6, feature_dim: int | None = None):
        self.root = Path(root)
        self.tmp = self.root.with_name(self.root.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dataset, self.version = dataset, version
        self.maxcount, self.maxsize = maxcount, maxsize
        self.feature_dim = feature_dim
        self.splits: dict[str, dict] = {}
        self._metas: dict[str, list[dict]] = {}
        self.skipped: dict[str, int] = {}
        self.excluded: dict[str, int] = {}
        self.control_types: dict[str, dict[str, int]] = {}
        self._split: str | None = None
        self._split_excluded: dict[str, int] = {}
        self.inputs: dict[str, str] = {}
        self.labels: dict[str, list[str]] = {}
        self.extra: dict = {}

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def exclude(self, reason: str, n: int = 1) -> None:
        """Count candidates a builder left out on purpose (e.g. a negative that is the gold object)."""
        if n > 0:
            self.excluded[reason] = self.excluded.get(reason, 0) + n
            self._split_excluded[reason] = self._split_excluded.get(reason, 0) + n

    def add_input(self, path: str | Path, name: str | None = None) -> None:
        self.inputs[name or str(path)] = sha256_path(path)

    def write_split(self, split: str, samples: Iterable[tuple[str, dict, np.ndarray]]) -> int:
        pattern = str(self.tmp / f"{split}-%06d.tar")
        metas: list[dict] = []
        written: list[str] = []
        per_shard: list[int] = []
        max_words = max_regions = 0

        def post(fname):
            written.append(Path(fname).name)
            per_shard.append(int(sw.count))

        sw = wds.ShardWriter(pattern, maxcount=self.maxcount, maxsize=self.maxsize, verbose=0,
                             mtime=0.0, user="value", group="value", post=post)
        n = 0
        types: dict[str, set[str]] = {}
        keys: set[str] = set()
        self._split, self._split_excluded = split, {}
        try:
            for key, meta, feats in samples:
                if key in keys:  # readers group a tar's files by key: two samples of one key would read as one
                    raise ValueError(f"{split}/{key}: duplicate sample key (a builder wrote two samples with it)")
                keys.add(key)
                if self.feature_dim is None and feats.shape[0] > 0:
                    self.feature_dim = int(feats.shape[1])
                if feats.shape[0] > 0 and self.feature_dim is not None and feats.shape[1] != self.feature_dim:
                    raise ValueError(f"{split}/{key}: feature dim {feats.shape[1]} != {self.feature_dim}")
                sw.write(encode_sample(key, meta, feats))
                max_words = max(max_words, len(meta["words"]))
                max_regions = max(max_regions, int(feats.shape[0]))
                metas.append({"pairs": meta.get("pairs", {}), "sentence_labels": meta.get("sentence_labels", {})})
                for task, ts in task_types(meta).items():
                    types.setdefault(task, set()).update(ts)
                n += 1
        finally:
            sw.close()
        if n == 0:  # ShardWriter opened an empty shard; keep it (an empty split is still a split)
            pass
        self._metas[split] = metas
        order = sorted(range(len(written)), key=lambda i: written[i])
        self.splits[split] = {"samples": n, "shards": [written[i] for i in order],
                              "shard_samples": [per_shard[i] for i in order], "max_words": max_words,
                              "max_regions": max_regions,
                              "pairs": count_pairs(metas), "excluded": dict(sorted(self._split_excluded.items()))}
        self.control_types[split] = {t: len(v) for t, v in sorted(types.items())}
        return n

    def manifest(self) -> dict:
        labels = dict(self.labels)
        for s in self.splits.values():
            for task, counts in s["pairs"].items():
                if task not in labels:
                    labels[task] = sorted(set(labels.get(task, [])) | set(counts))
        man = {
            "dataset": self.dataset,
            "version": self.version,
            "schema": SCHEMA_VERSION,
            "feature_dim": self.feature_dim,
            "labels": {k: list(v) for k, v in sorted(labels.items())},
            "splits": self.splits,
            "control_types": self.control_types,
            "excluded": dict(sorted(self.excluded.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "inputs": dict(sorted(self.inputs.items())),
        }
        unseen = labels_not_in_train(self.splits)
        if unseen:  # only when there are some: a label the probers never train on is predicted by none of them
            man["labels_not_in_train"] = unseen
        man.update(self.extra)
        return man

    def close(self) -> dict:
        man = self.manifest()
        (self.tmp / "manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
        if self.root.exists():
            old = self.root.with_name(self.root.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.root, old)
            os.replace(self.tmp, self.root)
            shutil.rmtree(old)
        else:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, self.root)
        return man

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def labels_not_in_train(splits: dict) -> dict[str, dict[str, list[str]]]:
    """``{task: {split: [labels]}}``: labels of a val/test split that no training example has (a prober cannot learn
    them, so those examples count as errors whatever the model knows)."""
    train = (splits.get("train") or {}).get("pairs", {})
    out: dict[str, dict[str, list[str]]] = {}
    for split, s in splits.items():
        if split == "train":
            continue
        for task, counts in s.get("pairs", {}).items():
            missing = sorted(lab for lab, n in counts.items() if n and not train.get(task, {}).get(lab))
            if missing:
                out.setdefault(task, {})[split] = missing
    return out


def report(man: dict) -> str:
    """Short human-readable summary of a manifest."""
    lines = [f"dataset {man['dataset']} (version {man.get('version')}, feature dim {man.get('feature_dim')})"]
    for split, s in man["splits"].items():
        tasks = ", ".join(f"{t}: {sum(c.values())}" for t, c in s["pairs"].items())
        lines.append(f"  {split}: {s['samples']} samples in {len(s['shards'])} shard(s); pairs {tasks or '-'}")
    for split, ct in (man.get("control_types") or {}).items():
        if ct:
            lines.append(f"  {split}: distinct control types " + ", ".join(f"{t}: {n}" for t, n in ct.items()))
    if man.get("excluded"):
        lines.append("  excluded (negatives that are the gold object): "
                     + ", ".join(f"{k} {v}" for k, v in man["excluded"].items()))
    for task, per_split in (man.get("labels_not_in_train") or {}).items():
        lines.append(f"  WARNING {task}: labels with no training example (a prober cannot predict them): "
                     + "; ".join(f"{split}: {', '.join(labs)}" for split, labs in per_split.items()))
    if man.get("skipped"):
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in man["skipped"].items()))
    else:
        lines.append("  skipped: none")
    return "\n".join(lines)
