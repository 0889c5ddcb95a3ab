"""The shard schema (version 1), documented once here and mirrored in ``shards/README.md``.

A shard set is a directory::

    <root>/manifest.json
    <root>/<split>-000000.tar, <split>-000001.tar, ...

Each tar holds WebDataset samples. A sample is two files sharing a ``__key__`` (no dots in it):

``<key>.json``
    .. code-block:: json

        {
          "schema": 1,
          "image": {"id": "1000092795", "width": 500, "height": 375},
          "words": ["Two", "young", "guys", ...],
          "phrases": [{"span": [0, 3], "chain": "1", "types": ["people"], "label": "people"}, ...],
          "regions": {"boxes": [[x1, y1, x2, y2], ...],          # pixels, floats
                      "chains": [["1"], [], ...],                # chain ids an annotated box belongs to
                      "source": ["annotated", "detected", ...]},
          "pairs": {"vcd": [[phrase_index, region_index, "coref"], ...],
                    "vcc": [[phrase_index, region_index, "people"], ...],
                    "vri": [[subject_region, object_region, "related"], ...],
                    "vrc": [[subject_region, object_region, "on"], ...]},
          "sentence_labels": {"sentlen": "3"},                     # sentence-level tasks (SentEval)
          "provenance": {"dataset": "flickr30k_entities", "caption_index": 0, ...}
        }

    ``span`` is ``[start, end)`` over ``words``. A pair is ``[a, b, label]``: for the phrase-region
    tasks (vcd, vcc) ``a`` indexes ``phrases`` and ``b`` indexes regions; for the region-region tasks
    (vri, vrc) both index regions (subject, object). Labels are strings; the class list of each task
    is in ``manifest.json`` (``labels``).

``<key>.npy``
    float16 array ``(num_regions, feature_dim)`` of region features (row ``i`` belongs to box ``i``).
    Text-only samples (SentEval) carry ``(0, feature_dim)``.

No pickle anywhere: only ``.json`` and ``.npy``.

``manifest.json``::

    {"dataset": str, "version": str, "schema": 1, "feature_dim": int,
     "labels": {task: [class names]},
     "splits": {split: {"samples": n, "shards": [file names], "pairs": {task: {label: count}}}},
     "skipped": {reason: count}, "inputs": {path: sha256}}
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

#: tasks whose pairs are (phrase, region)
PHRASE_REGION_TASKS = ("vcd", "vcc")
#: tasks whose pairs are (region, region)
REGION_REGION_TASKS = ("vri", "vrc")
PAIR_TASKS = PHRASE_REGION_TASKS + REGION_REGION_TASKS

#: The 8 coarse Flickr30k Entities types used as VCC classes.
COREF_TYPES = ("people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other")


class SchemaError(ValueError):
    """A sample or manifest that does not follow the shard schema."""


def pair_kind(task: str) -> str:
    if task in PHRASE_REGION_TASKS:
        return "phrase_region"
    if task in REGION_REGION_TASKS:
        return "region_region"
    return "sentence"


def validate_sample(meta: dict, feats: np.ndarray, where: str = "sample") -> None:
    """Raise :class:`SchemaError` naming ``where`` and what is wrong."""
    if meta.get("schema") != SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema {meta.get('schema')!r}, expected {SCHEMA_VERSION}")
    words = meta.get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise SchemaError(f"{where}: 'words' must be a list of non-empty strings")
    img = meta.get("image") or {}
    if not (img.get("width", 0) > 0 and img.get("height", 0) > 0):
        raise SchemaError(f"{where}: image width/height must be positive")
    boxes = meta.get("regions", {}).get("boxes", [])
    if feats.ndim != 2 or feats.shape[0] != len(boxes):
        raise SchemaError(f"{where}: {feats.shape[0] if feats.ndim else '?'} feature rows for {len(boxes)} boxes")
    if feats.dtype != np.float16:
        raise SchemaError(f"{where}: features must be float16, got {feats.dtype}")
    for p in meta.get("phrases", []):
        s, e = p["span"]
        if not (0 <= s < e <= len(words)):
            raise SchemaError(f"{where}: phrase span {p['span']} outside {len(words)} words")
    n_ph, n_reg = len(meta.get("phrases", [])), len(boxes)
    for task, pairs in meta.get("pairs", {}).items():
        na = n_ph if task in PHRASE_REGION_TASKS else n_reg
        for a, b, _ in pairs:
            if not (0 <= a < na and 0 <= b < n_reg):
                raise SchemaError(f"{where}: {task} pair ({a}, {b}) out of range")


def encode_sample(key: str, meta: dict, feats: np.ndarray) -> dict[str, Any]:
    """A sample dict for ``webdataset.TarWriter``/``ShardWriter`` with deterministic bytes."""
    if "." in key:
        raise SchemaError(f"sample key {key!r} contains a dot")
    validate_sample(meta, feats, where=key)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(feats, dtype=np.float16), allow_pickle=False)
    return {
        "__key__": key,
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"),
        "npy": buf.getvalue(),
    }


def decode_sample(sample: dict) -> dict:
    """Raw WebDataset sample (bytes) -> ``{"key", "meta", "feats"}``; errors name the key/shard."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    try:
        meta = json.loads(sample["json"])
        feats = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    except KeyError as e:
        raise SchemaError(f"{url}: sample {key} lacks its .{e.args[0]} file") from None
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise SchemaError(f"{url}: sample {key} could not be decoded: {e}") from e
    return {"key": key, "meta": meta, "feats": feats}


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest.json; build shards with python -m value_pl.datasets.build "
                                f"or python -m value_pl.datasets.demo")
    man = json.loads(path.read_text())
    for k in ("dataset", "splits", "labels"):
        if k not in man:
            raise SchemaError(f"{path}: manifest lacks '{k}'")
    return man


def count_pairs(metas: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for m in metas:
        for task, pairs in m.get("pairs", {}).items():
            d = out.setdefault(task, {})
            for _, _, lab in pairs:
                d[lab] = d.get(lab, 0) + 1
        for task, lab in m.get("sentence_labels", {}).items():
            d = out.setdefault(task, {})
            d[lab] = d.get(lab, 0) + 1
    return {t: dict(sorted(v.items())) for t, v in sorted(out.items())}
