"""Flickr30k Entities builder: hand-computed manifest counts in every feature format, malformed cases,
determinism, atomicity, and the documented CLI command end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_data import (D, F30K_EXPECTED, F30K_SKIPPED, build, read_samples, split_counts, tree_bytes,
                           write_features, write_flickr30k)
from value_pl.datasets.common import BuildError
from value_pl.datasets.flickr30k import MarkupError, parse_caption
from value_pl.datasets.regions import FORMATS, FeatureDimError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/fixtures/flickr30k_entities")


def test_parse_caption_multitype_and_notvisual():
    words, ph = parse_caption("[/EN#4/bodyparts/people A hand] near [/EN#0/notvisual it] .")
    assert words == ["A", "hand", "near", "it", "."]
    assert ph[0] == {"span": [0, 2], "chain": "4", "types": ["bodyparts", "people"], "label": "bodyparts"}
    assert ph[1]["label"] == "notvisual" and ph[1]["chain"] == "0"


@pytest.mark.parametrize("line,msg", [
    ("[/EN#1/people A man is here .", "never closed"),
    ("[/EN#1/people A [/EN#2/other b] c]", "opened inside phrase"),
    ("[/EN#x/people A man]", "bad phrase header"),
    ("[/EN#1/robots A robot]", "unknown phrase type 'robots'"),
    ("A man ] stands", "outside a phrase"),
    ("[/EN#0/people A man]", "reserved for notvisual"),
])
def test_malformed_markup(line, msg):
    with pytest.raises(MarkupError, match=msg):
        parse_caption(line)


@pytest.mark.skipif(not (SHARED / "Sentences").exists(), reason="shared real-format fixtures absent")
def test_real_sentences_parse():
    n_caps = n_ph = 0
    for f in sorted((SHARED / "Sentences").glob("*.txt")):
        for line in f.read_text().splitlines():
            words, ph = parse_caption(line)
            n_caps += 1
            n_ph += len(ph)
            for p in ph:
                assert " ".join(words[p["span"][0]:p["span"][1]])
    assert (n_caps, n_ph) == (40, 129)


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_every_format(tmp_path, fmt):
    ov = write_flickr30k(tmp_path / "f30k", fmt)
    man = build("flickr30k", tmp_path / "out", ov)
    assert split_counts(man) == F30K_EXPECTED
    assert man["skipped"] == F30K_SKIPPED
    assert man["regions"]["features_format"] == fmt
    assert set(man["inputs"]) >= {ov["dataset.features"] if fmt != "uniter_lmdb" else ov["dataset.features"] +
                                  "/data.mdb", str(tmp_path / "f30k" / "train.txt")}


def test_sample_content_and_balance(tmp_path):
    man = build("flickr30k", tmp_path / "out", write_flickr30k(tmp_path / "f30k"))
    samples = {s["key"]: s for s in read_samples(tmp_path / "out")}
    s = samples["f30k_100_0"]["meta"]
    assert s["words"][:2] == ["A", "man"] and s["image"] == {"id": "100", "width": 500.0, "height": 400.0}
    assert s["regions"]["chains"] == [["1"], [], ["2"], ["3", "4"], ["1"], []]
    assert samples["f30k_100_0"]["feats"].dtype == np.float16 and samples["f30k_100_0"]["feats"].shape == (6, D)
    vcd = s["pairs"]["vcd"]
    for p in range(3):  # per phrase: as many negatives as positives, negatives outside the chain
        pos = [r for a, r, lab in vcd if a == p and lab == "coref"]
        neg = [r for a, r, lab in vcd if a == p and lab == "not_coref"]
        assert len(pos) == len(neg) and not set(pos) & set(neg)
        assert all(s["phrases"][p]["chain"] not in s["regions"]["chains"][r] for r in neg)
    assert "f30k_200_2" not in samples  # the known unrelated caption
    assert samples["f30k_100_2"]["meta"]["pairs"]["vcc"] == [[0, 3, "bodyparts"]]
    assert man["labels"]["vcc"][0] == "people" and len(man["labels"]["vcc"]) == 8


def test_supplied_annotated_features(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    recs = []  # features "extracted for the annotated boxes" of images 100, 200, 500
    from fixtures_data import F30K_IMAGES
    for iid in ("100", "200", "500"):
        W, H, objs, _ = F30K_IMAGES[iid]
        bx = [[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b in objs if isinstance(b, tuple)]
        recs.append((iid, W, H, np.array(bx, np.float32), np.full((len(bx), D), 3, np.float32)))
    write_features(tmp_path / "ann.tsv", "butd_tsv", recs)
    man = build("flickr30k", tmp_path / "out", dict(ov, **{"dataset.annotated_features": str(tmp_path / "ann.tsv"),
                                                           "dataset.max_regions": 5}))
    assert man["regions"]["mode"] == "supplied"
    s = {x["key"]: x for x in read_samples(tmp_path / "out")}["f30k_100_0"]
    assert s["meta"]["regions"]["source"] == ["annotated"] * 4 + ["detected"]  # 4 boxes + 1 detection = 5
    assert s["meta"]["regions"]["boxes"][0] == [10.0, 20.0, 110.0, 220.0]
    assert (s["feats"][:4] == 3).all()
    # annotated box 13 of image 200 is supplied too, so nothing is unmatched now
    assert "annotated_box_unmatched" not in man["skipped"]
    assert split_counts(man)["train"]["pairs"]["vcd"] == {"coref": 9, "not_coref": 9}


def test_rebuild_byte_identical_and_seed_matters(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    build("flickr30k", tmp_path / "a", ov)
    build("flickr30k", tmp_path / "b", ov)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    build("flickr30k", tmp_path / "c", ov, extra=["seed=1"])
    assert tree_bytes(tmp_path / "a") != tree_bytes(tmp_path / "c")


def test_strict_raises_with_file_and_line(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    with pytest.raises(BuildError, match=r"Sentences/100\.txt:4: phrase \[/EN#1/\.\.\. is never closed"):
        build("flickr30k", tmp_path / "out", ov, extra=["strict=true"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_interrupted_build_leaves_no_complete_set(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    man = build("flickr30k", tmp_path / "out", ov)
    before = tree_bytes(tmp_path / "out")
    # wrong feature dimension: an error mid-build; the previous set stays as it was, no .partial left
    with pytest.raises(FeatureDimError, match=r"feats\.tsv:1: feature dimension 8, expected feature_dim=16"):
        build("flickr30k", tmp_path / "out", ov, extra=["feature_dim=16"])
    assert tree_bytes(tmp_path / "out") == before and not (tmp_path / "out.partial").exists()
    assert man["splits"]["train"]["samples"] == 7


def test_duplicate_image_across_splits(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    (tmp_path / "f30k" / "val.txt").write_text("300\n100\n")
    with pytest.raises(BuildError, match=r"val\.txt: image id 100 is also in split train"):
        build("flickr30k", tmp_path / "out", ov)
    (tmp_path / "f30k" / "val.txt").write_text("300\n300\n")
    with pytest.raises(BuildError, match=r"val\.txt:2: duplicate image id 300"):
        build("flickr30k", tmp_path / "out", ov)


def test_malformed_xml_and_missing_files(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    (tmp_path / "f30k" / "Annotations" / "500.xml").write_text("<annotation><size><width>3")
    (tmp_path / "f30k" / "Sentences" / "200.txt").unlink()
    man = build("flickr30k", tmp_path / "out", ov)
    assert man["skipped"]["malformed_xml"] == 1 and man["skipped"]["missing_sentences"] == 1
    assert man["splits"]["test"]["samples"] == 0 and man["splits"]["train"]["samples"] == 4
    assert any("500.xml" in e for e in man["skipped_examples"]["malformed_xml"])


def test_nan_and_corrupt_features_are_counted(tmp_path):
    ov = write_flickr30k(tmp_path / "f30k")
    lines = Path(ov["dataset.features"]).read_text().splitlines()
    from value_pl.datasets.regions import butd_tsv_line
    f = np.ones((2, D), np.float32)
    f[0, 0] = np.nan
    lines[3] = butd_tsv_line("500", 320, 240, np.array([[10, 10, 200, 200], [0, 0, 5, 5]]), f)  # image 500: NaN
    lines[1] = lines[1][:-40]  # image 200: truncated line (base64 cut)
    Path(ov["dataset.features"]).write_text("\n".join(lines) + "\n")
    man = build("flickr30k", tmp_path / "out", ov)
    assert man["skipped"]["nan_features"] == 1 and man["skipped"]["corrupt_features"] == 1
    assert man["splits"]["train"]["samples"] == 4 and man["splits"]["test"]["samples"] == 0
    for split in ("train", "val"):
        (tmp_path / "f30k" / f"{split}.txt").write_text("")
    (tmp_path / "f30k" / "test.txt").write_text("500\n")
    with pytest.raises(BuildError, match=r"feats\.tsv:4: NaN/inf in the features of 1 region"):
        build("flickr30k", tmp_path / "out2", ov, extra=["strict=true"])


def test_non_utf8_caption_is_a_counted_skip_naming_file_and_line(tmp_path):
    """A Sentences line that is not UTF-8 (e.g. a Latin-1 accent) is a counted skip naming file and line -- not a
    bare UnicodeDecodeError that stops the build without saying where; the image's other captions are kept. A
    region-feature TSV line with such bytes is a counted corrupt_features skip naming the file and line."""
    ov = write_flickr30k(tmp_path / "f30k")
    sent = tmp_path / "f30k" / "Sentences" / "200.txt"
    lines = sent.read_bytes().splitlines()
    lines[1] = "[/EN#11/vehicles A caf\u00e9 car] .".encode("latin-1")
    sent.write_bytes(b"\n".join(lines) + b"\n")
    feats = Path(ov["dataset.features"])
    tsv = feats.read_bytes().splitlines()
    tsv[3] = tsv[3][:-10] + b"\xe9" + tsv[3][-9:]  # image 500
    feats.write_bytes(b"\n".join(tsv) + b"\n")
    man = build("flickr30k", tmp_path / "out", ov)
    assert man["skipped"]["not_utf8"] == 1 and man["skipped"]["corrupt_features"] == 1
    assert man["skipped_examples"]["not_utf8"][0].startswith(f"{sent}:2: not UTF-8 text (byte 0xe9")
    assert "feats.tsv:4" in man["skipped_examples"]["corrupt_features"][0]
    assert man["splits"]["train"]["samples"] == F30K_EXPECTED["train"]["samples"] - 1
    ov = write_flickr30k(tmp_path / "g")  # strict: image 500 alone, its caption not UTF-8
    for split in ("train", "val", "test"):
        (tmp_path / "g" / f"{split}.txt").write_text("500\n" if split == "test" else "")
    (tmp_path / "g" / "Sentences" / "500.txt").write_bytes("[/EN#50/people A caf\u00e9 woman] .\n".encode("latin-1"))
    with pytest.raises(BuildError, match=r"500\.txt:1: not UTF-8 text"):
        build("flickr30k", tmp_path / "out2", ov, extra=["strict=true"])


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    """The command in docs/datasets.md, as a subprocess (Hydra CLI)."""
    ov = write_flickr30k(tmp_path / "f30k")
    cmd = [sys.executable, "-m", "value_pl.datasets.build", "dataset=flickr30k", f"dataset.root={tmp_path / 'f30k'}",
           f"dataset.features={ov['dataset.features']}", f"out={tmp_path / 'shards'}", f"feature_dim={D}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train: 7 samples" in r.stdout and "skipped: annotated_box_unmatched 1" in r.stdout
    man = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert split_counts(man) == F30K_EXPECTED


def test_a_name_that_is_not_a_chain_id_is_an_error_not_dropped(tmp_path):
    """An object's <name> tags are chain ids; one that is not (beside a numeric one) is not silently left out: the
    file is refused naming the object, and a build counts it under malformed_xml like any broken annotation."""
    from value_pl.datasets.flickr30k import parse_annotation

    p = tmp_path / "1.xml"
    p.write_text("<annotation><size><width>10</width><height>10</height><depth>3</depth></size>"
                 "<object><name>12</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
                 "</object><object><name>7</name><name>dog</name><nobndbox>1</nobndbox></object></annotation>")
    with pytest.raises(BuildError, match=r"1\.xml: <object> #2 has a <name> that is not a chain id: 'dog'"):
        parse_annotation(p)
    p.write_text(p.read_text().replace("<name>dog</name>", "<name> 8 </name>"))
    W, H, boxes, chains, unboxed = parse_annotation(p)
    assert chains == {"12", "7", "8"} and unboxed == {"7", "8"} and boxes[0][1] == ["12"]


def test_an_empty_sentences_file_is_a_counted_skip_not_a_silent_drop(tmp_path):
    """A Sentences file cut to nothing (an interrupted copy) would give its image no sample and no word in the
    manifest: it is a counted skip naming the file, and ``strict=true`` raises."""
    ov = write_flickr30k(tmp_path / "f30k")
    (tmp_path / "f30k" / "Sentences" / "200.txt").write_text("")
    man = build("flickr30k", tmp_path / "out", ov)
    assert man["skipped"]["empty_sentences"] == 1
    assert man["skipped_examples"]["empty_sentences"][0].endswith("200.txt: the Sentences file holds no caption")
    full = build("flickr30k", tmp_path / "full", write_flickr30k(tmp_path / "f30k_full"))
    lost = {k: full["splits"][k]["samples"] - man["splits"][k]["samples"] for k in full["splits"]}
    of_200 = [x for x in read_samples(tmp_path / "full") if x["meta"]["image"]["id"] == "200"]
    assert of_200 and sum(lost.values()) == len(of_200)  # image 200's samples, nothing else
    for split in ("train", "val"):
        (tmp_path / "f30k" / f"{split}.txt").write_text("")
    (tmp_path / "f30k" / "test.txt").write_text("200\n")  # (the fixture's other images hold bad records)
    with pytest.raises(BuildError, match=r"Sentences/200\.txt: the Sentences file holds no caption"):
        build("flickr30k", tmp_path / "out2", ov, extra=["strict=true"])
