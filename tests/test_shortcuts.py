"""Label shortcuts the pair builders must not introduce: VCD negatives drawn like the positives (annotated objects
first), so that "is this region an annotated object" does not predict the label (benchmarks/shortcuts.py measures
the trivial baselines on larger simulated sets)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_data import MAN, D, _o, _r, _reg, build, f30k_xml, read_samples, write_vg_small

from value_pl.data.options import OptionError
from value_pl.datasets.common import BuildError
from value_pl.datasets.flickr30k import caption_pairs
from value_pl.datasets.regions import write_features

W, H = 500, 375
# chain -> (type, 1-based boxes): a person in a shirt with a dog, a ball and the street; chain 1 has two boxes
OBJECTS = {"1": ("people", [(41, 31, 200, 370), (301, 41, 420, 360)]), "2": ("clothing", [(61, 101, 180, 220)]),
           "3": ("animals", [(221, 251, 300, 370)]), "4": ("other", [(431, 301, 480, 350)]),
           "5": ("scene", [(1, 281, 500, 375)])}
CAPTIONS = ["[/EN#1/people Two men] and [/EN#3/animals a dog] on [/EN#5/scene the street] .",
            "[/EN#1/people People] near [/EN#4/other a ball] .",
            "[/EN#2/clothing A red shirt] .",
            "[/EN#3/animals The dog] plays with [/EN#4/other a ball] .",
            "[/EN#1/people Two friends] walk on [/EN#5/scene a road] ."]


def _detections(objects, seed=0):
    """BUTD-like: one detection on each gold box, then 30 small background boxes (IoU < 0.5 with every object)."""
    rng = np.random.default_rng(seed)
    gold = [[b[0] - 1, b[1] - 1, b[2], b[3]] for _t, bxs in objects.values() for b in bxs]
    bg = []
    while len(bg) < 30:
        x, y = rng.uniform(200, 290), rng.uniform(5, 230)
        bg.append([x, y, x + rng.uniform(8, 20), y + rng.uniform(8, 20)])
    return np.array(gold + bg, np.float32)


def write_f30k(root: Path, images=("11", "12", "13"), objects=OBJECTS, captions=CAPTIONS, test=()) -> dict:
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir(parents=True)
    objs = [([c], b) for c, (_t, bxs) in objects.items() for b in bxs]
    recs = []
    for k, iid in enumerate(images):
        (root / "Sentences" / f"{iid}.txt").write_text("\n".join(captions) + "\n")
        (root / "Annotations" / f"{iid}.xml").write_text(f30k_xml(W, H, objs))
        det = _detections(objects, k)
        recs.append((iid, W, H, det, np.abs(np.random.default_rng(k).standard_normal((len(det), D)))))
    (root / "train.txt").write_text("".join(f"{i}\n" for i in images if i not in test))
    (root / "val.txt").write_text("")
    (root / "test.txt").write_text("".join(f"{i}\n" for i in test))
    (root / "UNRELATED_CAPTIONS").write_text("# none\n")
    write_features(root / "feats.tsv", "butd_tsv", [(i, w, h, b, f.astype(np.float32)) for i, w, h, b, f in recs])
    return {"dataset.root": str(root), "dataset.features": str(root / "feats.tsv")}


def _vcd(samples):
    """(label, region carries a chain, phrase chain, region chains) of every VCD pair."""
    out = []
    for s in samples:
        m = s["meta"]
        for a, r, lab in m["pairs"]["vcd"]:
            out.append((lab, bool(m["regions"]["chains"][r]), m["phrases"][a]["chain"], m["regions"]["chains"][r]))
    return out


def test_vcd_negatives_are_annotated_objects_first(tmp_path):
    man = build("flickr30k", tmp_path / "out", write_f30k(tmp_path / "f30k"))
    pairs = _vcd(read_samples(tmp_path / "out"))
    neg = [p for p in pairs if p[0] == "not_coref"]
    assert len(neg) == sum(p[0] == "coref" for p in pairs) == 3 * 13  # 13 positives per image's 5 captions
    # every phrase has at least as many other-chain regions as positives: no negative is a bare detection
    assert all(ann for _lab, ann, _c, _rc in neg)
    assert all(c not in rc for _lab, _a, c, rc in neg)
    # so "the region is an annotated object" predicts nothing: every pair's region is one
    assert all(ann for _lab, ann, _c, _rc in pairs)
    assert man["vcd_negatives"] == {"rule": "annotated_first", "sources": {"annotated": 39, "detected": 0}}


def test_vcd_negatives_uniform_reads_the_label_from_annotatedness(tmp_path):
    """The old rule (``vcd_negatives=uniform``): most negatives are background detections, so the trivial rule
    "annotated region -> coref" scores far above chance."""
    man = build("flickr30k", tmp_path / "out", dict(write_f30k(tmp_path / "f30k"), **{"dataset.vcd_negatives":
                                                                                      "uniform"}))
    pairs = _vcd(read_samples(tmp_path / "out"))
    acc = np.mean([(lab == "coref") == ann for lab, ann, _c, _rc in pairs])
    assert acc > 0.8  # 0.5 under annotated_first
    src = man["vcd_negatives"]["sources"]
    assert man["vcd_negatives"]["rule"] == "uniform" and src["detected"] > src["annotated"]
    assert src["detected"] + src["annotated"] == 39


def test_vcd_negatives_fall_back_to_detections_and_count_them(tmp_path):
    """A chain with more boxes than there are regions of other chains: the rest of its negatives are detections,
    counted in ``vcd_negatives.sources``."""
    objects = {"1": ("people", [(41, 31, 120, 370), (151, 41, 230, 360), (301, 41, 380, 360)]),
               "2": ("clothing", [(401, 101, 480, 220)])}
    ov = write_f30k(tmp_path / "f30k", ("21",), objects, ["[/EN#1/people Three men] in [/EN#2/clothing a shirt] ."])
    man = build("flickr30k", tmp_path / "out", ov)
    (s,) = read_samples(tmp_path / "out")
    chains = s["meta"]["regions"]["chains"]
    neg0 = [r for a, r, lab in s["meta"]["pairs"]["vcd"] if a == 0 and lab == "not_coref"]
    assert len(neg0) == 3 and sum(bool(chains[r]) for r in neg0) == 1  # the shirt, then two detections
    assert man["vcd_negatives"]["sources"] == {"annotated": 2, "detected": 2}  # phrase 1: a man's region + 1


def test_vcd_negatives_bad_setting_raises(tmp_path):
    """The build's start-up check refuses an unknown rule before anything is read; the builder itself does too."""
    with pytest.raises(OptionError, match="dataset.vcd_negatives='random': must be one of annotated_first, uniform"):
        build("flickr30k", tmp_path / "out", dict(write_f30k(tmp_path / "f30k"), **{"dataset.vcd_negatives":
                                                                                     "random"}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(BuildError, match="dataset.vcd_negatives: one of annotated_first, uniform, got 'random'"):
        caption_pairs([], None, None, None, "x", negatives="random")


def test_caption_overlap_counted_flickr30k(tmp_path):
    """Held-out samples whose caption is also a train caption (a prober may have memorised it with its label) are
    counted in the manifest: here image 13 repeats the train images' five captions, one of them in a new case."""
    caps = CAPTIONS[:4] + [CAPTIONS[4].replace(" walk ", " WALK ")]
    man = build("flickr30k", tmp_path / "out", write_f30k(tmp_path / "f30k", captions=caps, test=("13",)))
    assert man["caption_overlap"] == {"val": {"samples": 0, "caption_in_train": 0},
                                      "test": {"samples": 5, "caption_in_train": 5}}


def test_caption_overlap_counted_vg(tmp_path):
    hat = _o(2, "hat", 120, 90, 60, 30)
    graphs = [{"image_id": i, "regions": [_reg(i, 10 * i, phrase, [dict(MAN), dict(hat)], [_r(1, "wearing", 1, 2)])]}
              for i, phrase in ((1, "man wearing hat"), (2, "Man wearing  hat"), (3, "a man with a hat"))]
    dets = {i: [[100, 100, 200, 400], [120, 90, 180, 120], [500, 0, 600, 100]] for i in (1, 2, 3)}
    ov = write_vg_small(tmp_path / "vg", graphs, {i: (800, 600) for i in (1, 2, 3)},
                        {"train": [1], "val": [2], "test": [3]}, dets)
    man = build("vg", tmp_path / "out", ov)
    assert man["caption_overlap"] == {"val": {"samples": 1, "caption_in_train": 1},
                                      "test": {"samples": 1, "caption_in_train": 0}}


def test_vcd_negatives_default_is_annotated_first():
    from omegaconf import OmegaConf

    from value_pl import CONFIG_DIR

    assert OmegaConf.load(Path(CONFIG_DIR) / "dataset" / "flickr30k.yaml")["vcd_negatives"] == "annotated_first"
