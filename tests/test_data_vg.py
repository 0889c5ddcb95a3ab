"""Visual Genome builder: hand-computed counts in every feature format, caps, mismatch variant, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import (CUP, HAT, MAN, STREET, TABLE, VG_EXPECTED, VG_GRAPHS, VG_SKIPPED, _o, _r, _reg, build,
                           build_real_region_graphs, read_samples, SHARED_VG, split_counts, tree_bytes, write_vg,
                           write_vg_small)
from value_pl.datasets.common import BuildError, iter_json_array
from value_pl.datasets.regions import FORMATS, iou_matrix
from value_pl.datasets.vg_graphs import normalise_predicate



def test_normalise_predicate():
    assert normalise_predicate("  Standing   IN ") == "standing in"
    assert normalise_predicate("wears", {"wears": "wearing"}) == "wearing"


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_every_format(tmp_path, fmt):
    man = build("vg", tmp_path / "out", write_vg(tmp_path / "vg", fmt))
    assert split_counts(man) == VG_EXPECTED
    assert man["skipped"] == VG_SKIPPED
    assert man["labels"]["vrc"] == ["on", "wearing"] and man["labels"]["vri"] == ["related", "unrelated"]
    assert man["predicates"] == {"on": {"frequency": 5, "selected": 5}, "wearing": {"frequency": 3, "selected": 3}}
    assert man["chance"]["vrc"]["uniform"] == 0.5
    assert man["chance"]["vrc"]["majority"]["train"] == pytest.approx(4 / 6)


def test_sample_content(tmp_path):
    build("vg", tmp_path / "out", write_vg(tmp_path / "vg"))
    s = {x["key"]: x["meta"] for x in read_samples(tmp_path / "out")}
    m = s["vg_2_21"]
    assert m["words"] == ["dog", "on", "grass", "with", "a", "collar"] and m["phrases"] == []
    # 'wears' (alias -> wearing) to object 61, a merged id of v1.4 object 60
    assert sorted(lab for _, _, lab in m["pairs"]["vrc"]) == ["on", "wearing"]
    reg = {c[0]: i for i, c in enumerate(m["regions"]["chains"]) if c}
    assert [reg["4"], reg["60"], "wearing"] in m["pairs"]["vrc"]
    rel = {(a, b) for a, b, lab in m["pairs"]["vri"] if lab == "related"}
    neg = {(a, b) for a, b, lab in m["pairs"]["vri"] if lab == "unrelated"}
    assert len(rel) == len(neg) == 2 and not rel & neg


def test_caps(tmp_path):
    ov = write_vg(tmp_path / "vg")
    man = build("vg", tmp_path / "out", dict(ov, **{"dataset.max_pairs_per_predicate": 2}))
    assert man["predicates"]["on"]["selected"] == 2 and man["predicates"]["wearing"]["selected"] == 2
    total = {lab: sum(s["pairs"].get("vrc", {}).get(lab, 0) for s in man["splits"].values()) for lab in ("on", "wearing")}
    assert total == {"on": 2, "wearing": 2}
    # per-caption cap: r11 has wearing + on; with top_k=1 (on) and a cap of 1 per caption nothing changes,
    # but a caption with two 'on' relations keeps one
    graphs = json.loads((tmp_path / "vg" / "region_graphs.json").read_text())
    graphs[0]["regions"][1]["relationships"].append({"relationship_id": 99, "predicate": "on", "subject_id": 3,
                                                      "object_id": 1})
    (tmp_path / "vg" / "region_graphs.json").write_text(json.dumps(graphs))
    man = build("vg", tmp_path / "out2", dict(ov, **{"dataset.max_same_predicate_per_caption": 1}))
    assert man["predicates"]["on"] == {"frequency": 6, "selected": 5}


def test_default_no_aliases_keeps_predicates_apart(tmp_path):
    ov = write_vg(tmp_path / "vg")
    ov.pop("dataset.aliases")
    man = build("vg", tmp_path / "out", dict(ov, **{"dataset.top_k": "3"}))
    assert man["labels"]["vrc"][:2] == ["on", "wearing"] and "wears" in man["labels"]["vrc"] + ["wears"]
    assert man["predicates"]["wearing"]["frequency"] == 2  # 'wears' is its own predicate without aliases


def test_mismatch_variant(tmp_path):
    ov = write_vg(tmp_path / "vg")
    normal = build("vg", tmp_path / "n", ov)
    man = build("vg_mismatch", tmp_path / "m", ov)
    assert man["variant"] == "mismatch" and man["dataset"] == "visual_genome_mismatch"
    assert man["splits"]["train"]["pairs"] == normal["splits"]["train"]["pairs"]
    assert man["skipped"]["mismatch_single_image"] == 2  # val and test hold one image each
    n = {x["key"]: x["meta"] for x in read_samples(tmp_path / "n")}
    m = {x["key"]: x["meta"] for x in read_samples(tmp_path / "m")}
    assert set(m) == {"vg_1_11", "vg_1_12", "vg_1_13", "vg_2_21"}
    for k, meta in m.items():
        src = meta["provenance"]["caption_from"]
        assert src.split("_")[1] != k.split("_")[1]  # a caption of another image
        assert meta["words"] == n[src]["words"]
        assert meta["regions"] == n[k]["regions"] and meta["pairs"] == n[k]["pairs"]
    build("vg_mismatch", tmp_path / "m2", ov)
    assert tree_bytes(tmp_path / "m") == tree_bytes(tmp_path / "m2")


def test_rebuild_byte_identical(tmp_path):
    ov = write_vg(tmp_path / "vg", "npz_dir")
    build("vg", tmp_path / "a", ov)
    build("vg", tmp_path / "b", ov)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_strict_unresolved_relation(tmp_path):
    ov = write_vg(tmp_path / "vg")
    with pytest.raises(BuildError, match=r"region_graphs\.json: record 0 \(image 1\) region 12 relationship #1 "
                                         r"\(id 5\): object id\(s\) 999 do not resolve"):
        build("vg", tmp_path / "out", ov, extra=["strict=true"])


def test_duplicate_image_ids(tmp_path):
    ov = write_vg(tmp_path / "vg")
    p = tmp_path / "vg" / "region_graphs.json"
    p.write_text(json.dumps(VG_GRAPHS + [VG_GRAPHS[1]]))
    with pytest.raises(BuildError, match=r"region_graphs\.json: record 6: duplicate image id 2 \(first at record 1\)"):
        build("vg", tmp_path / "out", ov)
    p.write_text(json.dumps(VG_GRAPHS))
    img = tmp_path / "vg" / "image_data.json"
    img.write_text(json.dumps(json.loads(img.read_text()) * 2))
    with pytest.raises(BuildError, match=r"image_data\.json: record 5: duplicate image id 1"):
        build("vg", tmp_path / "out", ov)


def test_truncated_json_stream(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps(VG_GRAPHS)[:-300])
    with pytest.raises(BuildError, match=r"x\.json: record 5: truncated or malformed JSON"):
        list(iter_json_array(p, chunk=64))
    p.write_text(json.dumps(VG_GRAPHS))
    assert [g["image_id"] for g in iter_json_array(p, chunk=16)] == [1, 2, 3, 4, 5, 6]  # small chunks: streaming
    p.write_text('{"a": 1}')
    with pytest.raises(BuildError, match="expected a JSON array"):
        list(iter_json_array(p))


def test_no_features_for_an_image(tmp_path):
    ov = write_vg(tmp_path / "vg")
    lines = Path(ov["dataset.features"]).read_text().splitlines()
    Path(ov["dataset.features"]).write_text("\n".join(lines[:-1]) + "\n")  # drop image 6
    man = build("vg", tmp_path / "out", ov)
    assert man["skipped"]["no_features"] == 1 and man["splits"]["test"]["samples"] == 0


def test_v14_objects_file(tmp_path):
    """A relation id that resolves only through objects.json's merged_object_ids."""
    ov = write_vg(tmp_path / "vg")
    graphs = json.loads((tmp_path / "vg" / "region_graphs.json").read_text())
    graphs[2]["regions"][0]["relationships"][0]["object_id"] = 1010  # shirt's old id, absent from the region
    (tmp_path / "vg" / "region_graphs.json").write_text(json.dumps(graphs))
    man = build("vg", tmp_path / "a", ov)
    assert man["skipped"]["relation_unresolved"] == 2 and man["splits"]["val"]["samples"] == 0
    (tmp_path / "vg" / "objects.json").write_text(json.dumps([{"image_id": 3, "objects": [
        {"object_id": 10, "merged_object_ids": [1010], "x": 310, "y": 150, "w": 80, "h": 100, "names": ["shirt"]}]}]))
    man = build("vg", tmp_path / "b", dict(ov, **{"dataset.objects": str(tmp_path / "vg" / "objects.json")}))
    assert man["skipped"]["relation_unresolved"] == 1 and man["splits"]["val"]["samples"] == 1


@pytest.mark.skipif(not (SHARED_VG / "region_graphs").exists(), reason="shared real-format fixtures absent")
def test_real_region_graphs(tmp_path):
    """The real region_graphs.json sample (images 1-3) with synthetic detections at the object boxes."""
    _, man = build_real_region_graphs(tmp_path)
    assert man["splits"]["train"]["samples"] > 0 and "on" in man["labels"]["vrc"]
    assert man["predicates"]["on"]["frequency"] >= 5  # 'ON' and 'on' merged by normalisation



# ------------------------------------------------------- VRI negatives vs. relations of other captions of the image
#: image 1: the caption "man wearing hat", the caption "man on street" and a region with an empty phrase whose
#: relation "hat near street" is still an annotation of the image. Detections: one close to each object (1 px
#: inside) and a kite-like box that no object is at, the only region that no relation of the image touches.
VG_IMAGE_RELS = [{"image_id": 1, "regions": [
    _reg(1, 11, "man wearing hat", [MAN, HAT], [_r(1, "wearing", 1, 2)]),
    _reg(1, 12, "man on street", [MAN, STREET], [_r(2, "on", 1, 3)]),
    _reg(1, 13, " ", [HAT, STREET], [_r(3, "near", 2, 3)]),  # empty_caption: no sample, its relation still counts
]}]
VG_IMAGE_RELS_DETECTIONS = {1: [[101, 101, 199, 399], [121, 91, 179, 119], [1, 401, 799, 599], [600, 20, 700, 80]]}
KITE = [600.0, 20.0, 700.0, 80.0]


def _image_relation_boxes(graphs: list[dict]) -> dict[str, list[tuple[list, list]]]:
    """image id -> the (subject box, object box) of every relation of every region of the image (x1, y1, x2, y2)."""
    out: dict[str, list] = {}
    for im in graphs:
        for reg in im["regions"]:
            obj = {o["object_id"]: o for o in reg["objects"]}
            for r in reg["relationships"]:
                s, o = obj[r["subject_id"]], obj[r["object_id"]]
                out.setdefault(str(im["image_id"]), []).append(
                    tuple([q["x"], q["y"], q["x"] + q["w"], q["y"] + q["h"]] for q in (s, o)))
    return out


def _leaked_negatives(samples: list[dict], graphs: list[dict], thr: float = 0.5) -> list:
    """VRI "unrelated" pairs whose regions are, up to IoU >= ``thr`` (either direction), a relation of the image."""
    rels = _image_relation_boxes(graphs)
    out = []
    for x in samples:
        m = x["meta"]
        boxes = m["regions"]["boxes"]
        for a, b, lab in m["pairs"]["vri"]:
            if lab != "unrelated":
                continue
            for sb, ob in rels.get(m["image"]["id"], []):
                iou = iou_matrix([boxes[a], boxes[b]], [sb, ob])
                if (iou[0, 0] >= thr and iou[1, 1] >= thr) or (iou[0, 1] >= thr and iou[1, 0] >= thr):
                    out.append((x["key"], a, b))
    return out


def test_vri_negatives_exclude_relations_of_other_captions(tmp_path):
    """A region pair that another caption of the same image relates (man on street for the caption "man wearing
    hat"), or a region with an empty phrase (hat near street), is never "unrelated"; counted as
    ``excluded.vri_negative_related_in_image``."""
    ov = write_vg_small(tmp_path / "vg", VG_IMAGE_RELS, {1: (800, 600)}, {"train": [1]}, VG_IMAGE_RELS_DETECTIONS)
    man = build("vg", tmp_path / "out", ov)
    samples = read_samples(tmp_path / "out")
    assert sorted(x["key"] for x in samples) == ["vg_1_11", "vg_1_12"]
    # each sample (4 regions): the other two relations of the image, both directions
    assert man["excluded"]["vri_negative_related_in_image"] == 8
    assert man["splits"]["train"]["excluded"]["vri_negative_related_in_image"] == 8
    assert man["skipped"] == {"empty_caption": 1}
    assert man["splits"]["train"]["pairs"]["vri"] == {"related": 2, "unrelated": 2}
    assert _leaked_negatives(samples, VG_IMAGE_RELS) == []
    for x in samples:  # only pairs with the kite are left as negatives
        m = x["meta"]
        neg = [(a, b) for a, b, lab in m["pairs"]["vri"] if lab == "unrelated"]
        assert len(neg) == 1 and KITE in [m["regions"]["boxes"][r] for r in neg[0]], x["key"]
    # with top_k=1 only "on" is a class; "wearing" and "near" still relate their pairs
    man = build("vg", tmp_path / "out1", dict(ov, **{"dataset.top_k": 1}))
    assert man["labels"]["vrc"] == ["on"] and man["excluded"]["vri_negative_related_in_image"] == 4
    assert _leaked_negatives(read_samples(tmp_path / "out1"), VG_IMAGE_RELS) == []


@pytest.mark.skipif(not (SHARED_VG / "region_graphs").exists(), reason="shared real-format fixtures absent")
def test_real_region_graphs_no_related_negatives(tmp_path):
    """On the real region graphs (images 1-3) no "unrelated" pair is a relation of another caption of the image."""
    out, man = build_real_region_graphs(tmp_path)
    graphs = json.loads((SHARED_VG / "region_graphs" / "region_graphs_images_1-3.json").read_text())
    samples = read_samples(out)
    assert sum(lab == "unrelated" for x in samples for _, _, lab in x["meta"]["pairs"]["vri"]) > 0
    assert _leaked_negatives(samples, graphs) == []
    assert man["excluded"]["vri_negative_related_in_image"] > 0


# ------------------------------------------------------------- split_files: images in no split are not selected
def _cup_on_table(iid: int, rid: int) -> dict:
    return _reg(iid, rid, "cup on table", [CUP, TABLE], [_r(rid, "on", 13, 14)])


def _pred(iid: int, rid: int, pred: str) -> dict:
    a, b = _o(100 + rid, "box", 10, 10, 50, 50), _o(200 + rid, "shelf", 0, 100, 300, 150)
    return _reg(iid, rid, f"box {pred} shelf", [a, b], [_r(rid, pred, a["object_id"], b["object_id"])])


#: images 1 (train) and 2 (val): two "on" captions each (4 "on" relations in the splits). Image 3, in no split
#: file: 3 more "on" and 6 "under" -- before the fix they were ranked and selected but never written.
VG_SPLIT_GRAPHS = [
    {"image_id": 1, "regions": [_cup_on_table(1, 11), _cup_on_table(1, 12)]},
    {"image_id": 2, "regions": [_cup_on_table(2, 21), _cup_on_table(2, 22)]},
    {"image_id": 3, "regions": [_pred(3, 30 + k, "on") for k in range(3)]
                               + [_pred(3, 40 + k, "under") for k in range(6)]},
]


def test_split_files_select_only_images_in_a_split(tmp_path):
    """With split_files, an image in no split counts as ``skipped.image_not_in_split`` in pass 1: its relations
    neither rank predicates nor take places under max_pairs_per_predicate, so ``predicates[p].selected`` is what
    the shards hold."""
    sizes = {1: (400, 300), 2: (400, 300), 3: (400, 300)}
    det = {i: [[51, 51, 89, 89], [1, 91, 299, 289], [300, 0, 399, 60], [10, 200, 60, 290]] for i in sizes}
    ov = write_vg_small(tmp_path / "vg", VG_SPLIT_GRAPHS, sizes, {"train": [1], "val": [2], "test": []}, det,
                        {"dataset.max_pairs_per_predicate": 3, "dataset.top_k": 2})
    man = build("vg", tmp_path / "out", ov)
    assert man["skipped"] == {"image_not_in_split": 1}
    assert man["labels"]["vrc"] == ["on"] and man["num_predicates_seen"] == 1
    assert man["predicates"] == {"on": {"frequency": 4, "selected": 3}}
    written = sum(v["pairs"].get("vrc", {}).get("on", 0) for v in man["splits"].values())
    assert written == man["predicates"]["on"]["selected"] == 3
    assert {x["meta"]["image"]["id"] for x in read_samples(tmp_path / "out")} <= {"1", "2"}
    # the cap above what the splits hold: all 4 written
    man = build("vg", tmp_path / "out2", dict(ov, **{"dataset.max_pairs_per_predicate": 10}))
    assert man["predicates"]["on"]["selected"] == 4
    assert sum(v["pairs"].get("vrc", {}).get("on", 0) for v in man["splits"].values()) == 4


def test_caption_object_with_a_bad_box_is_counted(tmp_path):
    """An object of a selected caption whose box lies outside the image (or has no area) and that is in no relation
    is left out of the sample's annotated regions: a counted skip naming the record and object, not a silent drop."""
    lamp = _o(77, "lamp", 350, 10, 200, 50, synsets=["lamp.n.01"])  # x2 = 550 > W = 400
    graphs = [{"image_id": 1, "regions": [_reg(1, 11, "cup on table near a lamp", [CUP, TABLE, lamp],
                                               [_r(11, "on", 13, 14)])]}]
    det = {1: [[51, 51, 89, 89], [1, 91, 299, 289], [300, 0, 399, 60], [10, 200, 60, 290]]}
    ov = write_vg_small(tmp_path / "vg", graphs, {1: (400, 300)}, {"train": [1]}, det)
    man = build("vg", tmp_path / "out", ov)
    assert man["skipped"] == {"object_box_outside_image": 1}
    assert "region 11 object 77" in man["skipped_examples"]["object_box_outside_image"][0]
    (s,) = read_samples(tmp_path / "out")
    assert s["meta"]["pairs"]["vrc"] == [[0, 1, "on"]]
    assert "lamp" not in {n for ns in s["meta"]["regions"]["names"] for n in ns}


def test_duplicate_region_id_raises(tmp_path):
    """Two regions of one image with the same region_id would give two samples of one key, which the loader reads as
    one broken sample ("has two .json files") after a build that looked fine: the build raises naming the record;
    the shard writer refuses a duplicate key whatever the builder."""
    from value_pl.datasets.writer import ShardSetWriter

    book, shelf = _o(21, "book", 200, 10, 50, 50), _o(22, "shelf", 150, 5, 200, 100)
    graphs = [{"image_id": 1, "regions": [_cup_on_table(1, 11),
                                          _reg(1, 11, "book on shelf", [book, shelf], [_r(12, "on", 21, 22)])]}]
    det = {1: [[51, 51, 89, 89], [1, 91, 299, 289], [200, 10, 250, 60], [150, 5, 350, 105]]}
    ov = write_vg_small(tmp_path / "vg", graphs, {1: (400, 300)}, {"train": [1]}, det)
    with pytest.raises(BuildError, match=r"region_graphs\.json: record 0 \(image 1\): duplicate region id 11"):
        build("vg", tmp_path / "out", ov)
    meta = {"schema": 2, "image": {"id": "1", "width": 4, "height": 4}, "words": ["a"], "phrases": [],
            "regions": {"boxes": [], "chains": [], "source": [], "names": []}, "pairs": {}}
    w = ShardSetWriter(tmp_path / "w", "x")
    with pytest.raises(ValueError, match="train/k: duplicate sample key"):
        w.write_split("train", iter([("k", meta, np.zeros((0, 4), np.float16))] * 2))
    w.abort()


def test_a_relation_repeated_through_duplicate_objects_counts_once(tmp_path):
    """VG v1.2 holds duplicate objects (other ids, the same box; v1.4 merged them). Two relations of one caption
    through such duplicates are one region pair with one label: kept once (never a doubled VRC pair, a doubled
    predicate count or a VRC/VRI mismatch), the repeat counted in ``excluded``; so is a relation repeated with
    the same ids, and one whose near-duplicate boxes land on the same detected regions."""
    man1, man2, shirt = _o(1, "man", 100, 100, 100, 300), _o(21, "man", 100, 100, 100, 300), \
        _o(10, "shirt", 110, 150, 80, 100)
    man3 = _o(31, "man", 101, 100, 100, 299)  # a near-duplicate box of man1: the same detected region
    rels = [_r(1, "wearing", 1, 10), _r(2, "WEARING", 21, 10), _r(3, "wearing", 1, 10), _r(4, "wearing", 31, 10)]
    graphs = [{"image_id": 1, "regions": [_reg(1, 11, "man wearing a shirt", [man1, man2, man3, shirt], rels)]}]
    det = {1: [[100, 100, 200, 400], [110, 150, 190, 250], [600, 20, 700, 80], [0, 450, 300, 590]]}
    ov = write_vg_small(tmp_path / "vg", graphs, {1: (800, 600)}, {"train": [1]}, det)
    man = build("vg", tmp_path / "out", ov)
    (s,) = read_samples(tmp_path / "out")
    assert s["meta"]["pairs"]["vrc"] == [[0, 1, "wearing"]]
    assert [p for p in s["meta"]["pairs"]["vri"] if p[2] == "related"] == [[0, 1, "related"]]
    assert man["predicates"] == {"wearing": {"frequency": 2, "selected": 2}}
    assert man["excluded"]["relation_duplicate"] == 2 and man["excluded"]["vrc_duplicate_region_pair"] == 1
    assert man["splits"]["train"]["pairs"]["vrc"] == {"wearing": 1}
