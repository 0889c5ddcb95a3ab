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

import base64
import binascii
import glob
import io
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

FORMATS = ("butd_tsv", "lxmert_tsv", "uniter_lmdb", "npz_dir")
BUTD_COLUMNS = 6
LXMERT_COLUMNS = 10


class FeatureError(ValueError):
    """A region-feature file that cannot be read as declared (message names file and line/record)."""


class FeatureDimError(FeatureError):
    """Feature dimension differs from the configured ``feature_dim`` (a configuration error)."""


class FeatureNaNError(FeatureError):
    """NaN/inf in a record's features or boxes."""


@dataclass
class RegionFeatures:
    """Detections of one image. ``boxes`` are pixel x1, y1, x2, y2 unless ``normalized``."""

    image_id: str
    width: float | None
    height: float | None
    boxes: np.ndarray  # (N, 4) float32
    features: np.ndarray  # (N, D) float32
    conf: np.ndarray | None = None
    normalized: bool = False
    where: str = ""

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def in_pixels(self, width: float, height: float) -> "RegionFeatures":
        """Boxes in pixels of an image of size ``width`` x ``height`` (the dataset's annotation size).

        Normalised boxes are scaled by the size; pixel boxes recorded for a different image size
        (features extracted on a resized copy) are rescaled to it.
        """
        b = self.boxes.astype(np.float32, copy=True)
        if self.normalized:
            b *= np.array([width, height, width, height], dtype=np.float32)
        elif self.width and self.height and (abs(self.width - width) > 0.5 or abs(self.height - height) > 0.5):
            b *= np.array([width / self.width, height / self.height] * 2, dtype=np.float32)
        return replace(self, boxes=b, width=float(width), height=float(height), normalized=False)


def normalise_id(name: str) -> str:
    """``"000123"`` -> ``"123"``; ``"flickr30k_000001000092795.npz"`` -> ``"1000092795"``; else the stem."""
    s = str(name).strip()
    for ext in (".npz", ".npy", ".jpg", ".png"):
        if s.endswith(ext):
            s = s[: -len(ext)]
    if s.isdigit():
        return str(int(s))
    m = re.search(r"(\d+)$", s)
    if m:
        return str(int(m.group(1)))
    return s


def _check(rf: RegionFeatures, feature_dim: int | None, where: str) -> RegionFeatures:
    f, b = rf.features, rf.boxes
    if f.ndim != 2 or b.ndim != 2 or b.shape[1] != 4 or f.shape[0] != b.shape[0]:
        raise FeatureError(f"{where}: features {f.shape} and boxes {b.shape} do not match (expected (N, D), (N, 4))")
    if feature_dim is not None and f.shape[0] > 0 and f.shape[1] != feature_dim:
        raise FeatureDimError(f"{where}: feature dimension {f.shape[1]}, expected feature_dim={feature_dim}")
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).any(1).sum())
        raise FeatureNaNError(f"{where}: NaN/inf in the features of {bad} region(s)")
    if not np.isfinite(b).all():
        raise FeatureNaNError(f"{where}: NaN/inf in the boxes")
    return rf


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


class FeatureReader:
    """Random access to :class:`RegionFeatures` by (normalised) image id."""

    format = "?"

    def __init__(self, path, feature_dim: int | None = None):
        self.path = Path(path) if not isinstance(path, Path) else path
        self.feature_dim = feature_dim

    def ids(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, image_id) -> bool:
        return normalise_id(image_id) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, image_id) -> RegionFeatures:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def input_paths(self) -> list[Path]:
        return [self.path]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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

    def ids(self):
        return list(self._index)

    def _line(self, image_id) -> tuple[str, str]:
        fi, off, ln = self._index[normalise_id(image_id)]
        fh = self._fh.get(fi)
        if fh is None:
            fh = self._fh[fi] = open(self.files[fi], "rb")
        fh.seek(off)
        return fh.readline().decode("utf-8").rstrip("\r\n"), f"{self.files[fi]}:{ln}"

    def get(self, image_id) -> RegionFeatures:
        iid = normalise_id(image_id)
        if iid not in self._index:
            raise KeyError(f"{self.path}: no features for image {image_id}")
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


def _npz_record(data: bytes | Path, where: str, feature_dim, uniter: bool, conf_th: float, min_bb: int,
                max_bb: int, iid: str) -> RegionFeatures:
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with np.load(src, allow_pickle=False) as z:
            arrs = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise FeatureError(f"{where}: not a readable npz ({type(e).__name__}: {e}); UNITER img_db values must be "
                           f"compressed npz (msgpack-dumped dbs are not supported)") from None
    if "features" not in arrs:
        raise FeatureError(f"{where}: npz lacks 'features' (has {sorted(arrs)})")
    feats = np.asarray(arrs["features"], dtype=np.float32)
    conf = np.asarray(arrs["conf"], dtype=np.float32).reshape(-1) if "conf" in arrs else None
    width = float(arrs["image_w"]) if "image_w" in arrs else None
    height = float(arrs["image_h"]) if "image_h" in arrs else None
    if "boxes" in arrs:
        boxes, normalized = np.asarray(arrs["boxes"], dtype=np.float32), False
    elif "norm_bb" in arrs:
        nb = np.asarray(arrs["norm_bb"], dtype=np.float32)
        if nb.ndim != 2 or nb.shape[1] < 4:
            raise FeatureError(f"{where}: norm_bb has shape {nb.shape}, expected (N, 6)")
        boxes, normalized = nb[:, :4].copy(), True
    else:
        raise FeatureError(f"{where}: npz has neither 'boxes' nor 'norm_bb' (has {sorted(arrs)})")
    if feats.ndim != 2 or boxes.shape[0] != feats.shape[0]:
        raise FeatureError(f"{where}: {feats.shape[0] if feats.ndim else '?'} feature rows for {boxes.shape[0]} boxes")
    if conf is not None and conf.shape[0] != feats.shape[0]:
        raise FeatureError(f"{where}: conf has {conf.shape[0]} values for {feats.shape[0]} boxes")
    if uniter:
        if conf is None:
            raise FeatureError(f"{where}: UNITER img_db record lacks 'conf' (needed for the box count)")
        nbb = int(np.clip(int((conf > conf_th).sum()), min_bb, max_bb))
        nbb = min(nbb, feats.shape[0])
        feats, boxes, conf = feats[:nbb], boxes[:nbb], conf[:nbb]
    rf = RegionFeatures(iid, width, height, boxes, feats, conf, normalized, where)
    return _check(rf, feature_dim, where)


class NpzDirReader(FeatureReader):
    format = "npz_dir"

    def __init__(self, path, feature_dim=None):
        super().__init__(path, feature_dim)
        self._index: dict[str, Path] = {}
        for f in sorted(Path(path).glob("*.npz")):
            iid = normalise_id(f.name)
            if iid in self._index:
                raise FeatureError(f"{f}: duplicate image id {iid} (also {self._index[iid].name})")
            self._index[iid] = f
        if not self._index:
            raise FeatureError(f"{path}: no .npz files")

    def ids(self):
        return list(self._index)

    def get(self, image_id):
        iid = normalise_id(image_id)
        if iid not in self._index:
            raise KeyError(f"{self.path}: no features for image {image_id}")
        f = self._index[iid]
        return _npz_record(f, str(f), self.feature_dim, False, 0, 0, 0, iid)


class UniterLmdbReader(FeatureReader):
    format = "uniter_lmdb"

    def __init__(self, path, feature_dim=None, conf_th: float = 0.2, min_bb: int = 10, max_bb: int = 100):
        super().__init__(path, feature_dim)
        import lmdb

        if not (Path(path) / "data.mdb").exists():
            raise FeatureError(f"{path}: declared uniter_lmdb but there is no data.mdb in it")
        self.conf_th, self.min_bb, self.max_bb = conf_th, min_bb, max_bb
        self.env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
        self._index: dict[str, bytes] = {}
        with self.env.begin() as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                name = bytes(k).decode("utf-8", "replace")
                iid = normalise_id(name)
                if iid in self._index:
                    raise FeatureError(f"{path}: record {name}: duplicate image id {iid} "
                                       f"(also {self._index[iid].decode()})")
                self._index[iid] = bytes(k)

    def ids(self):
        return list(self._index)

    def get(self, image_id):
        iid = normalise_id(image_id)
        if iid not in self._index:
            raise KeyError(f"{self.path}: no features for image {image_id}")
        key = self._index[iid]
        with self.env.begin() as txn:
            data = txn.get(key)
        where = f"{self.path} record {key.decode()}"
        return _npz_record(bytes(data), where, self.feature_dim, True, self.conf_th, self.min_bb, self.max_bb, iid)

    def input_paths(self):
        return [Path(self.path) / "data.mdb"]

    def close(self):
        self.env.close()


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


# ------------------------------------------------------------------ writers (fixtures, conversions)
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


def uniter_npz_bytes(width, height, boxes, feats, conf=None, n_classes: int = 1601) -> bytes:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    W, H = float(width), float(height)
    nb = np.stack([boxes[:, 0] / W, boxes[:, 1] / H, boxes[:, 2] / W, boxes[:, 3] / H,
                   (boxes[:, 2] - boxes[:, 0]) / W, (boxes[:, 3] - boxes[:, 1]) / H], 1) if n else np.zeros((0, 6))
    conf = np.ones(n, np.float32) if conf is None else np.asarray(conf, np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, features=np.asarray(feats, np.float16), norm_bb=nb.astype(np.float16),
                        conf=conf.astype(np.float16), soft_labels=np.zeros((n, n_classes), np.float16))
    return buf.getvalue()


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


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4); pixel x1, y1, x2, y2."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)



@dataclass
class Combined:
    """Regions of one sample: annotated boxes combined with detected regions (see :func:`combine_regions`)."""

    boxes: list  # [[x1, y1, x2, y2]] pixels
    tags: list  # per region: sorted list of annotation tags (chain ids / object ids)
    source: list  # "annotated" | "detected"
    feats: np.ndarray  # (R, D) float32
    ann_region: list  # per annotated box: its region index, or None (unmatched / cut by max_regions)


def combine_regions(ann_boxes, ann_tags, detected: RegionFeatures, *, iou_threshold: float = 0.5,
                    max_regions: int = 36, supplied: RegionFeatures | None = None,
                    supplied_iou: float = 0.9) -> Combined:
    """Combine a dataset's annotated boxes with detected regions, as VALUE does (Sec. 3).

    ``ann_boxes`` (A, 4) pixels; ``ann_tags[i]`` the tags (e.g. chain ids) of box ``i``.

    * ``supplied is None`` (**match** mode): each annotated box is matched to the detected region with
      the highest IoU if that IoU >= ``iou_threshold``; a matched region takes the union of the tags of
      the boxes matched to it (its box stays the detector's box, whose features these are). Regions
      kept: all matched ones, then unmatched detections in detector order, up to ``max_regions``,
      output in detector order.
    * ``supplied`` given (features extracted for the annotated boxes): each annotated box takes the
      supplied row with the highest IoU (>= ``supplied_iou``); identical annotated boxes are merged;
      the annotated regions come first (their own boxes), then detections in detector order, up to
      ``max_regions`` in total.
    """
    ann = np.asarray(ann_boxes, np.float32).reshape(-1, 4)
    A = len(ann)
    ann_region: list = [None] * A
    D = detected.features.shape[1] if detected.features.ndim == 2 else 0
    if supplied is None:
        iou = iou_matrix(ann, detected.boxes)
        match = {}
        for i in range(A):
            if iou.shape[1] and iou[i].max() >= iou_threshold:
                match[i] = int(iou[i].argmax())
        matched = sorted(set(match.values()))
        if len(matched) > max_regions:
            matched = matched[:max_regions]
        keep = set(matched)
        for j in range(detected.num_boxes):
            if len(keep) >= max_regions:
                break
            keep.add(j)
        order = sorted(keep)
        pos = {j: r for r, j in enumerate(order)}
        tags = [set() for _ in order]
        for i, j in match.items():
            if j in pos:
                ann_region[i] = pos[j]
                tags[pos[j]].update(ann_tags[i])
        boxes = [[float(v) for v in detected.boxes[j]] for j in order]
        source = ["annotated" if tags[r] else "detected" for r in range(len(order))]
        feats = detected.features[order] if order else np.zeros((0, D), np.float32)
        return Combined(boxes, [sorted(t) for t in tags], source, feats, ann_region)

    # supplied features for the annotated boxes
    iou = iou_matrix(ann, supplied.boxes)
    uniq: dict[tuple, int] = {}
    boxes, tags, feats_rows = [], [], []
    for i in range(A):
        if not iou.shape[1] or iou[i].max() < supplied_iou:
            continue
        key = tuple(round(float(v), 2) for v in ann[i])
        if key not in uniq:
            if len(boxes) >= max_regions:
                continue
            uniq[key] = len(boxes)
            boxes.append([float(v) for v in ann[i]])
            tags.append(set())
            feats_rows.append(supplied.features[int(iou[i].argmax())])
        ann_region[i] = uniq[key]
        tags[uniq[key]].update(ann_tags[i])
    n_ann = len(boxes)
    fill = list(range(min(detected.num_boxes, max(0, max_regions - n_ann))))
    boxes += [[float(v) for v in detected.boxes[j]] for j in fill]
    tags += [set() for _ in fill]
    source = ["annotated"] * n_ann + ["detected"] * len(fill)
    Ds = supplied.features.shape[1] if supplied.features.ndim == 2 and supplied.features.shape[0] else D
    if D and Ds and D != Ds:
        raise FeatureDimError(f"{supplied.where}: supplied features have dimension {Ds}, detected {D}")
    rows = feats_rows + [detected.features[j] for j in fill]
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, D or Ds), np.float32)
    return Combined(boxes, [sorted(t) for t in tags], source, feats, ann_region)
