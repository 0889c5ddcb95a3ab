"""Region-feature readers: every format, detection, and the malformed cases (errors name file + line/record)."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures_data import D, f30k_records
from value_pl.datasets.regions import (FORMATS, FeatureDimError, FeatureError, FeatureNaNError, RegionFeatures,
                                    butd_tsv_line, combine_regions, detect_format, iou_matrix, normalise_id,
                                    open_features, write_features)

PATHS = {"butd_tsv": "f.tsv", "lxmert_tsv": "f36.tsv", "uniter_lmdb": "img_db", "npz_dir": "npz"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_and_detect(tmp_path, fmt):
    recs = f30k_records()
    p = write_features(tmp_path / PATHS[fmt], fmt, recs)
    assert detect_format(p) == fmt
    with open_features(p, "auto", feature_dim=D) as r:
        assert r.format == fmt
        assert sorted(r.ids()) == sorted(x[0] for x in recs)
        for iid, W, H, boxes, feats in recs:
            rf = r.get(iid).in_pixels(W, H)
            tol = 0.5 if fmt == "uniter_lmdb" else 1e-4  # UNITER stores fp16 norm_bb / features
            np.testing.assert_allclose(rf.boxes, boxes, atol=tol)
            np.testing.assert_allclose(rf.features, feats, atol=1e-2 if fmt == "uniter_lmdb" else 1e-6)


def test_lxmert_height_before_width(tmp_path):
    p = write_features(tmp_path / "x.tsv", "lxmert_tsv", [("7", 640, 480, np.zeros((1, 4)) + [1, 2, 3, 4],
                                                            np.ones((1, D)))])
    line = p.read_text().split("\t")
    assert line[1] == "480" and line[2] == "640"
    rf = open_features(p, "lxmert_tsv").get("7")
    assert (rf.width, rf.height) == (640, 480)


def test_uniter_conf_threshold_box_count(tmp_path):
    n = 30
    boxes = np.tile([10, 10, 50, 50], (n, 1)).astype(np.float32)
    conf = np.array([0.9] * 15 + [0.1] * 15, np.float32)
    write_features(tmp_path / "db", "uniter_lmdb", [("nlvr2_000000000042", 100, 100, boxes, np.ones((n, D)), conf)])
    with open_features(tmp_path / "db", feature_dim=D) as r:
        assert r.get("42").num_boxes == 15  # clip(15, 10, 100)
        assert r.get("42").normalized
    with open_features(tmp_path / "db", feature_dim=D, conf_th=0.95) as r2:
        assert r2.get("42").num_boxes == 10  # clip(0, 10, 100) = 10


def test_normalise_id():
    assert normalise_id("000123") == "123"
    assert normalise_id("flickr30k_000001000092795.npz") == "1000092795"
    assert normalise_id("COCO_val2014_000000000042") == "42"


# ---------------------------------------------------------------- malformed inputs (>= 10 cases here)
def _tsv(tmp_path, lines, name="f.tsv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _line(iid="1", n=2, d=D, w=100, h=80):
    return butd_tsv_line(iid, w, h, np.tile([1, 1, 20, 20], (n, 1)), np.ones((n, d), np.float32))


def test_truncated_base64_names_file_and_line(tmp_path):
    good, bad = _line("1"), _line("2")
    cols = bad.split("\t")
    cols[5] = cols[5][: len(cols[5]) // 2 + 1]  # cut mid-base64
    p = _tsv(tmp_path, [good, "\t".join(cols)])
    r = open_features(p, "butd_tsv", D)
    r.get("1")
    with pytest.raises(FeatureError, match=r"f\.tsv:2: column features"):
        r.get("2")


def test_truncated_line_missing_columns(tmp_path):
    p = _tsv(tmp_path, [_line("1"), "\t".join(_line("2").split("\t")[:4])])
    with pytest.raises(FeatureError, match=r"f\.tsv:2: 4 columns, expected 6"):
        open_features(p, "butd_tsv", D).get("2")


def test_wrong_feature_dimension(tmp_path):
    p = _tsv(tmp_path, [_line("1", d=D + 1)])
    with pytest.raises(FeatureDimError, match=r"f\.tsv:1: feature dimension 9, expected feature_dim=8"):
        open_features(p, "auto", D).get("1")


def test_nan_features(tmp_path):
    f = np.ones((2, D), np.float32)
    f[1, 3] = np.nan
    p = _tsv(tmp_path, [butd_tsv_line("1", 100, 80, np.tile([1, 1, 20, 20], (2, 1)), f)])
    with pytest.raises(FeatureNaNError, match=r"f\.tsv:1: NaN"):
        open_features(p, "auto", D).get("1")


def test_duplicate_image_id_tsv(tmp_path):
    p = _tsv(tmp_path, [_line("5"), _line("6"), _line("005")])
    with pytest.raises(FeatureError, match=r"f\.tsv:3: duplicate image id 5 \(first at .*f\.tsv:1\)"):
        open_features(p, "butd_tsv", D)


def test_duplicate_image_id_npz(tmp_path):
    recs = [("12", 10, 10, np.array([[1, 1, 5, 5]]), np.ones((1, D)))]
    write_features(tmp_path / "npz", "npz_dir", recs)
    write_features(tmp_path / "npz2", "npz_dir", recs)
    (tmp_path / "npz2" / "12.npz").rename(tmp_path / "npz" / "img_0012.npz")
    with pytest.raises(FeatureError, match="duplicate image id 12"):
        open_features(tmp_path / "npz", "npz_dir", D)


def test_declared_format_mismatch(tmp_path):
    p = _tsv(tmp_path, [_line("1")])
    with pytest.raises(FeatureError, match=r"declared format lxmert_tsv has 10 columns but the file has 6 "
                                           r"\(looks like butd_tsv\)"):
        open_features(p, "lxmert_tsv", D)
    write_features(tmp_path / "db", "uniter_lmdb", [("1", 10, 10, np.array([[1, 1, 5, 5]]), np.ones((1, D)))])
    with pytest.raises(FeatureError, match="declared butd_tsv but this is an LMDB"):
        open_features(tmp_path / "db", "butd_tsv", D)
    with pytest.raises(FeatureError, match="declared uniter_lmdb but this is not a directory"):
        open_features(p, "uniter_lmdb", D)
    with pytest.raises(FeatureError, match="unknown feature format"):
        open_features(p, "h5", D)


def test_undetectable_format(tmp_path):
    p = _tsv(tmp_path, ["a\tb\tc"])
    with pytest.raises(FeatureError, match=r"f\.tsv:1: 3 tab-separated columns"):
        open_features(p)
    with pytest.raises(FeatureError, match="does not exist"):
        open_features(tmp_path / "nope.tsv")


def test_uniter_record_not_npz(tmp_path):
    import lmdb

    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"coco_000000000001.npz", b"\x81\xa8features\xc0")  # msgpack, not npz
    env.close()
    with pytest.raises(FeatureError, match=r"record coco_000000000001\.npz: not a readable npz"):
        open_features(tmp_path / "db", feature_dim=D).get("1")


def test_npz_without_boxes(tmp_path):
    (tmp_path / "npz").mkdir()
    np.savez(tmp_path / "npz" / "3.npz", features=np.ones((2, D)))
    with pytest.raises(FeatureError, match=r"3\.npz: npz has neither 'boxes' nor 'norm_bb'"):
        open_features(tmp_path / "npz").get("3")


def test_bad_base64_characters(tmp_path):
    cols = _line("1").split("\t")
    cols[4] = "!!notbase64!!"
    p = _tsv(tmp_path, ["\t".join(cols)])
    with pytest.raises(FeatureError, match=r"f\.tsv:1: column boxes: truncated or invalid base64"):
        open_features(p, "butd_tsv", D).get("1")


# ---------------------------------------------------------------- IoU + combine
def test_iou_matrix():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]])


def _rf(boxes, feats=None):
    boxes = np.asarray(boxes, np.float32)
    feats = np.arange(len(boxes) * 2, dtype=np.float32).reshape(-1, 2) if feats is None else feats
    return RegionFeatures("1", 100, 100, boxes, feats)


def test_combine_match_mode():
    det = _rf([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 11, 10], [80, 80, 90, 90]])
    c = combine_regions([[0, 0, 10, 10], [50, 50, 61, 60], [30, 30, 40, 40]], [["a"], ["b"], ["c"]], det,
                        iou_threshold=0.5, max_regions=3)
    assert c.ann_region == [0, 1, None]  # box c matches nothing
    assert c.boxes == [[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 11, 10]]  # max_regions=3, detector order
    assert c.tags == [["a"], ["b"], []] and c.source == ["annotated", "annotated", "detected"]
    # matched regions are kept even when late in detector order
    c2 = combine_regions([[80, 80, 90, 90]], [["z"]], det, max_regions=2)
    assert c2.boxes == [[0, 0, 10, 10], [80, 80, 90, 90]] and c2.ann_region == [1]


def test_combine_supplied_mode():
    det = _rf([[0, 0, 10, 10], [50, 50, 60, 60]])
    sup = _rf([[30, 30, 40, 40], [1, 1, 9, 9]], feats=np.full((2, 2), 7, np.float32))
    c = combine_regions([[1, 1, 9, 9], [30, 30, 40, 40], [1, 1, 9, 9]], [["a"], ["b"], ["c"]], det,
                        supplied=sup, max_regions=3)
    assert c.boxes[:2] == [[1, 1, 9, 9], [30, 30, 40, 40]] and c.ann_region == [0, 1, 0]
    assert c.tags[0] == ["a", "c"] and c.source == ["annotated", "annotated", "detected"]
    assert c.feats.shape == (3, 2) and (c.feats[:2] == 7).all()

