"""UNITER's image db (``uniter_lmdb``): an LMDB directory (``data.mdb``) of compressed npz records.

Each value holds ``features`` (N, D) float16, ``norm_bb`` (N, 6: x1/W, y1/H, x2/W, y2/H, w/W, h/H), ``conf``
and ``soft_labels``. The number of boxes used is UNITER's ``clip(#(conf > conf_th), min_bb, max_bb)``
(defaults 0.2, 10, 100); boxes are normalised, so the image size comes from the dataset annotation.
"""
from __future__ import annotations

from pathlib import Path

from .base import FeatureError, FeatureReader, normalise_id
from .npz import _npz_record


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

    def get(self, image_id):
        iid, key = self.entry(image_id)
        with self.env.begin() as txn:
            data = txn.get(key)
        where = f"{self.path} record {key.decode()}"
        return _npz_record(bytes(data), where, self.feature_dim, True, self.conf_th, self.min_bb, self.max_bb, iid)

    def input_paths(self):
        return [Path(self.path) / "data.mdb"]

    def close(self):
        self.env.close()
