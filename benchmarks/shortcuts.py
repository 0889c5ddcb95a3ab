"""Shortcut audit: can a pair task's label be read from trivial features the builders introduce?

Simulates Flickr30k Entities and Visual Genome inputs shaped like the real data (image sizes, chains/objects per
image, phrase types and their box shapes, skewed predicates with predicate-dependent geometry, BUTD-like
detections: several near-duplicates of each object, parts, background boxes, 36 kept by confidence), builds them
with the real builders (:func:`build_flickr30k`, :func:`build_vg`, normal and mismatch), then fits trivial
baselines on hand-made features of each pair -- box geometry only, region index only, "is the region an annotated
one", phrase position/length only -- training on ``train`` and scoring on ``val``+``test`` (disjoint images), and
prints their accuracies next to the majority class. Features are random, so nothing here can use content.

    python benchmarks/shortcuts.py                 # simulated sets; ~5-10 min on 2 busy cores
    python benchmarks/shortcuts.py --images 400 --json out.json
    python benchmarks/shortcuts.py --shards shards/flickr30k --task vcd    # the same baselines on built shards

With ``--shards`` the pairs of a built shard set are read instead (train split vs the others), so the figures on
the real datasets can be compared with the probers' accuracies.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from value_pl.datasets.flickr30k import build_flickr30k  # noqa: E402
from value_pl.datasets.regions import iou_matrix, write_features  # noqa: E402
from value_pl.datasets.visual_genome import build_vg  # noqa: E402

D = 8
TYPES = ["people", "clothing", "bodyparts", "animals", "vehicles", "instruments", "scene", "other"]
WORDS = {"people": ["man", "woman", "boy", "girl", "person", "worker", "crowd"],
         "clothing": ["shirt", "hat", "jacket", "dress", "jeans"], "bodyparts": ["hand", "face", "arm", "hair"],
         "animals": ["dog", "horse", "cat"], "vehicles": ["car", "bike", "boat"],
         "instruments": ["guitar", "drum"], "scene": ["street", "beach", "field", "park", "water"],
         "other": ["ball", "table", "sign", "cup", "bag", "rock"]}
FILL = ["is", "are", "in", "on", "near", "with", "while", "standing", "walking", "looking", "at", "the", "."]


def _jitter(rng, b, W, H, s=0.08):
    w, h = b[2] - b[0], b[3] - b[1]
    d = rng.normal(0, s, 4) * [w, h, w, h]
    x1, y1, x2, y2 = b[0] + d[0], b[1] + d[1], b[2] + d[2], b[3] + d[3]
    x1, y1 = np.clip([x1, y1], 0, [W - 2, H - 2])
    return [float(x1), float(y1), float(np.clip(max(x2, x1 + 2), 0, W)), float(np.clip(max(y2, y1 + 2), 0, H))]


def _rand_box(rng, W, H, lo=0.05, hi=0.6):
    w, h = rng.uniform(lo, hi) * W, rng.uniform(lo, hi) * H
    x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
    return [x, y, x + w, y + h]


def _inside(rng, b, fx=(0.2, 0.8), fy=(0.2, 0.8), size=(0.2, 0.6)):
    w, h = b[2] - b[0], b[3] - b[1]
    cw, ch = rng.uniform(*size) * w, rng.uniform(*size) * h
    cx, cy = b[0] + rng.uniform(*fx) * w, b[1] + rng.uniform(*fy) * h
    return [max(b[0], cx - cw / 2), max(b[1], cy - ch / 2), min(b[2], cx + cw / 2), min(b[3], cy + ch / 2)]


def detections(rng, objects, W, H, n=36):
    """BUTD-like: 1-3 near-duplicates of each object (high confidence), parts, background boxes (lower)."""
    dets = []
    for b in objects:
        for _ in range(rng.integers(1, 4)):
            dets.append((rng.uniform(0.5, 1.0), _jitter(rng, b, W, H)))
        for _ in range(rng.integers(0, 3)):
            dets.append((rng.uniform(0.2, 0.7), _inside(rng, b)))
    while len(dets) < n + 10:
        dets.append((rng.uniform(0.05, 0.6), _rand_box(rng, W, H, 0.05, 0.5)))
    dets.sort(key=lambda t: -t[0])
    return np.array([d[1] for d in dets[:n]], np.float32)


# ------------------------------------------------------------------------------------------- Flickr30k
def write_f30k(root: Path, n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir(parents=True)
    recs, ids = [], []
    for i in range(n_images):
        iid = str(1000 + i)
        W, H = 500.0, float(rng.choice([333, 375, 400, 500]))
        ents = []  # (chain, type, [boxes])
        c = 1
        for _ in range(rng.integers(1, 4)):
            pb = [_rand_box(rng, W, H, 0.15, 0.5)]
            pb[0][3] = min(H, pb[0][1] + rng.uniform(0.5, 0.95) * H)
            ents.append((c, "people", pb))
            c += 1
            if rng.random() < 0.7:
                ents.append((c, "clothing", [_inside(rng, pb[0], fy=(0.3, 0.6))]))
                c += 1
            if rng.random() < 0.2:
                ents.append((c, "bodyparts", [_inside(rng, pb[0], size=(0.1, 0.25))]))
                c += 1
        for t, p in (("animals", .12), ("vehicles", .08), ("instruments", .05), ("scene", .5), ("other", .9)):
            for _ in range(1 + int(rng.random() < 0.4) if rng.random() < p else 0):
                box = [0.0, rng.uniform(0.3, 0.6) * H, W, H] if t == "scene" else _rand_box(rng, W, H, 0.08, 0.35)
                ents.append((c, t, [box] if (t != "scene" or rng.random() < 0.6) else []))
                c += 1
        xml = [f"<annotation><size><width>{W:g}</width><height>{H:g}</height><depth>3</depth></size>"]
        for ch, _t, bxs in ents:
            for b in bxs:
                v = [int(b[0]) + 1, int(b[1]) + 1, int(b[2]), int(b[3])]
                xml.append(f"<object><name>{ch}</name><bndbox><xmin>{v[0]}</xmin><ymin>{v[1]}</ymin><xmax>{v[2]}"
                           f"</xmax><ymax>{v[3]}</ymax></bndbox></object>")
            if not bxs:
                xml.append(f"<object><name>{ch}</name><nobndbox>1</nobndbox><scene>1</scene></object>")
        (root / "Annotations" / f"{iid}.xml").write_text("\n".join(xml) + "</annotation>")
        caps = []
        for _ in range(5):
            chosen = [e for e in ents if rng.random() < 0.45] or [ents[0]]
            toks = []
            for ch, t, _b in chosen:
                toks += list(rng.choice(FILL, rng.integers(0, 4)))
                words = (["a"] if rng.random() < 0.7 else []) + list(rng.choice(["red", "young", "big"],
                                                                                 rng.integers(0, 2)))
                words.append(str(rng.choice(WORDS[t])))
                toks.append(f"[/EN#{ch}/{t} " + " ".join(words) + "]")
            if rng.random() < 0.15:
                toks.append("[/EN#0/notvisual each other]")
            caps.append(" ".join(toks + ["."]))
        (root / "Sentences" / f"{iid}.txt").write_text("\n".join(caps) + "\n")
        objs = [b for _c, _t, bxs in ents for b in bxs]
        det = detections(rng, objs, W, H)
        recs.append((iid, W, H, det, np.abs(rng.standard_normal((len(det), D))).astype(np.float32)))
        ids.append(iid)
    write_features(root / "feats.tsv", "butd_tsv", recs)
    cut = [int(len(ids) * .8), int(len(ids) * .9)]
    splits = {}
    for s, lst in zip(("train", "val", "test"), (ids[:cut[0]], ids[cut[0]:cut[1]], ids[cut[1]:])):
        (root / f"{s}.txt").write_text("\n".join(lst) + "\n")
        splits[s] = str(root / f"{s}.txt")
    return {"sentences": str(root / "Sentences"), "annotations": str(root / "Annotations"), "splits": splits,
            "unrelated": None, "features": str(root / "feats.tsv"), "features_format": "butd_tsv",
            "annotated_features": None, "iou_threshold": 0.5, "max_regions": 36}


# ------------------------------------------------------------------------------------------------- VG
#: predicate -> (weight, geometry of the object relative to the subject, subject names, object names)
PREDS = {"on": (25, "below", ["cup", "man", "sign", "plate"], ["table", "street", "wall", "grass"]),
         "has": (15, "inside", ["man", "car", "building"], ["hand", "wheel", "window", "head"]),
         "wearing": (9, "inside", ["man", "woman", "boy"], ["shirt", "hat", "jacket"]),
         "in": (9, "around", ["man", "tree", "boat"], ["water", "field", "room"]),
         "of": (9, "around", ["window", "wheel", "leg"], ["building", "car", "table"]),
         "with": (6, "side", ["man", "plate", "woman"], ["bag", "food", "dog"]),
         "behind": (4, "overlap", ["tree", "building", "man"], ["fence", "car", "bench"]),
         "holding": (4, "side", ["man", "woman", "girl"], ["umbrella", "racket", "phone"]),
         "near": (4, "side", ["dog", "bench", "pole"], ["tree", "car", "man"]),
         "next to": (3, "side", ["car", "dog", "sign"], ["car", "pole", "bench"]),
         "under": (3, "above", ["dog", "bench", "shadow"], ["tree", "table", "umbrella"]),
         "riding": (3, "below", ["man", "boy", "woman"], ["horse", "bike", "skateboard"])}


def _geom(rng, rel, s, W, H):
    w, h = s[2] - s[0], s[3] - s[1]
    if rel == "inside":
        return _inside(rng, s)
    if rel == "around":
        o = [s[0] - rng.uniform(.2, 1) * w, s[1] - rng.uniform(.2, 1) * h, s[2] + rng.uniform(.2, 1) * w,
             s[3] + rng.uniform(.2, 1) * h]
    elif rel == "below":
        o = [s[0] - .3 * w, s[3] - .2 * h, s[2] + .3 * w, s[3] + rng.uniform(.3, 1) * h]
    elif rel == "above":
        o = [s[0] - .3 * w, s[1] - rng.uniform(.5, 1) * h, s[2] + .3 * w, s[1] + .1 * h]
    elif rel == "side":
        dx = rng.choice([-1, 1]) * rng.uniform(.6, 1.2) * w
        o = [s[0] + dx, s[1] + rng.normal(0, .2) * h, s[2] + dx, s[3] + rng.normal(0, .2) * h]
    else:  # overlap
        o = [s[0] + .4 * w, s[1] + .2 * h, s[2] + .4 * w, s[3] + .2 * h]
    o = [float(np.clip(o[0], 0, W - 4)), float(np.clip(o[1], 0, H - 4)), float(np.clip(o[2], 0, W)),
         float(np.clip(o[3], 0, H))]
    o[2], o[3] = max(o[2], o[0] + 4), max(o[3], o[1] + 4)
    return o


def write_vg(root: Path, n_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    names = list(PREDS)
    wts = np.array([PREDS[p][0] for p in names], float)
    graphs, sizes, recs = [], [], []
    oid = 1
    for i in range(n_images):
        iid = 1 + i
        W, H = 800.0, float(rng.choice([600, 533, 450]))
        regions, objs_all = [], []
        for r in range(rng.integers(6, 14)):
            pred = str(rng.choice(names, p=wts / wts.sum()))
            _w, rel, sn, on = PREDS[pred]
            s = _rand_box(rng, W, H, 0.08, 0.35)
            o = _geom(rng, rel, s, W, H)
            objs = [{"object_id": oid, "name": str(rng.choice(sn)), "x": s[0], "y": s[1], "w": s[2] - s[0],
                     "h": s[3] - s[1]},
                    {"object_id": oid + 1, "name": str(rng.choice(on)), "x": o[0], "y": o[1], "w": o[2] - o[0],
                     "h": o[3] - o[1]}]
            if rng.random() < 0.3:  # an object the caption mentions without a relation
                e = _rand_box(rng, W, H, 0.05, 0.2)
                objs.append({"object_id": oid + 2, "name": "thing", "x": e[0], "y": e[1], "w": e[2] - e[0],
                             "h": e[3] - e[1]})
            adj = list(rng.choice(["white", "large", "the", "small"], rng.integers(0, 3)))
            phrase = " ".join(adj + [objs[0]["name"], pred] + (["a"] if rng.random() < .5 else []) + [objs[1]["name"]])
            regions.append({"region_id": 100 * iid + r, "phrase": phrase, "objects": objs,
                            "relationships": [{"relationship_id": oid, "predicate": pred.upper() if rng.random() < .2
                                               else pred, "subject_id": oid, "object_id": oid + 1}]})
            objs_all += [[x["x"], x["y"], x["x"] + x["w"], x["y"] + x["h"]] for x in objs]
            oid += 3
        graphs.append({"image_id": iid, "regions": regions})
        sizes.append({"image_id": iid, "width": W, "height": H})
        det = detections(rng, objs_all, W, H)
        recs.append((str(iid), W, H, det, np.abs(rng.standard_normal((len(det), D))).astype(np.float32)))
    (root / "region_graphs.json").write_text(json.dumps(graphs))
    (root / "image_data.json").write_text(json.dumps(sizes))
    write_features(root / "vg.tsv", "butd_tsv", recs)
    return {"region_graphs": str(root / "region_graphs.json"), "image_data": str(root / "image_data.json"),
            "features": str(root / "vg.tsv"), "features_format": "butd_tsv", "iou_threshold": 0.5,
            "max_regions": 36, "top_k": len(PREDS), "splits": {"train": .8, "val": .1, "test": .1}}


# ------------------------------------------------------------------------------------------- reading
def read_shards(root) -> list[dict]:
    out = []
    for tf in sorted(Path(root).glob("*.tar")):
        with tarfile.open(tf) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    out.append({"key": m.name[:-5], "meta": meta, "split": tf.name.split("-")[0]})
    return out


def box7(b, W, H):
    x1, y1, x2, y2 = b[0] / W, b[1] / H, b[2] / W, b[3] / H
    return [x1, y1, x2, y2, x2 - x1, y2 - y1, (x2 - x1) * (y2 - y1)]


def pair_rows(samples, task: str, preds=tuple(PREDS)) -> dict[str, list]:
    """Per pair: label, split, and the trivial feature sets (``caption``: which of ``preds`` the caption states)."""
    rows = {k: [] for k in ("label", "split", "geom", "index", "source", "phrase", "order", "geom_pair", "caption", "type_match")}
    for s in samples:
        m = s["meta"]
        W, H = m["image"]["width"], m["image"]["height"]
        R = len(m["regions"]["boxes"])
        pairs = m["pairs"].get(task, [])
        ann = [1.0 if src == "annotated" else 0.0 for src in m["regions"]["source"]]
        text = " " + " ".join(m["words"]).lower() + " "
        said = [float(f" {p} " in text) for p in preds]  # which predicates the caption's words state
        for j, (a, r, lab) in enumerate(pairs):
            g = box7(m["regions"]["boxes"][r], W, H)
            rows["label"].append(lab)
            rows["split"].append(s["split"])
            rows["order"].append([j / len(pairs), len(pairs), float(j)])
            rows["index"].append([float(r), r / R, float(R)])
            if task in ("vcd", "vcc"):
                ph = m["phrases"][a]
                rows["geom"].append(g)
                rows["source"].append([ann[r]])
                rows["phrase"].append([ph["span"][0], ph["span"][1] - ph["span"][0], len(m["words"]), float(a),
                                       len(m["phrases"])])
                rows["geom_pair"].append(g)
                # the region is an object of the phrase's coarse type (a category match, not the same instance)
                rows["type_match"].append([float(ph["label"] in m["regions"]["names"][r])])
            else:
                ga = box7(m["regions"]["boxes"][a], W, H)
                ba, bb = np.array([m["regions"]["boxes"][a]]), np.array([m["regions"]["boxes"][r]])
                iou = float(iou_matrix(ba, bb)[0, 0])
                ca = [(ga[0] + ga[2]) / 2, (ga[1] + ga[3]) / 2]
                cb = [(g[0] + g[2]) / 2, (g[1] + g[3]) / 2]
                rel = [cb[0] - ca[0], cb[1] - ca[1], float(np.hypot(cb[0] - ca[0], cb[1] - ca[1])), iou]
                rows["geom"].append(ga + g)
                rows["geom_pair"].append(ga + g + rel)
                rows["index"][-1] = [float(a), float(r), a / R, r / R, float(R)]
                rows["source"].append([ann[a], ann[r], ann[a] * ann[r]])
                rows["phrase"].append([len(m["words"])])
                rows["caption"].append(said)
    return rows


def fit(rows, feats: str) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(rows[feats], float)
    y = np.asarray(rows["label"])
    tr = np.asarray(rows["split"]) == "train"
    te = ~tr
    labels, counts = np.unique(y[tr], return_counts=True)
    maj = labels[counts.argmax()]
    out = {"n_train": int(tr.sum()), "n_eval": int(te.sum()), "majority": float((y[te] == maj).mean())}
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X[tr], y[tr])
    out["logreg"] = float((lr.predict(X[te]) == y[te]).mean())
    gb = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(X[tr], y[tr])
    out["gboost"] = float((gb.predict(X[te]) == y[te]).mean())
    return out


def caption_stats(normal, mismatch, task="vrc") -> dict:
    """Caption length distributions and how often a sample's caption holds one of its own predicates."""
    def stats(samples):
        lens = [len(s["meta"]["words"]) for s in samples]
        hit = [any(p in " ".join(s["meta"]["words"]).lower() for _a, _b, p in s["meta"]["pairs"][task])
               for s in samples]
        return {"captions": len(samples), "mean_words": float(np.mean(lens)), "std_words": float(np.std(lens)),
                "caption_has_own_predicate": float(np.mean(hit)),
                "distinct_captions": len({" ".join(s["meta"]["words"]) for s in samples})}
    return {"normal": stats(normal), "mismatch": stats(mismatch)}


def negative_sources(samples, task: str) -> dict:
    """Per label, how many pairs have 0, 1 or 2 annotated regions (VCD/VCC: 0 or 1)."""
    out: dict[str, dict[int, int]] = {}
    for s in samples:
        m = s["meta"]
        ann = [src == "annotated" for src in m["regions"]["source"]]
        for a, r, lab in m["pairs"][task]:
            n = int(ann[r]) + (int(ann[a]) if task in ("vri", "vrc") else 0)
            d = out.setdefault(lab, {})
            d[n] = d.get(n, 0) + 1
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--shards", default=None, help="a built shard set to audit instead of the simulated ones")
    ap.add_argument("--task", default=None, help="with --shards: vcd | vcc | vri | vrc")
    args = ap.parse_args(argv)
    res = {}
    if args.shards:
        if args.task not in ("vcd", "vcc", "vri", "vrc"):
            ap.error("--shards needs --task vcd | vcc | vri | vrc")
        samples = read_shards(args.shards)
        labels = json.loads((Path(args.shards) / "manifest.json").read_text())["labels"]
        rows = pair_rows(samples, args.task, labels.get("vrc", ()))
        sets = ("geom", "index", "source", "phrase", "order", "type_match") if args.task == "vcd" else \
            ("geom", "index", "source", "phrase") if args.task == "vcc" else \
            ("geom", "geom_pair", "index", "source", "order", "caption")
        res[args.task] = {f: fit(rows, f) for f in sets}
        res["sources"] = negative_sources(samples, args.task)
        print(json.dumps(res, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return res
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kw = {"seed": args.seed, "feature_dim": D, "progress_bar": False, "hash_inputs": False}
        f_cfg = write_f30k(tmp / "f30k", args.images, args.seed)
        build_flickr30k(dict(f_cfg, vcd_negatives="uniform"), out=tmp / "f30k_uniform", **kw)
        build_flickr30k(f_cfg, out=tmp / "f30k_out", **kw)
        f30k_uniform, f30k = read_shards(tmp / "f30k_uniform"), read_shards(tmp / "f30k_out")
        vg_cfg = write_vg(tmp / "vg", args.images, args.seed)
        build_vg(vg_cfg, out=tmp / "vg_out", **kw)
        build_vg(dict(vg_cfg, variant="mismatch"), out=tmp / "vgm_out", **kw)
        vg, vgm = read_shards(tmp / "vg_out"), read_shards(tmp / "vgm_out")
    runs = (("vcd uniform", "vcd", f30k_uniform, ("geom", "index", "source", "phrase", "order", "type_match")),
            ("vcd", "vcd", f30k, ("geom", "index", "source", "phrase", "order", "type_match")),
            ("vcc", "vcc", f30k, ("geom", "phrase")),
            ("vri", "vri", vg, ("geom", "geom_pair", "index", "source", "order")),
            ("vri mismatch", "vri", vgm, ("caption",)),
            ("vrc", "vrc", vg, ("geom_pair", "index", "caption")),
            ("vrc mismatch", "vrc", vgm, ("caption",)))
    for name, task, samples, sets in runs:
        rows = pair_rows(samples, task)
        res[name] = {f: fit(rows, f) for f in sets}
        for f, r in res[name].items():
            print(f"{name:13s} {f:10s} majority {r['majority']:.3f}  logreg {r['logreg']:.3f}  gboost "
                  f"{r['gboost']:.3f}  (train {r['n_train']}, eval {r['n_eval']} pairs)", flush=True)
    res["sources"] = {"vcd uniform": negative_sources(f30k_uniform, "vcd"), "vcd": negative_sources(f30k, "vcd"),
                      "vri": negative_sources(vg, "vri")}
    res["mismatch"] = caption_stats(vg, vgm)
    print("annotated regions per pair", json.dumps(res["sources"]))
    print("captions", json.dumps(res["mismatch"]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
