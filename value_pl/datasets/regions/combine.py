"""Combining a dataset's annotated boxes with detected regions (VALUE Sec. 3): IoU matching or supplied rows."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base import FeatureDimError, RegionFeatures


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
    ann_boxes: list = field(default_factory=list)  # the annotated (gold) boxes, pixels, as given
    ann_tags: list = field(default_factory=list)  # their tags

    def gold_boxes(self, tag) -> list:
        """The annotated boxes that carry ``tag`` (e.g. every box of one coreference chain)."""
        return [b for b, t in zip(self.ann_boxes, self.ann_tags) if tag in t]

    def overlapping(self, boxes, threshold: float) -> set[int]:
        """Regions whose box overlaps any of ``boxes`` at IoU >= ``threshold`` (duplicates of a gold object)."""
        if not len(boxes) or not self.boxes:
            return set()
        iou = iou_matrix(np.asarray(self.boxes, np.float64), np.asarray(boxes, np.float64))
        return {int(r) for r in np.nonzero((iou >= threshold).any(1))[0]}


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
    gold = [[float(v) for v in b] for b in ann]
    gold_tags = [list(t) for t in ann_tags]
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
        return Combined(boxes, [sorted(t) for t in tags], source, feats, ann_region, gold, gold_tags)

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
    return Combined(boxes, [sorted(t) for t in tags], source, feats, ann_region, gold, gold_tags)
