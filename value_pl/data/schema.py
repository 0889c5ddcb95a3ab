"""The shard schema (version 2), documented once here and mirrored in ``shards/README.md``; the control-task types.

A shard set is a directory::

    <root>/manifest.json
    <root>/<split>-000000.tar, <split>-000001.tar, ...

Each tar holds WebDataset samples. A sample is two files sharing a ``__key__`` (no dots in it):

``<key>.json``
    .. code-block:: json

        {
          "schema": 2,
          "image": {"id": "1000092795", "width": 500, "height": 375},
          "words": ["Two", "young", "guys", ...],
          "phrases": [{"span": [0, 3], "chain": "1", "types": ["people"], "label": "people"}, ...],
          "regions": {"boxes": [[x1, y1, x2, y2], ...],          # pixels, floats
                      "chains": [["1"], [], ...],                # chain ids / VG object ids a box carries
                      "source": ["annotated", "detected", ...],
                      "names": [["people"], ["<unknown>"], ...], # what each region is (see below)
                      "synsets": [[], [], ...]},                 # VG WordNet synsets (optional)
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

    ``regions.names`` (new in schema 2) says what each region *is*, as a sorted list of normalised
    names (lower case, whitespace collapsed; never empty): Visual Genome: the names of the objects the
    region carries (an object's ``names[0]``, or ``name``); Flickr30k Entities: the coarse types of the
    coreference chains the region carries (``people``, ``clothing``, ...; a region has no object name
    there, and a phrase names it differently in every caption, so the chain's types are its identity);
    a region that carries no annotation (a detection matched to nothing): ``[UNKNOWN_REGION]``
    (``"<unknown>"``). ``regions.synsets``: VG's WordNet synsets of those objects (other datasets: empty).

``<key>.npy``
    float16 array ``(num_regions, feature_dim)`` of region features (row ``i`` belongs to box ``i``).
    Text-only samples (SentEval) carry ``(0, feature_dim)``.

No pickle anywhere: only ``.json`` and ``.npy``.

``manifest.json``::

    {"dataset": str, "version": str, "schema": 2, "feature_dim": int,
     "labels": {task: [class names]},
     "splits": {split: {"samples": n, "shards": [file names], "pairs": {task: {label: count}},
                        "excluded": {reason: count}}},
     "control_types": {split: {task: number of distinct control types (see pair_type)}},
     "excluded": {reason: count}, "skipped": {reason: count}, "inputs": {path: sha256}}

``excluded`` counts candidate negatives the builders did not use because they are the gold object
(``vcd_negative_overlaps_chain``: a region at IoU >= ``iou_threshold`` with a box of the phrase's own
chain; ``vri_negative_overlaps_related``: a region pair that is, up to IoU >= ``iou_threshold``, a
related pair; ``vri_negative_same_object``: two boxes of one object, a detection at IoU >= ``iou_threshold`` with
the other region).

Control-task types (Hewitt & Liang 2019: the type of an example is the identity of its items)
----------------------------------------------------------------------------------------------
:func:`pair_type` is the one definition; the builders count types with it (``control_types``) and
:mod:`value_pl.protocols.control` draws one control label per type:

* region-region (vri, vrc): ``rel:<identity of subject>|<identity of object>``, e.g. ``rel:man|hat``;
* phrase-region (vcd, vcc): ``phrase:<lower-cased phrase words>|<identity of region>``,
  e.g. ``phrase:a red shirt|clothing``;
* sentence (SentEval): ``sent:<lower-cased first word>|<number of words>``;

where the identity of a region is ``"+".join(regions.names[r])`` (``<unknown>`` for a region with no
annotation).
"""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

try:  # a C JSON parser: the sample metadata (boxes as floats) is the largest cost of decoding
    from orjson import loads as _json_loads
except ImportError:  # pragma: no cover - orjson is a dependency; plain json gives the same objects
    def _json_loads(data):  # (json.loads takes no memoryview: a mapped shard's member, value_pl.data.stream)
        return json.loads(bytes(data) if isinstance(data, memoryview) else data)

SCHEMA_VERSION = 2
#: what ``regions.names`` holds for a region that carries no annotation
UNKNOWN_REGION = "<unknown>"
#: how to rebuild a shard set (named in the error for an old schema)
REBUILD_HINT = ("rebuild it with python -m value_pl.datasets.build dataset=<flickr30k|vg|vg_mismatch|senteval|"
                "senteval_derived> ... (or python -m value_pl.datasets.demo for the demo shards)")

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


def normalise_name(name) -> str:
    """Object names as region identities: lower case, whitespace collapsed (``" Tennis  Ball"`` -> ``"tennis ball"``)."""
    return " ".join(str(name or "").lower().split())


def region_names(names) -> list[str]:
    """Sorted, unique, normalised names of one region; ``[UNKNOWN_REGION]`` when there is none."""
    out = sorted({n for n in (normalise_name(x) for x in names or ()) if n})
    return out or [UNKNOWN_REGION]


def region_identity(meta: dict, r: int) -> str:
    """What region ``r`` is: its names joined by ``+`` (``"man"``, ``"man+person"``, ``"<unknown>"``)."""
    names = (meta.get("regions") or {}).get("names") or []
    if r >= len(names):
        raise SchemaError(f"sample has no regions.names entry for region {r} (schema {meta.get('schema')!r}; "
                          f"{REBUILD_HINT})")
    return "+".join(names[r])


def pair_type(kind: str, meta: dict, pair=None) -> str:
    """The control-task type of one example (module docstring): a function of its inputs' identities only."""
    if kind == "region_region":
        return f"rel:{region_identity(meta, pair[0])}|{region_identity(meta, pair[1])}"
    if kind == "phrase_region":
        s, e = meta["phrases"][pair[0]]["span"]
        words = " ".join(w.lower() for w in meta["words"][s:e])
        return f"phrase:{words}|{region_identity(meta, pair[1])}"
    if kind == "sentence":
        w = meta.get("words") or [""]
        return f"sent:{w[0].lower()}|{len(w)}"
    raise ValueError(f"no control type for task kind {kind!r}")


def task_types(meta: dict) -> dict[str, set[str]]:
    """``{task: {control types}}`` of one sample's pairs and sentence labels."""
    out: dict[str, set[str]] = {}
    for task, pairs in (meta.get("pairs") or {}).items():
        kind = pair_kind(task)
        out.setdefault(task, set()).update(pair_type(kind, meta, p) for p in pairs)
    for task in meta.get("sentence_labels") or {}:
        out.setdefault(task, set()).add(pair_type("sentence", meta))
    return out


def _check_regions(meta: dict, n_reg: int, where: str) -> None:
    reg = meta.get("regions") or {}
    names = reg.get("names")
    if not isinstance(names, list) or len(names) != n_reg:
        raise SchemaError(f"{where}: regions.names must list the names of each of the {n_reg} regions "
                          f"(got {type(names).__name__} of {len(names) if isinstance(names, list) else '?'})")
    for r, ns in enumerate(names):
        if not (isinstance(ns, list) and ns and all(isinstance(n, str) and n for n in ns)):
            raise SchemaError(f"{where}: regions.names[{r}] must be a non-empty list of names "
                              f"(use [{UNKNOWN_REGION!r}] for a region without annotation), got {ns!r}")
    syn = reg.get("synsets")
    if syn is not None and (not isinstance(syn, list) or len(syn) != n_reg):
        raise SchemaError(f"{where}: regions.synsets must have one list per region ({n_reg})")


def validate_sample(meta: dict, feats: np.ndarray, where: str = "sample") -> None:
    """Raise :class:`SchemaError` naming ``where`` and what is wrong."""
    if meta.get("schema") != SCHEMA_VERSION:
        raise SchemaError(f"{where}: shard schema {meta.get('schema')!r}, this version reads schema {SCHEMA_VERSION}; "
                          f"{REBUILD_HINT}")
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
    _check_regions(meta, n_reg, where)
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


_NPY_HEADER = re.compile(rb"""\{'descr': '([<>|][a-zA-Z][0-9]{0,2})', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), *\}""")


def npy_array(buf: bytes) -> np.ndarray:
    """An ``.npy`` file's array without pickle: a read-only view of ``buf`` for the plain C-ordered arrays our
    writers produce (no copy, no ``ast`` parse of the header), ``np.load(allow_pickle=False)`` otherwise."""
    if buf[:6] == b"\x93NUMPY" and len(buf) > 10:
        major = buf[6]
        hlen, start = ((int.from_bytes(buf[8:10], "little"), 10) if major == 1
                       else (int.from_bytes(buf[8:12], "little"), 12))
        m = _NPY_HEADER.match(buf, start, start + hlen)
        if m and m.group(2) == b"False":
            dtype = np.dtype(m.group(1).decode())
            shape = tuple(int(x) for x in m.group(3).split(b",") if x.strip())
            n = int(np.prod(shape)) if shape else 1
            if dtype.kind in "biuf" and len(buf) - start - hlen == n * dtype.itemsize:
                return np.frombuffer(buf, dtype=dtype, count=n, offset=start + hlen).reshape(shape)
    return np.load(io.BytesIO(buf), allow_pickle=False)


def _feature_problem(feats: np.ndarray, boxes, feature_dim: int | None) -> str:
    """What is wrong with a sample's features (the slow path of :func:`decode_sample`'s check)."""
    if boxes is None:
        return "regions must be an object (with boxes, names, ...)"
    if type(boxes) is not list:
        return f"regions.boxes must be a list of boxes, got {type(boxes).__name__}"
    if feats.ndim != 2:
        return f"features must be a 2-d array (regions x feature_dim), got shape {feats.shape}"
    if feats.shape[0] != len(boxes):
        return f"{feats.shape[0]} feature row(s) for {len(boxes)} box(es)"
    if feats.dtype != np.float16:
        return f"features must be float16, got {feats.dtype}"
    return f"features of width {feats.shape[1]}, but manifest.json says feature_dim={feature_dim}"


def decode_sample(sample: dict, feature_dim: int | None = None) -> dict:
    """Raw WebDataset sample (each file as bytes or a memoryview) -> ``{"key", "meta", "feats"}``; errors name the
    key/shard.

    The full :func:`validate_sample` is the writers' check; here only what the collator relies on, at the cost of a
    few comparisons: a 2-d float16 array with one row per box, of width ``feature_dim`` (the manifest's, when known;
    an empty ``(0, 0)`` array is accepted for a sample without regions, as the writers do)."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", "?")
    try:
        meta = _json_loads(sample["json"])
        feats = npy_array(sample["npy"])
    except KeyError as e:
        raise SchemaError(f"{url}: sample {key} lacks its .{e.args[0]} file") from None
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise SchemaError(f"{url}: sample {key} could not be decoded: {e}") from e
    if type(meta) is not dict:
        raise SchemaError(f"{url}: sample {key}: .json holds a {type(meta).__name__}, not an object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise SchemaError(f"{url}: sample {key} has shard schema {meta.get('schema')!r}, this version reads schema "
                          f"{SCHEMA_VERSION}; {REBUILD_HINT}")
    reg = meta.get("regions")
    boxes = [] if reg is None else reg.get("boxes", []) if type(reg) is dict else None
    shape = feats.shape
    if (len(shape) != 2 or type(boxes) is not list or shape[0] != len(boxes) or feats.dtype != np.float16
            or (feature_dim and shape[1] != feature_dim and (shape[0] or shape[1]))):
        raise SchemaError(f"{url}: sample {key}: {_feature_problem(feats, boxes, feature_dim)}")
    return {"key": key, "meta": meta, "feats": feats}


def load_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest.json; build shards with python -m value_pl.datasets.build "
                                f"or python -m value_pl.datasets.demo")
    man = json.loads(path.read_text())
    if man.get("schema") != SCHEMA_VERSION:
        what = ("a feature cache extracted from shards" if man.get("cache") else "a shard set")
        raise SchemaError(f"{path}: {what} of schema {man.get('schema')!r}; this version reads schema {SCHEMA_VERSION} "
                          f"(regions.names, control_types). Old shards would give wrong control tasks: "
                          f"{REBUILD_HINT}" + (" and re-extract the cache with python -m value_pl.extract"
                                               if man.get("cache") else ""))
    for k in ("dataset", "splits", "labels"):
        if k not in man:
            raise SchemaError(f"{path}: manifest lacks '{k}'")
    return man


def control_types(man: dict, split: str, task: str, root="?") -> int:
    """Distinct control types of ``task`` in ``split`` as the builder counted them (``manifest.control_types``)."""
    ct = man.get("control_types")
    if ct is None:
        raise SchemaError(f"{root}/manifest.json has no control_types; {REBUILD_HINT}")
    return int((ct.get(split) or {}).get(task, 0))


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
