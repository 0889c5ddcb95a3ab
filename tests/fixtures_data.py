"""Small hand-checkable fixtures in every input format (written by the tests, nothing binary committed).

Expected manifest counts are computed by hand in the comments and in ``F30K_EXPECTED``/``VG_EXPECTED``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from value_pl.datasets.regions import write_features

D = 8  # feature dim of the fixtures

# ----------------------------------------------------------------------------------- Flickr30k
# image id -> (W, H, objects [(names, bbox 1-based (xmin, ymin, xmax, ymax) | "nobndbox" | "scene")], captions)
F30K_IMAGES = {
    "100": (500, 400, [
        (["1"], (11, 21, 110, 220)),          # -> [10, 20, 110, 220]
        (["2"], (51, 61, 100, 120)),          # -> [50, 60, 100, 120]
        (["3", "4"], (201, 51, 300, 150)),    # one box, two chains
        (["1"], (301, 201, 400, 380)),        # chain 1 has two boxes
        (["5"], "nobndbox"),
        (["6"], "scene"),
    ], [
        "[/EN#1/people A man] in [/EN#2/clothing a red shirt] holds [/EN#3/other a cup] .",  # vcd 4+4, vcc p2 c1 o1
        "[/EN#1/people Someone] near [/EN#0/notvisual something] and [/EN#5/other a thing] .",  # vcd 2+2, vcc p2
        "[/EN#4/bodyparts/people A hand] on [/EN#6/scene the street] .",  # vcd 1+1, vcc bodyparts 1
        "[/EN#1/people A man is here .",       # malformed_markup
        "[/EN#9/people Ghost] walks .",        # unknown_chain; sample kept without pairs
    ]),
    "200": (400, 300, [
        (["10"], (21, 21, 120, 120)),         # -> [20, 20, 120, 120]
        (["11"], (301, 101, 500, 200)),       # box_outside_image (xmax 500 > 400)
        (["12"], (51, 51, 50, 80)),           # box_zero_area
        (["13"], (301, 201, 390, 290)),       # annotated_box_unmatched (no detection near it)
    ], [
        "[/EN#10/animals A dog] runs .",      # vcd 1+1, vcc animals 1
        "[/EN#11/vehicles A car] .",          # chain without a usable box: sample, no pairs
        "[/EN#10/animals A puppy] sleeps .",  # UNRELATED_CAPTIONS "200 3"
        "",                                    # empty_caption
        "[/EN#12/instruments A guitar] and [/EN#10/animals the dog] .",  # vcd 1+1, vcc animals 1
    ]),
    "300": (300, 300, [(["30"], "nobndbox")], ["[/EN#30/people A person] ."]),  # xml_without_boxes
    "400": (300, 300, [(["40"], (11, 11, 100, 100))], ["[/EN#40/people A kid] ."]),  # no_features
    "500": (320, 240, [(["50"], (11, 11, 200, 200))], ["[/EN#50/people A woman] smiles ."]),  # vcd 1+1
}
F30K_SPLITS = {"train": ["100", "200"], "val": ["300"], "test": ["400", "500"]}
F30K_DETECTIONS = {  # pixel boxes of the "detector"
    "100": [[12, 22, 108, 218], [0, 0, 50, 50], [52, 58, 100, 122], [200, 50, 300, 150], [305, 205, 400, 380],
            [400, 0, 500, 100]],
    "200": [[22, 20, 120, 118], [200, 100, 300, 200], [0, 200, 100, 300]],
    "300": [[0, 0, 100, 100], [100, 100, 200, 200]],
    "500": [[10, 10, 200, 200], [200, 100, 300, 200]],
}
#: BUTD-like near-duplicates of image 500's gold box [10, 10, 200, 200] (chain 50): IoU 1.0 and 0.95
F30K_NEAR_DUPS = {"500": [[10, 10, 200, 200], [10, 10, 200, 190.5]]}
F30K_EXPECTED = {
    "train": {"samples": 7, "pairs": {
        "vcc": {"animals": 2, "bodyparts": 1, "clothing": 1, "other": 1, "people": 4},
        "vcd": {"coref": 9, "not_coref": 9}}},
    "val": {"samples": 0, "pairs": {}},
    "test": {"samples": 1, "pairs": {"vcc": {"people": 1}, "vcd": {"coref": 1, "not_coref": 1}}},
}
F30K_SKIPPED = {"annotated_box_unmatched": 1, "box_outside_image": 1, "box_zero_area": 1, "empty_caption": 1,
                "malformed_markup": 1, "no_features": 1, "unknown_chain": 1, "unrelated_caption": 1,
                "xml_without_boxes": 1}


def _feats(rng, n):
    return np.abs(rng.standard_normal((n, D))).astype(np.float32)


def f30k_xml(W, H, objects) -> str:
    out = [f"<annotation><filename>x.jpg</filename><size><width>{W}</width><height>{H}</height>"
           f"<depth>3</depth></size>"]
    for names, box in objects:
        tags = "".join(f"<name>{n}</name>" for n in names)
        if box == "nobndbox":
            body = "<nobndbox>1</nobndbox>"
        elif box == "scene":
            body = "<nobndbox>1</nobndbox><scene>1</scene>"
        else:
            body = "<bndbox>" + "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + \
                   "</bndbox>"
        out.append(f"<object>{tags}<difficult>0</difficult>{body}</object>")
    out.append("</annotation>")
    return "\n".join(out)


def f30k_records(seed=0, extra: dict | None = None):
    """Detections per image; ``extra`` adds boxes (e.g. near-duplicates of a gold box) after the fixture's own."""
    rng = np.random.default_rng(seed)
    recs = []
    for iid, boxes in F30K_DETECTIONS.items():
        W, H = F30K_IMAGES[iid][:2]
        boxes = list(boxes) + list((extra or {}).get(iid, []))
        recs.append((iid, W, H, np.array(boxes, np.float32), _feats(rng, len(boxes))))
    return recs


def write_flickr30k(root: Path, fmt: str = "butd_tsv", extra_detections: dict | None = None) -> dict:
    """Flickr30k Entities layout + detected features in ``fmt``; returns build overrides."""
    root = Path(root)
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for iid, (W, H, objs, caps) in F30K_IMAGES.items():
        (root / "Sentences" / f"{iid}.txt").write_text("\n".join(caps) + "\n")
        (root / "Annotations" / f"{iid}.xml").write_text(f30k_xml(W, H, objs))
    for s, ids in F30K_SPLITS.items():
        (root / f"{s}.txt").write_text("\n".join(ids) + "\n")
    (root / "UNRELATED_CAPTIONS").write_text("# format: <imageID> <sentence number>\n200 3\n")
    feat_path = root / {"butd_tsv": "feats.tsv", "lxmert_tsv": "feats_obj36.tsv", "uniter_lmdb": "img_db",
                        "npz_dir": "npz"}[fmt]
    recs = f30k_records(extra=extra_detections)
    if fmt == "uniter_lmdb":  # UNITER keys such as flickr30k_000000000100.npz
        recs = [(f"flickr30k_{int(r[0]):012d}",) + r[1:] for r in recs]
    write_features(feat_path, fmt, recs)
    return {"dataset.root": str(root), "dataset.features": str(feat_path)}


# ----------------------------------------------------------------------------------------- VG
def _o(oid, name, x, y, w, h, **kw):
    """A region-graph object as VG writes it: ``name`` (region graphs) or a ``names`` list (objects.json v1.2+),
    ``synsets`` (WordNet), pixel ``x, y, w, h``, optionally ``merged_object_ids`` (v1.4)."""
    base = {"object_id": oid, "x": x, "y": y, "w": w, "h": h}
    base.update({"names": name} if isinstance(name, list) else {"name": name})
    return dict(base, **kw)


def _r(rid, pred, s, o):
    return {"relationship_id": rid, "predicate": pred, "subject_id": s, "object_id": o}


MAN = _o(1, "man", 100, 100, 100, 300, synsets=["man.n.01"])
HAT = _o(2, ["Hat", "cap"], 120, 90, 60, 30, synsets=["hat.n.01"])  # names list: the first name counts
STREET = _o(3, "street", 0, 400, 800, 200, synsets=["street.n.01"])
DOG, GRASS = _o(4, ["dog"], 10, 10, 100, 100, synsets=["dog.n.01"]), _o(5, "grass", 0, 200, 640, 280, synsets=["grass.n.01"])
COLLAR = _o(60, [" Dog  Collar"], 30, 30, 20, 10, merged_object_ids=[61], synsets=["collar.n.01"])  # the relation uses 61
CAT, TOY = _o(7, "cat", 300, 300, 100, 100, synsets=["cat.n.01"]), _o(8, "toy", 600, 300, 200, 50, synsets=[])  # toy outside
PERSON, SHIRT = _o(9, "person", 300, 100, 100, 300, synsets=["person.n.01"]), _o(10, "shirt", 310, 150, 80, 100, synsets=["shirt.n.01"])
BIRD, TREE = _o(11, "bird", 10, 10, 50, 50, synsets=["bird.n.01"]), _o(12, "tree", 100, 50, 200, 400, synsets=["tree.n.01"])
CUP, TABLE = _o(13, "cup", 50, 50, 40, 40, synsets=["cup.n.01"]), _o(14, "table", 0, 90, 300, 200, synsets=["table.n.02"])


def _reg(iid, rid, phrase, objs, rels):
    return {"region_id": rid, "image_id": iid, "phrase": phrase, "x": 0, "y": 0, "width": 10, "height": 10,
            "objects": objs, "relationships": rels, "synsets": []}


VG_GRAPHS = [
    {"image_id": 1, "regions": [
        _reg(1, 11, "man wearing hat", [MAN, HAT],
             [_r(1, "wearing", 1, 2), _r(2, " WEARING ", 1, 2), _r(3, "ON", 2, 1)]),  # wearing + on (dup dropped)
        _reg(1, 12, "man on street.", [MAN, STREET], [_r(4, "on", 1, 3), _r(5, "on", 1, 999)]),  # unresolved 1
        _reg(1, 13, "hat on man", [HAT, MAN], [_r(6, "on", 2, 1), _r(7, "next to", 1, 1)]),  # relation_self 1
        _reg(1, 14, "  ", [MAN, HAT], [_r(8, "on", 2, 1)]),  # empty_caption
        _reg(1, 15, "no relations here", [MAN], []),
    ]},
    {"image_id": 2, "regions": [
        _reg(2, 21, "dog on grass with a collar", [DOG, GRASS, COLLAR], [_r(9, "on", 4, 5), _r(10, "wears", 4, 61)]),
        _reg(2, 22, "cat holding toy", [CAT, TOY], [_r(11, "holding", 7, 8)]),  # box_outside_image
    ]},
    {"image_id": 3, "regions": [
        _reg(3, 31, "person wearing shirt", [PERSON, SHIRT], [_r(12, "Wearing", 9, 10), _r(13, "has", 9, 10)])]},
    {"image_id": 4, "regions": [_reg(4, 41, "bird near tree", [BIRD, TREE], [_r(14, "near", 11, 12)])]},
    {"image_id": 5, "regions": [_reg(5, 51, "ghost image", [CUP, TABLE], [_r(15, "on", 13, 14)])]},  # no_image_data
    {"image_id": 6, "regions": [_reg(6, 61, "cup on table", [CUP, TABLE], [_r(16, "on", 13, 14)])]},
]
VG_SIZES = {1: (800, 600), 2: (640, 480), 3: (640, 480), 4: (500, 500), 6: (400, 300)}
VG_SPLITS = {"train": [1, 2, 4, 5], "val": [3], "test": [6]}
#: near-duplicates of image 6's cup [50, 50, 90, 90] (related to the table): IoU 1.0 and 0.95
VG_NEAR_DUPS = {6: [[50, 50, 90, 90], [50, 50, 90, 88]]}
# with aliases=basic ("wears" -> "wearing") and top_k=2: on (5) and wearing (3) are the top-2 predicates.
VG_EXPECTED = {
    "train": {"samples": 4, "pairs": {"vrc": {"on": 4, "wearing": 2}, "vri": {"related": 6, "unrelated": 6}}},
    "val": {"samples": 1, "pairs": {"vrc": {"wearing": 1}, "vri": {"related": 1, "unrelated": 1}}},
    "test": {"samples": 1, "pairs": {"vrc": {"on": 1}, "vri": {"related": 1, "unrelated": 1}}},
}
VG_SKIPPED = {"box_outside_image": 1, "empty_caption": 1, "no_image_data": 1, "relation_self": 1,
              "relation_unresolved": 1}


def vg_records(seed=1, extra: dict | None = None):
    rng = np.random.default_rng(seed)
    recs = []
    for im in VG_GRAPHS:
        iid = im["image_id"]
        if iid not in VG_SIZES:
            continue
        W, H = VG_SIZES[iid]
        boxes = {}
        for reg in im["regions"]:
            for o in reg["objects"]:
                x1, y1 = o["x"], o["y"]
                x2, y2 = min(W, o["x"] + o["w"]), min(H, o["y"] + o["h"])
                boxes[o["object_id"]] = [x1 + 1, y1 + 1, x2 - 1, y2 - 1]  # a detection close to each object
        bl = [boxes[k] for k in sorted(boxes)] + [[W - 40, H - 40, W - 1, H - 1], [W - 80, 0, W - 1, 30]]
        bl += list((extra or {}).get(iid, []))
        recs.append((iid, W, H, np.array(bl, np.float32), _feats(rng, len(bl))))
    return recs


def write_vg(root: Path, fmt: str = "butd_tsv", extra_detections: dict | None = None) -> dict:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "region_graphs.json").write_text(json.dumps(VG_GRAPHS))
    (root / "image_data.json").write_text(json.dumps(
        [{"image_id": i, "width": w, "height": h, "url": "", "coco_id": None, "flickr_id": None}
         for i, (w, h) in VG_SIZES.items()]))
    split_files = {}
    for s, ids in VG_SPLITS.items():
        p = root / f"{s}_ids.txt"
        p.write_text("\n".join(str(i) for i in ids) + "\n")
        split_files[s] = str(p)
    feat_path = root / {"butd_tsv": "vg.tsv", "lxmert_tsv": "vg_obj36.tsv", "uniter_lmdb": "img_db",
                        "npz_dir": "npz"}[fmt]
    write_features(feat_path, fmt, vg_records(extra=extra_detections))
    ov = {"dataset.region_graphs": str(root / "region_graphs.json"),
          "dataset.image_data": str(root / "image_data.json"), "dataset.features": str(feat_path),
          "dataset.top_k": "2", "dataset.aliases": "basic"}
    for s, p in split_files.items():
        ov[f"+dataset.split_files.{s}"] = p
    return ov


def write_vg_small(root: Path, graphs: list[dict], sizes: dict, splits: dict, detections: dict,
                   overrides: dict | None = None) -> dict:
    """A small VG input set written from scratch: ``graphs`` (region_graphs.json records), ``sizes`` (image id ->
    (W, H)), ``splits`` (split name -> image ids; an empty list writes an empty id file) and ``detections`` (image id
    -> pixel boxes of the "detector", BUTD TSV). Returns the build overrides (no aliases; ``overrides`` added)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "region_graphs.json").write_text(json.dumps(graphs))
    (root / "image_data.json").write_text(json.dumps([{"image_id": i, "width": w, "height": h}
                                                      for i, (w, h) in sizes.items()]))
    rng = np.random.default_rng(0)
    write_features(root / "vg.tsv", "butd_tsv", [(i, *sizes[i], np.array(b, np.float32), _feats(rng, len(b)))
                                                 for i, b in detections.items()])
    ov = {"dataset.region_graphs": str(root / "region_graphs.json"),
          "dataset.image_data": str(root / "image_data.json"), "dataset.features": str(root / "vg.tsv")}
    for s, ids in splits.items():
        p = root / f"{s}_ids.txt"
        p.write_text("".join(f"{i}\n" for i in ids))
        ov[f"+dataset.split_files.{s}"] = str(p)
    return dict(ov, **(overrides or {}))


# ------------------------------------------------------------------------------------ SentEval
SENTEVAL = {
    "sentence_length.txt": [("tr", "0", "a b c d e"), ("tr", "1", "a b c d e f g h i"), ("tr", "0", "x y z w v"),
                            ("tr", "1", "one two three four five six seven eight nine ten"),
                            ("va", "0", "p q r s t"), ("va", "1", "p q r s t u v w x y"),
                            ("te", "0", "m n o p q"), ("te", "1", "m n o p q r s t u v w")],
    "bigram_shift.txt": [("tr", "O", "the dog runs fast ."), ("tr", "I", "dog the runs fast ."),
                         ("tr", "O", "a man sits ."), ("tr", "I", "man a sits ."), ("va", "O", "a cat eats ."),
                         ("va", "I", "cat a eats ."), ("te", "O", "birds fly high ."), ("te", "I", "fly birds high .")],
}
SENTEVAL_EXPECTED = {
    "sentlen": {"train": {"samples": 4, "pairs": {"sentlen": {"0": 2, "1": 2}}},
                "val": {"samples": 2, "pairs": {"sentlen": {"0": 1, "1": 1}}},
                "test": {"samples": 2, "pairs": {"sentlen": {"0": 1, "1": 1}}}},
    "bshift": {"train": {"samples": 4, "pairs": {"bshift": {"I": 2, "O": 2}}},
               "val": {"samples": 2, "pairs": {"bshift": {"I": 1, "O": 1}}},
               "test": {"samples": 2, "pairs": {"bshift": {"I": 1, "O": 1}}}},
}


def write_senteval(root: Path) -> dict:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in SENTEVAL.items():
        (root / name).write_text("".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    return {"dataset.dir": str(root), "dataset.tasks": "[sentlen,bshift]"}


CAPTIONS = [
    "a man rides a horse on the beach and a dog runs behind him .",
    "two children play in the park .",
    "a woman holds an umbrella while walking in the rain .",
    "the cat sleeps on the sofa .",
    "a boy kicks a ball and his sister watches .",
    "people walk along a busy street at night .",
    "a chef cooks food in a small kitchen but the customers wait .",
    "an old man reads a newspaper .",
    "a girl in a red dress dances on a stage .",
    "three dogs play with a stick in the snow .",
    "a cyclist rides down a steep hill .",
    "a man plays guitar and a woman sings .",
    "",
    "two men fish from a wooden boat .",
    "a baby laughs .",
    "a man plays guitar and a woman sings .",
]


def write_captions(path: Path) -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(CAPTIONS) + "\n")
    return {"dataset.captions": str(path)}


# ------------------------------------------------------------------------------------- helpers
def compose_build(dataset: str, out, overrides: dict | None = None, extra: list | None = None):
    """The build config as the CLI composes it (Hydra compose API), with ``feature_dim=D``."""
    from hydra import compose, initialize_config_dir

    from value_pl import CONFIG_DIR

    ov = [f"dataset={dataset}", f"out={out}", f"feature_dim={D}", "progress=false"]
    ov += [f"{k}={v}" for k, v in (overrides or {}).items()] + list(extra or [])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="build", overrides=ov)


def build(dataset: str, out, overrides: dict | None = None, extra: list | None = None):
    from value_pl.datasets.build import run_build

    return run_build(compose_build(dataset, out, overrides, extra))


def split_counts(man: dict) -> dict:
    return {s: {"samples": v["samples"], "pairs": v["pairs"]} for s, v in man["splits"].items()}


def read_samples(root) -> list[dict]:
    import io
    import tarfile

    out = []
    for tf in sorted(Path(root).glob("*.tar")):
        with tarfile.open(tf) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    feats = np.load(io.BytesIO(t.extractfile(m.name[:-5] + ".npy").read()))
                    out.append({"key": m.name[:-5], "meta": meta, "feats": feats, "tar": tf.name})
    return out


def tree_bytes(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- real-format VG sample (../shared)
SHARED_VG = Path("/work/shared/fixtures/visual_genome")


def build_real_region_graphs(tmp_path: Path) -> tuple[Path, dict]:
    """The real region_graphs.json sample (images 1-3) built into shards, with synthetic detections at the object
    boxes (8-d features): (shard root, manifest). Needs ``SHARED_VG``; callers skip without it."""
    from value_pl.datasets.common import iter_json_array

    rg = SHARED_VG / "region_graphs" / "region_graphs_images_1-3.json"
    image_data = SHARED_VG / "v1.2" / "image_data.json"
    sizes = {im["image_id"]: (im["width"], im["height"]) for im in json.loads(image_data.read_text())}
    recs = []
    for im in iter_json_array(rg):
        W, H = sizes[im["image_id"]]
        bx = {o["object_id"]: [o["x"], o["y"], min(W, o["x"] + o["w"]), min(H, o["y"] + o["h"])]
              for r in im["regions"] for o in r["objects"] if o["w"] > 0 and o["h"] > 0}
        bl = np.array([bx[k] for k in sorted(bx)][:100], np.float32)
        recs.append((im["image_id"], W, H, bl, np.ones((len(bl), D), np.float32)))
    write_features(tmp_path / "f.tsv", "butd_tsv", recs)
    out = tmp_path / "out"
    man = build("vg", out, {"dataset.region_graphs": str(rg), "dataset.image_data": str(image_data),
                            "dataset.features": str(tmp_path / "f.tsv"), "dataset.max_regions": 100,
                            "dataset.splits": "{train: 1.0}"})
    return out, man
