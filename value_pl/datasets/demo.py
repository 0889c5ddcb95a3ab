"""Synthetic demo shards with planted signal: ``python -m value_pl.datasets.demo [--out shards/demo]``.

Full-size rehearsal: ``--train 8000 --val 1000 --test 1000 --regions 36 --feature-dim 2048`` (BUTD-like width).

A smoke test, not a result. Each sample is a synthetic scene written in exactly the schema the real
builders write (:mod:`value_pl.data.schema`):

* 3-5 annotated objects of distinct classes, each with a pixel box, plus "detected" background
  regions up to ``num_regions``; region features are fp16 ``class prototype + noise`` (background
  regions: noise around their own random prototype), so features carry the object class;
* a templated caption whose noun phrases name the objects (coreference chains, coarse Flickr30k
  types as VCC labels), and an equal number of VCD positives and negatives;
* visual relations between annotated objects that depend on the object types and on geometry
  (``on``/``under``/``next to`` from the box layout, ``wearing``/``holding``/``riding``/... from the
  type pair), VRI negatives between unrelated regions;
* ``regions.names``: the object's class name (``man``, ``dog``, ...) for annotated regions, ``<unknown>``
  for background regions, so control tasks have one type per class (pair).

The same seed gives the same bytes (fixed tar mtimes/owners, sorted JSON, seeded numpy).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..data.schema import COREF_TYPES, SCHEMA_VERSION, UNKNOWN_REGION
from .regions import iou_matrix
from .writer import ShardSetWriter, report

CLASSES = [
    ("man", "people"), ("woman", "people"), ("child", "people"),
    ("dog", "animals"), ("horse", "animals"),
    ("shirt", "clothing"), ("hat", "clothing"),
    ("hand", "bodyparts"),
    ("guitar", "instruments"),
    ("bicycle", "vehicles"), ("car", "vehicles"),
    ("street", "scene"), ("beach", "scene"),
    ("table", "other"), ("ball", "other"),
]
ADJ = ["small", "large", "red", "blue", "old", "young", "white", "black"]
VERBS = ["is near", "stands by", "is seen with", "appears beside"]
TYPE_PREDICATE = {
    ("people", "clothing"): "wearing",
    ("people", "instruments"): "playing",
    ("people", "vehicles"): "riding",
    ("people", "animals"): "petting",
    ("people", "other"): "holding",
    ("animals", "scene"): "running on",
    ("people", "scene"): "standing in",
}
PREDICATES = ["on", "under", "next to"] + sorted(set(TYPE_PREDICATE.values()))

SPLITS = {"train": 640, "val": 160, "test": 160}
FEATURE_DIM = 64
NUM_REGIONS = 10
MAXCOUNT = 400


def _box(rng: np.random.Generator, W: int, H: int) -> list[float]:
    w = rng.uniform(0.15, 0.45) * W
    h = rng.uniform(0.15, 0.45) * H
    x1 = rng.uniform(0, W - w)
    y1 = rng.uniform(0, H - h)
    return [round(float(x1), 1), round(float(y1), 1), round(float(x1 + w), 1), round(float(y1 + h), 1)]


def _geometry(bs: list[float], bo: list[float]) -> str:
    cxs, cys = (bs[0] + bs[2]) / 2, (bs[1] + bs[3]) / 2
    cxo, cyo = (bo[0] + bo[2]) / 2, (bo[1] + bo[3]) / 2
    dx, dy = cxo - cxs, cyo - cys
    if abs(dy) > abs(dx):
        return "on" if dy > 0 else "under"  # subject above object (smaller y) -> on
    return "next to"


def make_scene(rng: np.random.Generator, protos: np.ndarray, bg_protos: np.ndarray, idx: int, split: str,
               num_regions: int = NUM_REGIONS):
    feature_dim = protos.shape[1]
    W, H = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    n_obj = int(rng.integers(3, 6))
    classes = rng.choice(len(CLASSES), size=n_obj, replace=False)
    boxes = [_box(rng, W, H) for _ in range(num_regions)]
    feats = np.empty((num_regions, feature_dim), dtype=np.float32)
    for r in range(num_regions):
        proto = protos[classes[r]] if r < n_obj else bg_protos[int(rng.integers(len(bg_protos)))]
        feats[r] = np.maximum(proto + 0.35 * rng.standard_normal(feature_dim), 0.0)
    order = rng.permutation(num_regions)  # annotated regions are not always first
    boxes = [boxes[i] for i in order]
    feats = feats[order]
    obj_region = {o: int(np.where(order == o)[0][0]) for o in range(n_obj)}

    # caption: "a <adj> <c0> <verb> a <c1> [and a <c2> ...] ."
    words: list[str] = []
    phrases = []
    for o in range(n_obj):
        name, ctype = CLASSES[classes[o]]
        if o == 1:
            words += rng.choice(VERBS).split()
        elif o > 1:
            words.append("and")
        start = len(words)
        det = "the" if ctype == "scene" else "a"
        if rng.random() < 0.6:
            words += [det, str(rng.choice(ADJ)), name]
        else:
            words += [det, name]
        phrases.append({"span": [start, len(words)], "chain": str(o + 1), "types": [ctype], "label": ctype})
    words.append(".")
    chains = [[] for _ in range(num_regions)]
    source = ["detected"] * num_regions
    names = [[UNKNOWN_REGION] for _ in range(num_regions)]
    for o in range(n_obj):
        chains[obj_region[o]] = [str(o + 1)]
        source[obj_region[o]] = "annotated"
        names[obj_region[o]] = [CLASSES[classes[o]][0]]
    # as the real builders: a region at IoU >= 0.5 with the gold box is never a negative
    same = iou_matrix(np.array(boxes), np.array(boxes)) >= 0.5
    ann = [obj_region[o] for o in range(n_obj)]

    vcd, vcc = [], []
    for p, ph in enumerate(phrases):
        pos = obj_region[p]
        vcd.append([p, pos, "coref"])
        vcc.append([p, pos, ph["label"]])
        neg = [r for r in range(num_regions) if not same[pos, r]]
        if neg:
            vcd.append([p, int(rng.choice(neg)), "not_coref"])

    vrc, vri = [], []
    rel_pairs = [(s, o) for s in range(n_obj) for o in range(n_obj) if s != o]
    rng.shuffle(rel_pairs)
    for s, o in rel_pairs[:6]:
        ts, to = CLASSES[classes[s]][1], CLASSES[classes[o]][1]
        pred = TYPE_PREDICATE.get((ts, to)) or _geometry(boxes[obj_region[s]], boxes[obj_region[o]])
        rs, ro = obj_region[s], obj_region[o]
        vrc.append([rs, ro, pred])
        vri.append([rs, ro, "related"])
        # a negative: the subject with a background region (not a near-duplicate of an object)
        bg = [r for r in range(num_regions) if source[r] == "detected" and not same[ann, r].any()]
        if bg:
            vri.append([rs, int(rng.choice(bg)), "unrelated"])

    meta = {
        "schema": SCHEMA_VERSION,
        "image": {"id": f"demo{split}{idx:05d}", "width": W, "height": H},
        "words": words,
        "phrases": phrases,
        "regions": {"boxes": boxes, "chains": chains, "source": source, "names": names},
        "pairs": {"vcd": vcd, "vcc": vcc, "vri": vri, "vrc": vrc},
        "provenance": {"dataset": "demo", "split": split, "index": idx, "synthetic": True},
    }
    return f"demo_{split}_{idx:05d}", meta, feats.astype(np.float16)


def build_demo(out: str | Path = "shards/demo", seed: int = 0, splits: dict[str, int] | None = None, *,
               num_regions: int = NUM_REGIONS, feature_dim: int = FEATURE_DIM, maxcount: int = MAXCOUNT) -> dict:
    """Write the demo shard set. The defaults give the committed ``shards/demo`` (byte-identical); larger
    ``splits``/``num_regions``/``feature_dim`` rehearse a full-size run (e.g. 36 regions x 2048-d like BUTD)."""
    splits = splits or SPLITS
    if num_regions < 6:
        raise ValueError(f"num_regions={num_regions}: a demo scene needs at least 6 regions (5 objects + background)")
    rng = np.random.default_rng(seed)
    protos = np.abs(rng.standard_normal((len(CLASSES), feature_dim))).astype(np.float32)
    bg_protos = np.abs(rng.standard_normal((8, feature_dim))).astype(np.float32)
    w = ShardSetWriter(out, "demo", version="1", maxcount=maxcount, feature_dim=feature_dim)
    w.labels = {
        "vcd": ["coref", "not_coref"],
        "vcc": list(COREF_TYPES),
        "vri": ["related", "unrelated"],
        "vrc": PREDICATES,
    }
    w.extra = {"synthetic": True, "seed": seed,
               "note": "synthetic scenes with planted signal: a smoke test, not a result"}
    try:
        for split, n in splits.items():
            w.write_split(split, (make_scene(rng, protos, bg_protos, i, split, num_regions) for i in range(n)))
        return w.close()
    except BaseException:
        w.abort()
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="shards/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=SPLITS["train"], help="training images (samples)")
    ap.add_argument("--val", type=int, default=SPLITS["val"], help="validation images")
    ap.add_argument("--test", type=int, default=SPLITS["test"], help="test images")
    ap.add_argument("--regions", type=int, default=NUM_REGIONS, help="regions per image (BUTD/LXMERT: 36)")
    ap.add_argument("--feature-dim", type=int, default=FEATURE_DIM, help="region feature width (BUTD: 2048)")
    ap.add_argument("--maxcount", type=int, default=MAXCOUNT, help="samples per shard")
    args = ap.parse_args(argv)
    man = build_demo(args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test},
                     num_regions=args.regions, feature_dim=args.feature_dim, maxcount=args.maxcount)
    print(report(man))


if __name__ == "__main__":
    main()
