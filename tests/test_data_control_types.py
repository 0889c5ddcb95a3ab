"""What a region is (schema 2 ``regions.names``), control-task types from it, old shard sets refused,
and negatives that are never the gold object (near-duplicate detections at IoU 1.0 and 0.95)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import (
    F30K_NEAR_DUPS,
    VG_NEAR_DUPS,
    build,
    build_real_region_graphs,
    SHARED_VG,
    read_samples,
    write_flickr30k,
    write_vg,
)

from value_pl.data.schema import (
    SchemaError,
    decode_sample,
    load_manifest,
    pair_type,
    region_identity,
)
from value_pl.protocols.control import ControlRelabel, check_types



@pytest.fixture(scope="module")
def vg(tmp_path_factory):
    t = tmp_path_factory.mktemp("vg")
    man = build("vg", t / "out", write_vg(t / "in", extra_detections=VG_NEAR_DUPS))
    return t / "out", man


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    t = tmp_path_factory.mktemp("f30k")
    man = build("flickr30k", t / "out", write_flickr30k(t / "in", extra_detections=F30K_NEAR_DUPS))
    return t / "out", man


def test_vg_region_names(vg):
    """names[0] of a ``names`` list or ``name``, normalised; synsets; the object reached by a merged id."""
    s = {x["key"]: x["meta"] for x in read_samples(vg[0])}
    m = s["vg_2_21"]  # dog on grass; dog wears collar (object 60, the relation names merged id 61)
    reg = {c[0]: i for i, c in enumerate(m["regions"]["chains"]) if c}
    assert m["regions"]["names"][reg["60"]] == ["dog collar"] and m["regions"]["synsets"][reg["60"]] == ["collar.n.01"]
    assert m["regions"]["names"][reg["4"]] == ["dog"]
    assert s["vg_1_11"]["regions"]["names"][:2] == [["man"], ["hat"]]  # HAT: names ["Hat", "cap"]
    for meta in s.values():  # detections that carry no object: the explicit unknown marker
        for names, chains in zip(meta["regions"]["names"], meta["regions"]["chains"]):
            assert (names == ["<unknown>"]) == (not chains)


def test_vg_control_task_does_not_collapse(vg):
    """VRC/VRI control types are object-name pairs: several types, and not one control label for all."""
    root, man = vg
    assert man["schema"] == 2 and man["control_types"]["train"] == {"vrc": 5, "vri": 10}
    metas = [x["meta"] for x in read_samples(root) if x["tar"].startswith("train")]
    types = {pair_type("region_region", m, p) for m in metas for p in m["pairs"]["vrc"]}
    assert types == {"rel:man|hat", "rel:hat|man", "rel:man|street", "rel:dog|grass", "rel:dog|dog collar"}
    c = ControlRelabel(man["splits"]["train"]["pairs"]["vrc"], "vrc", "region_region", seed=0)
    labels = [c(k, j, p[2], {"meta": m, "pair": p}) for k, m in enumerate(metas) for j, p in enumerate(m["pairs"]["vrc"])]
    assert len(set(labels)) == 2, labels  # both predicates occur as control labels (on 6 pairs)
    by_type = {}
    for m in metas:
        for p in m["pairs"]["vrc"]:
            by_type.setdefault(pair_type("region_region", m, p), set()).add(c("k", 0, p[2], {"meta": m, "pair": p}))
    assert all(len(v) == 1 for v in by_type.values())  # a function of the type only
    f = {x["key"]: x["meta"] for x in read_samples(root)}["vg_1_11"]
    assert region_identity(f, 0) == "man" and region_identity(f, 2) == "<unknown>"


def test_flickr30k_region_names_and_types(f30k):
    root, man = f30k
    s = {x["key"]: x["meta"] for x in read_samples(root)}
    m = s["f30k_100_0"]
    reg = {tuple(c): i for i, c in enumerate(m["regions"]["chains"]) if c}
    # one box of chains 3 (/other) and 4 (/bodyparts/people, another caption): the types of both chains
    assert m["regions"]["names"][reg[("3", "4")]] == ["bodyparts", "other", "people"]
    assert m["regions"]["names"][reg[("1",)]] == ["people"]
    assert pair_type("phrase_region", m, [1, reg[("2",)], "coref"]) == "phrase:a red shirt|clothing"
    assert man["control_types"]["train"]["vcd"] == 16 and man["control_types"]["val"] == {}


def _dm(root, man, splits=None):
    return type("DM", (), {"manifest": man, "root": root, "splits": splits or {"train": "train", "val": "val",
                                                                              "test": "test"},
                           "label_counts": lambda self, t, s="train": man["splits"][s]["pairs"].get(t, {})})()


def test_fewer_than_two_types_is_refused(tmp_path):
    """Every object named alike -> one VRC type in train: a control run refuses at start."""
    ov = write_vg(tmp_path / "in")
    p = Path(ov["dataset.region_graphs"])
    graphs = json.loads(p.read_text())
    for im in graphs:
        for reg in im["regions"]:
            for o in reg["objects"]:
                o.pop("names", None)
                o["name"] = "thing"
    p.write_text(json.dumps(graphs))
    man = build("vg", tmp_path / "out", ov)
    assert man["control_types"]["train"]["vrc"] == 1
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"seed": 0, "control": True})
    with pytest.raises(ValueError, match=r"control task for vrc on .*out, split 'train': 1 distinct control type"):
        ControlRelabel.from_config(cfg, type("S", (), {"name": "vrc", "kind": "region_region"})(),
                                   _dm(tmp_path / "out", man))
    with pytest.raises(ValueError, match=r"on x, split 'test': 1 distinct control type"):  # every split is checked
        check_types(load_manifest(tmp_path / "out"), "vrc", "x", ["test"])
    # VRI: "thing" and "<unknown>" regions: thing|thing (related, and dog/grass/collar negatives), thing|<unknown>,
    # <unknown>|thing (the seeded negatives of image 1, none of them a pair another caption of image 1 relates)
    assert check_types(man, "vri", "x", ["train"]) == {"train": 3}


def test_old_schema_is_refused_at_start(vg, tmp_path):
    import shutil

    import webdataset as wds

    root, _ = vg
    old = tmp_path / "old"
    shutil.copytree(root, old)
    man = json.loads((old / "manifest.json").read_text())
    man["schema"] = 1
    man.pop("control_types")
    (old / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SchemaError, match=r"schema 1; this version reads schema 2 .*rebuild it with "
                                          r"python -m value_pl.datasets.build"):
        load_manifest(old)
    from value_pl.data.datamodule import ShardDataModule

    with pytest.raises(SchemaError, match="rebuild it with python -m value_pl.datasets.build"):
        ShardDataModule(old)
    # a schema-1 sample (no regions.names) is refused when decoded, never read as a degenerate type
    raw = next(iter(wds.WebDataset(str(root / "train-000000.tar"), shardshuffle=False)))
    meta = json.loads(raw["json"])
    meta["schema"] = 1
    del meta["regions"]["names"]
    raw["json"] = json.dumps(meta).encode()
    with pytest.raises(SchemaError, match=r"schema 1, this version reads schema 2; rebuild"):
        decode_sample(raw)


# ------------------------------------------------------------------ negatives that are the gold object
def _dups_case(supplied: bool):
    from value_pl.datasets.regions import RegionFeatures, combine_regions

    gold = [10.0, 10.0, 200.0, 200.0]
    det = np.array([[200, 100, 300, 200], gold, [10, 10, 200, 190.5], [0, 210, 100, 300], [220, 0, 320, 90],
                    [150, 150, 320, 240]], np.float32)  # IoU with gold: 0, 1.0, 0.95, 0, 0, small
    rf = RegionFeatures("1", 320, 300, det, np.ones((len(det), 4), np.float32))
    sup = RegionFeatures("1", 320, 300, np.array([gold], np.float32), np.ones((1, 4), np.float32)) if supplied else None
    comb = combine_regions([gold], [["7"]], rf, iou_threshold=0.5, max_regions=36, supplied=sup)
    dup_boxes = [[10.0, 10.0, 200.0, 200.0], [10.0, 10.0, 200.0, 190.5]]
    dups = {r for r, b in enumerate(comb.boxes) if b in dup_boxes} - {r for r, t in enumerate(comb.tags) if t}
    return comb, dups


@pytest.mark.parametrize("supplied", [False, True])
def test_vcd_negatives_are_never_near_duplicates_of_the_gold_box(supplied):
    from value_pl.datasets.common import Issues
    from value_pl.datasets.flickr30k import caption_pairs

    comb, dups = _dups_case(supplied)
    # match mode: the IoU-1.0 detection becomes the positive and the 0.95 one is a duplicate;
    # supplied mode: the annotated box is its own region and both detections are duplicates
    assert len(dups) == (2 if supplied else 1)
    phrases = [{"span": [0, 2], "chain": "7", "types": ["people"], "label": "people"}]
    counted = Counter()
    w = type("W", (), {"skip": lambda self, r, n=1: None,
                       "exclude": lambda self, r, n=1: counted.update({r: n})})()
    for seed in range(20):
        vcd, _ = caption_pairs(phrases, comb, np.random.default_rng(seed), Issues(w), "x", iou_threshold=0.5)
        negs = {r for _, r, lab in vcd if lab == "not_coref"}
        assert negs and not negs & dups, (seed, negs, dups)
    assert counted == {"vcd_negative_overlaps_chain": 20 * len(dups)}


def test_near_duplicates_counted_in_manifests(vg, f30k):
    """IoU 1.0 and 0.95 copies of a gold box: never a negative (nor a VRI negative with the box they copy); the
    manifests count the exclusions."""
    root, man = f30k
    assert man["excluded"] == {"vcd_negative_overlaps_chain": 2}
    assert man["splits"]["test"]["excluded"] == {"vcd_negative_overlaps_chain": 2}
    (m,) = [x["meta"] for x in read_samples(root) if x["key"] == "f30k_500_0"]
    dup = {r for r, b in enumerate(m["regions"]["boxes"]) if b in F30K_NEAR_DUPS["500"] and not m["regions"]["chains"][r]}
    assert len(dup) == 1 + 1  # the IoU-1.0 copy not matched (the first exact detection is) and the 0.95 one
    assert [lab for _, r, lab in m["pairs"]["vcd"] if r in dup] == []
    root, man = vg
    # cup (region matched at IoU 1.0) related to the table; detections at 0.90 and 0.95 of the cup, with the table
    # region, in both orders: 4 candidate negatives that are the related pair; and the three boxes of the cup among
    # themselves, in both orders: 6 candidate negatives that are one object twice; image 1, whose three captions
    # relate man-hat (11, 13) and man-street (12): each caption's sample holds the other pair's regions, 2 x 3
    # candidate negatives that another caption of the image relates; and the fixture's repeated wearing(1, 2) of
    # caption 11, counted once
    assert man["excluded"] == {"vri_negative_overlaps_related": 4, "vri_negative_same_object": 6,
                               "vri_negative_related_in_image": 6, "relation_duplicate": 1}
    assert man["splits"]["train"]["excluded"]["vri_negative_related_in_image"] == 6
    (m,) = [x["meta"] for x in read_samples(root) if x["key"] == "vg_6_61"]
    from value_pl.datasets.regions import iou_matrix

    cupish = set(np.nonzero(iou_matrix(m["regions"]["boxes"], [[50, 50, 90, 90]])[:, 0] >= 0.5)[0].tolist())
    table = m["regions"]["names"].index(["table"])
    assert len(cupish) == 3  # the matched detection and the near-duplicates at IoU 0.90 and 0.95
    as_related = {(c, table) for c in cupish} | {(table, c) for c in cupish}
    unrelated = {(a, b) for a, b, lab in m["pairs"]["vri"] if lab == "unrelated"}
    assert unrelated and not unrelated & as_related
    assert not {(a, b) for a, b in unrelated if a in cupish and b in cupish}  # never the cup and its duplicate


@pytest.mark.skipif(not (SHARED_VG / "region_graphs").exists(), reason="shared real-format fixtures absent")
def test_real_region_graphs_control_types(tmp_path):
    """The real region_graphs.json sample (images 1-3): object names give many distinct VRC types."""
    out, man = build_real_region_graphs(tmp_path)
    n_pairs = sum(man["splits"]["train"]["pairs"]["vrc"].values())
    assert man["control_types"]["train"]["vrc"] >= max(5, n_pairs // 3), (man["control_types"], n_pairs)
    names = {n for x in read_samples(out) for ns in x["meta"]["regions"]["names"] for n in ns}
    assert {"street", "shade", "man"} <= names
