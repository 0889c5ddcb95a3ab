"""Region features of one image, the reader interface and the errors every region-feature format shares.

The formats themselves live in one module each (:mod:`.tsv`, :mod:`.npz`, :mod:`.uniter_lmdb`);
:func:`value_pl.datasets.regions.open_features` picks one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

FORMATS = ("butd_tsv", "lxmert_tsv", "uniter_lmdb", "npz_dir")

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


class FeatureReader:
    """Random access to :class:`RegionFeatures` by (normalised) image id."""

    format = "?"

    def __init__(self, path, feature_dim: int | None = None):
        self.path = Path(path) if not isinstance(path, Path) else path
        self.feature_dim = feature_dim

    def ids(self) -> list[str]:
        return list(self._index)

    def entry(self, image_id) -> tuple[str, object]:
        """(normalised id, this format's index entry); ``KeyError`` naming the source for an unknown image."""
        iid = normalise_id(image_id)
        if iid not in self._index:
            raise KeyError(f"{self.path}: no features for image {image_id}")
        return iid, self._index[iid]

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
