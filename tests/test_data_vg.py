"""Visual Genome builder: hand-computed counts in every feature format, caps, mismatch variant, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_data import (VG_EXPECTED, VG_GRAPHS, VG_SKIPPED, build, build_real_region_graphs, read_samples, SHARED_VG,
                           split_counts, tree_bytes, write_vg)
from value_pl.datasets.common import BuildError, iter_json_array
from value_pl.datasets.regions import FORMATS
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

