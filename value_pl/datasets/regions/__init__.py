"""Region-feature readers (bottom-up-attention Faster R-CNN outputs) with random access by image id.

Formats (``format=`` name, what :func:`detect_format` looks for):

``butd_tsv``
    bottom-up-attention TSV, one image a line, no header, tab-separated columns
    ``image_id, image_w, image_h, num_boxes, boxes, features``; ``boxes``/``features`` are base64 of
    float32 arrays ``(N, 4)`` (pixel x1, y1, x2, y2) and ``(N, D)``. Detected: 6 columns.
``lxmert_tsv``
    LXMERT's obj36 TSV: ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
    num_boxes, boxes, features`` (height BEFORE width; ids int64, confs float32). Detected: 10 columns.
``uniter_lmdb``
    UNITER's image db: an LMDB directory (``data.mdb``) whose values are compressed npz files with
    ``features`` (N, D) float16, ``norm_bb`` (N, 6: x1/W, y1/H, x2/W, y2/H, w/W, h/H), ``conf`` (N,),
    ``soft_labels``. The number of boxes used is UNITER's ``clip(#(conf > conf_th), min_bb, max_bb)``
    (defaults 0.2, 10, 100). Boxes are normalised: the image size comes from the dataset annotation
    (:meth:`RegionFeatures.in_pixels`). Detected: a directory with ``data.mdb``.
``npz_dir``
    a directory of per-image ``<image_id>.npz`` with ``features`` (N, D) and either ``boxes`` (N, 4
    pixels) or ``norm_bb`` (N, >=4 normalised); optional ``image_w``/``image_h``, ``conf``.
    Detected: a directory of ``.npz`` files.

A TSV path may be one file, a directory of ``*.tsv*`` files, or a glob. Image ids are normalised
(:func:`normalise_id`): all-digit ids lose leading zeros, names such as ``flickr30k_000001000092795.npz``
or ``COCO_val2014_000000000042`` map to their trailing number.

Every problem raises :class:`FeatureError` naming the file and the line (TSV) or record (LMDB key,
npz name): truncated lines or base64, NaN/inf, wrong dimensions, duplicate image ids, a declared
format that does not match the file.
"""
from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from .base import FORMATS, FeatureDimError, FeatureError, FeatureNaNError, FeatureReader, RegionFeatures, normalise_id
from .combine import Combined, combine_regions, iou_matrix
from .npz import NpzDirReader, uniter_npz_bytes
from .tsv import (BUTD_COLUMNS, LXMERT_COLUMNS, TsvReader, _tsv_files, _tsv_format,
                  butd_tsv_line, lxmert_tsv_line)
from .uniter_lmdb import UniterLmdbReader

__all__ = ["FORMATS", "FeatureDimError", "FeatureError", "FeatureNaNError", "FeatureReader", "RegionFeatures",
           "Combined", "combine_regions", "iou_matrix", "normalise_id", "detect_format", "open_features",
           "write_features", "butd_tsv_line", "lxmert_tsv_line", "uniter_npz_bytes", "BUTD_COLUMNS", "LXMERT_COLUMNS"]


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "data.mdb").exists():
            return "uniter_lmdb"
        names = [x.name for x in p.iterdir() if x.is_file()]
        if any(n.endswith(".npz") for n in names):
            return "npz_dir"
        if any(".tsv" in n for n in names):
            return _tsv_format(_tsv_files(p)[0])
        raise FeatureError(f"{path}: directory has no data.mdb, .npz or .tsv files; cannot detect the feature format")
    if not p.exists() and not glob.glob(str(path)):
        raise FeatureError(f"{path}: feature path does not exist")
    return _tsv_format(_tsv_files(path)[0])


def open_features(path, format: str = "auto", feature_dim: int | None = None, **uniter_kw) -> FeatureReader:
    """Open a feature source; ``format`` is declared (one of :data:`FORMATS`) or ``"auto"`` (detected).

    A declared format that does not match the data raises :class:`FeatureError`.
    """
    if format not in FORMATS + ("auto",):
        raise FeatureError(f"{path}: unknown feature format {format!r} (use one of {', '.join(FORMATS)} or auto)")
    p = Path(path)
    if format == "auto":
        format = detect_format(p)
    if format in ("butd_tsv", "lxmert_tsv"):
        if p.is_dir() and (p / "data.mdb").exists():
            raise FeatureError(f"{path}: declared {format} but this is an LMDB directory (uniter_lmdb)")
        return TsvReader(p, format, feature_dim)
    if format == "uniter_lmdb":
        if not p.is_dir():
            raise FeatureError(f"{path}: declared uniter_lmdb but this is not a directory with data.mdb")
        return UniterLmdbReader(p, feature_dim, **uniter_kw)
    if not p.is_dir():
        raise FeatureError(f"{path}: declared npz_dir but this is not a directory")
    return NpzDirReader(p, feature_dim)


def write_features(path, fmt: str, records, map_size: int = 1 << 28) -> Path:
    """Write ``records`` (iterable of ``(image_id, width, height, boxes, feats[, conf])``) in ``fmt``."""
    path = Path(path)
    if fmt in ("butd_tsv", "lxmert_tsv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        line = butd_tsv_line if fmt == "butd_tsv" else lxmert_tsv_line
        with open(path, "w") as f:
            for r in records:
                f.write(line(*r) + "\n")
    elif fmt == "npz_dir":
        path.mkdir(parents=True, exist_ok=True)
        for r in records:
            iid, w, h, boxes, feats = r[:5]
            np.savez_compressed(path / f"{iid}.npz", features=np.asarray(feats, np.float32),
                                boxes=np.asarray(boxes, np.float32), image_w=np.array(w), image_h=np.array(h),
                                **({"conf": np.asarray(r[5], np.float32)} if len(r) > 5 else {}))
    elif fmt == "uniter_lmdb":
        import lmdb

        path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=map_size, subdir=True)
        with env.begin(write=True) as txn:
            for r in records:
                iid, w, h, boxes, feats = r[:5]
                key = f"{iid}.npz"
                txn.put(key.encode(), uniter_npz_bytes(w, h, boxes, feats, r[5] if len(r) > 5 else None))
        env.close()
    else:
        raise ValueError(f"unknown feature format {fmt!r}")
    return path
