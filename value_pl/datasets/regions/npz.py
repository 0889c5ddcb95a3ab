"""Per-image npz records: a directory of ``<image_id>.npz`` (``npz_dir``), and the record decoder that
UNITER's LMDB image db (:mod:`.uniter_lmdb`) shares.

An npz holds ``features`` (N, D) and either ``boxes`` (N, 4 pixels) or ``norm_bb`` (N, >=4 normalised);
optional ``image_w``/``image_h`` and ``conf``. Only ``allow_pickle=False`` loads.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from .base import FeatureError, FeatureReader, RegionFeatures, _check, normalise_id


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

    def get(self, image_id):
        iid, f = self.entry(image_id)
        return _npz_record(f, str(f), self.feature_dim, False, 0, 0, 0, iid)


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
