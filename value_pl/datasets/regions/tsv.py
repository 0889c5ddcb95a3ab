"""Bottom-up-attention TSV (``butd_tsv``) and LXMERT's obj36 TSV (``lxmert_tsv``): reader and line writers.

``butd_tsv``: one image a line, no header, tab-separated ``image_id, image_w, image_h, num_boxes, boxes,
features``; ``boxes``/``features`` are base64 of float32 ``(N, 4)`` pixel x1, y1, x2, y2 and ``(N, D)``.
``lxmert_tsv``: ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
features`` (height BEFORE width). A path may be one file, a directory of ``*.tsv*`` files, or a glob.
Errors name the file and line: truncated lines or base64, wrong column counts, duplicate image ids.
"""
from __future__ import annotations

import base64
import binascii
import glob
from pathlib import Path

import numpy as np

from .base import FeatureError, FeatureReader, RegionFeatures, _check, normalise_id

BUTD_COLUMNS = 6
LXMERT_COLUMNS = 10


def _b64(field: str, dtype, shape_last: int | None, n: int | None, where: str, col: str) -> np.ndarray:
    try:
        raw = base64.b64decode(field.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise FeatureError(f"{where}: column {col}: truncated or invalid base64 ({e})") from None
    item = np.dtype(dtype).itemsize
    if len(raw) % item:
        raise FeatureError(f"{where}: column {col}: {len(raw)} bytes is not a whole number of {np.dtype(dtype).name}")
    a = np.frombuffer(raw, dtype=dtype)
    if n is not None:
        if n == 0:
            return a.reshape(0, shape_last or 0) if shape_last is not None else a[:0]
        if a.size % n:
            raise FeatureError(f"{where}: column {col}: {a.size} values for num_boxes={n} (truncated?)")
        last = a.size // n
        if shape_last is not None and last != shape_last:
            raise FeatureError(f"{where}: column {col}: {last} values per box, expected {shape_last} (truncated?)")
        return a.reshape(n, last)
    return a


def _tsv_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.is_file() and ".tsv" in x.name)
    elif p.exists():
        files = [p]
    else:
        files = sorted(Path(x) for x in glob.glob(str(path)))
    if not files:
        raise FeatureError(f"{path}: no TSV feature file found")
    return files


def _first_line_columns(path: Path) -> int:
    with open(path, "rb") as f:
        line = f.readline()
    if not line.strip():
        raise FeatureError(f"{path}:1: empty first line; cannot detect the feature format")
    return len(line.rstrip(b"\r\n").split(b"\t"))


def _tsv_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        raise FeatureError(f"{path}: a zip/npz file, not a TSV; use a directory of npz files (npz_dir)")
    n = _first_line_columns(path)
    if n == BUTD_COLUMNS:
        return "butd_tsv"
    if n == LXMERT_COLUMNS:
        return "lxmert_tsv"
    raise FeatureError(f"{path}:1: {n} tab-separated columns; expected {BUTD_COLUMNS} (bottom-up-attention TSV) "
                       f"or {LXMERT_COLUMNS} (LXMERT obj36 TSV)")


class TsvReader(FeatureReader):
    """``butd_tsv`` / ``lxmert_tsv``: offsets indexed once (first column only), lines parsed on access."""

    def __init__(self, path, fmt: str, feature_dim: int | None = None):
        super().__init__(path, feature_dim)
        self.format = fmt
        self.ncols = BUTD_COLUMNS if fmt == "butd_tsv" else LXMERT_COLUMNS
        self.files = _tsv_files(path)
        self._index: dict[str, tuple[int, int, int]] = {}  # id -> (file index, offset, line number)
        self._fh: dict[int, object] = {}
        for fi, f in enumerate(self.files):
            cols = _first_line_columns(f)
            if cols != self.ncols:
                other = {BUTD_COLUMNS: "butd_tsv", LXMERT_COLUMNS: "lxmert_tsv"}.get(cols, "unknown")
                raise FeatureError(f"{f}:1: declared format {fmt} has {self.ncols} columns but the file has {cols} "
                                   f"(looks like {other})")
            with open(f, "rb") as fh:
                off, ln = 0, 0
                for line in fh:
                    ln += 1
                    if line.strip():
                        iid = normalise_id(line.split(b"\t", 1)[0].decode("utf-8", "replace"))
                        if iid in self._index:
                            pfi, _, pln = self._index[iid]
                            raise FeatureError(f"{f}:{ln}: duplicate image id {iid} (first at {self.files[pfi]}:{pln})")
                        self._index[iid] = (fi, off, ln)
                    off += len(line)

    def input_paths(self):
        return list(self.files)

    def _line(self, image_id) -> tuple[str, str]:
        fi, off, ln = self.entry(image_id)[1]
        fh = self._fh.get(fi)
        if fh is None:
            fh = self._fh[fi] = open(self.files[fi], "rb")
        fh.seek(off)
        # a corrupt line's non-ASCII bytes fail the base64 check below (FeatureError naming file and line)
        return fh.readline().decode("utf-8", "replace").rstrip("\r\n"), f"{self.files[fi]}:{ln}"

    def get(self, image_id) -> RegionFeatures:
        iid = normalise_id(image_id)
        line, where = self._line(iid)
        cols = line.split("\t")
        if len(cols) != self.ncols:
            raise FeatureError(f"{where}: {len(cols)} columns, expected {self.ncols} for {self.format} (truncated line?)")
        try:
            if self.format == "butd_tsv":
                w, h, n = float(cols[1]), float(cols[2]), int(cols[3])
                bcol, fcol, conf = cols[4], cols[5], None
            else:
                h, w, n = float(cols[1]), float(cols[2]), int(cols[7])
                bcol, fcol = cols[8], cols[9]
                conf = None
        except ValueError as e:
            raise FeatureError(f"{where}: bad size/num_boxes field ({e})") from None
        boxes = _b64(bcol, np.float32, 4, n, where, "boxes")
        feats = _b64(fcol, np.float32, None, n, where, "features")
        if n == 0:
            feats = np.zeros((0, self.feature_dim or 0), np.float32)
        if self.format == "lxmert_tsv":
            conf = _b64(cols[4], np.float32, None, None, where, "objects_conf")
            if conf.size != n:
                raise FeatureError(f"{where}: objects_conf has {conf.size} values for num_boxes={n}")
        rf = RegionFeatures(iid, w, h, boxes.astype(np.float32), feats.astype(np.float32), conf, False, where)
        return _check(rf, self.feature_dim, where)

    def close(self):
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()


def _enc(a: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def butd_tsv_line(image_id, width, height, boxes, feats) -> str:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return "\t".join([str(image_id), str(int(width)), str(int(height)), str(len(boxes)),
                      _enc(boxes, np.float32), _enc(feats, np.float32)])


def lxmert_tsv_line(image_id, width, height, boxes, feats, conf=None) -> str:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    conf = np.ones(n, np.float32) if conf is None else np.asarray(conf, np.float32)
    return "\t".join([str(image_id), str(int(height)), str(int(width)), _enc(np.zeros(n), np.int64),
                      _enc(conf, np.float32), _enc(np.zeros(n), np.int64), _enc(conf, np.float32), str(n),
                      _enc(boxes, np.float32), _enc(feats, np.float32)])
