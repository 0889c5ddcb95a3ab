"""SentEval probing files and derived caption tasks -> shards; README commands through the Hydra CLI."""
from __future__ import annotations

import json
from pathlib import Path
import sys

import numpy as np
import pytest

from fixtures_data import (D, SENTEVAL_EXPECTED, build, read_samples, split_counts, tree_bytes, write_captions,
                           write_senteval, write_vg)
from value_pl.datasets.common import BuildError
from value_pl.datasets.senteval import derive


def test_senteval_counts(tmp_path):
    mans = build("senteval", tmp_path / "se", write_senteval(tmp_path / "probing"))
    assert [m["dataset"] for m in mans] == ["senteval_sentlen", "senteval_bshift"]
    for m in mans:
        assert split_counts(m) == SENTEVAL_EXPECTED[m["task"]]
    s = {x["key"]: x for x in read_samples(tmp_path / "se" / "sentlen")}["se_sentlen_00000001"]
    assert s["feats"].shape == (0, D) and s["meta"]["sentence_labels"] == {"sentlen": "0"}
    assert s["meta"]["words"] == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize("line,msg", [
    ("tr\t0", r"sentence_length\.txt:2: expected 3 tab-separated fields"),
    ("xx\t0\ta b", r"sentence_length\.txt:2: unknown split tag 'xx'"),
    ("tr\t\ta b", r"sentence_length\.txt:2: empty label"),
])
def test_senteval_bad_lines(tmp_path, line, msg):
    ov = write_senteval(tmp_path / "probing")
    (tmp_path / "probing" / "sentence_length.txt").write_text("tr\t0\ta b c\n" + line + "\n")
    with pytest.raises(BuildError, match=msg):
        build("senteval", tmp_path / "se", dict(ov, **{"dataset.tasks": "[sentlen]"}))


def test_senteval_empty_sentence_and_unknown_task(tmp_path):
    ov = write_senteval(tmp_path / "probing")
    (tmp_path / "probing" / "sentence_length.txt").write_text("tr\t0\ta b c\ntr\t1\t  \nva\t0\tx\nte\t0\ty\n")
    (m,) = build("senteval", tmp_path / "se", dict(ov, **{"dataset.tasks": "[sentlen]"}))
    assert m["skipped"] == {"empty_caption": 1} and m["splits"]["train"]["samples"] == 1
    with pytest.raises(BuildError, match="unknown SentEval task 'nope'"):
        build("senteval", tmp_path / "se2", dict(ov, **{"dataset.tasks": "[nope]"}))
    with pytest.raises(BuildError, match=r"word_content\.txt: SentEval file for task wordcontent not found"):
        build("senteval", tmp_path / "se3", dict(ov, **{"dataset.tasks": "[wordcontent]"}))


def test_derived_rules():
    rng = np.random.default_rng(0)
    assert derive("sentlen", "a b c".split(), rng, [1, 3, 5]) == ("1", ["a", "b", "c"])
    assert derive("sentlen", "a b c d e f".split(), rng, [1, 3, 5]) == (None, "sentlen_out_of_range")
    w = "a man plays guitar and a woman sings .".split()
    outs = {derive("coordinv", w, np.random.default_rng(i), [])[1] and
            " ".join(derive("coordinv", w, np.random.default_rng(i), [])[1]) for i in range(10)}
    assert outs == {"a man plays guitar and a woman sings .", "a woman sings and a man plays guitar ."}
    for i in range(10):
        lab, new = derive("bshift", w, np.random.default_rng(i), [])
        assert sorted(new) == sorted(w) and new[-1] == "." and (lab == "O") == (new == w)


def test_derived_build(tmp_path):
    ov = write_captions(tmp_path / "caps.txt")
    mans = build("senteval_derived", tmp_path / "dv", ov)
    by = {m["task"]: m for m in mans}
    # 16 lines: 1 empty, 1 duplicate -> 14 captions; 5 have a conjunction with >= 2 words each side
    assert sum(s["samples"] for s in by["sentlen"]["splits"].values()) == 14
    assert sum(s["samples"] for s in by["bshift"]["splits"].values()) == 14
    assert sum(s["samples"] for s in by["coordinv"]["splits"].values()) == 5
    assert by["coordinv"]["skipped"] == {"duplicate_caption": 1, "empty_caption": 1, "no_coordination": 9}
    assert by["bshift"]["labels"]["bshift"] == ["I", "O"] and by["sentlen"]["derived"] is True
    build("senteval_derived", tmp_path / "dv2", ov)
    assert tree_bytes(tmp_path / "dv") == tree_bytes(tmp_path / "dv2")


def _cli(monkeypatch, tmp_path, args):
    """Run the Hydra CLI (``python -m value_pl.datasets.build ARGS``) in-process."""
    from hydra.core.global_hydra import GlobalHydra

    from value_pl.datasets import build as b

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["value_pl.datasets.build"] + args + [f"hydra.run.dir={tmp_path / 'run'}",
                                                                        f"feature_dim={D}", "progress=false"])
    monkeypatch.chdir(tmp_path)
    b._main()


def test_cli_commands_vg_and_senteval(tmp_path, monkeypatch, capsys):
    """The commands in docs/datasets.md for VG, the mismatch variant, SentEval and the derived tasks."""
    ov = write_vg(tmp_path / "vg")
    vg_args = [f"{k}={v}" for k, v in ov.items()]
    _cli(monkeypatch, tmp_path, ["dataset=vg", "out=shards/vg"] + vg_args)
    _cli(monkeypatch, tmp_path, ["dataset=vg_mismatch", "out=shards/vg_mismatch"] + vg_args)
    write_senteval(tmp_path / "probing")
    _cli(monkeypatch, tmp_path, ["dataset=senteval", f"dataset.dir={tmp_path / 'probing'}",
                                 "dataset.tasks=[sentlen,bshift]", "out=shards/senteval"])
    write_captions(tmp_path / "caps.txt")
    _cli(monkeypatch, tmp_path, ["dataset=senteval_derived", f"dataset.captions={tmp_path / 'caps.txt'}",
                                 "out=shards/derived"])
    out = capsys.readouterr().out
    assert "dataset visual_genome (version 1.2" in out and "dataset senteval_bshift" in out
    for sub in ("vg", "vg_mismatch", "senteval/sentlen", "senteval/bshift", "derived/coordinv"):
        assert json.loads((tmp_path / "shards" / sub / "manifest.json").read_text())["splits"]
    assert json.loads((tmp_path / "shards" / "vg_mismatch" / "manifest.json").read_text())["variant"] == "mismatch"


def test_derived_casing_does_not_give_the_label_away(tmp_path):
    """Real captions (e.g. Flickr30k Entities Sentences/) start with a capital. An inverted caption must not be the
    one that starts lower case and carries a capital inside ("a dog runs and A man sits ."): a cased model would
    read the label off the casing. The first word is uncapitalised in both classes; all-capital words stay."""
    sent = tmp_path / "Sentences"
    sent.mkdir()
    caps = ["[/EN#1/people A man] sits and [/EN#2/animals a dog] runs in [/EN#3/scene the park] .",
            "[/EN#4/people Two women] are talking while [/EN#5/people a child] plays on [/EN#6/scene the grass] .",
            "[/EN#7/people A boy] jumps into [/EN#8/other the pool] and [/EN#9/people his friends] watch .",
            "[/EN#10/people The women] dance but [/EN#11/people the crowd] does not clap .",
            "[/EN#12/people A man] watches [/EN#13/other TV] and [/EN#14/people a woman] reads a book .",
            "[/EN#15/people Several people] sit at [/EN#16/other a table] and [/EN#17/people a waiter] serves food ."]
    for i in range(4):  # distinct captions (duplicates are dropped), 24 in all
        (sent / f"{i}.txt").write_text("\n".join(c.replace(" .", f" {'again ' * i}.") for c in caps) + "\n")
    # the same caption but for its first capital: one input once uncapitalised, so a duplicate (not a second sample,
    # possibly in another split)
    (sent / "9.txt").write_text(caps[0].replace("A man", "a man") + "\n")
    mans = build("senteval_derived", tmp_path / "dv", {"dataset.captions": str(sent),
                                                       "dataset.tasks": "[coordinv,bshift]",
                                                       "dataset.splits": "{train: 1.0}"})
    for task in ("coordinv", "bshift"):
        labels = set()
        for s in read_samples(tmp_path / "dv" / task):
            words, lab = s["meta"]["words"], s["meta"]["sentence_labels"][task]
            labels.add(lab)
            assert [w for w in words if any(c.isupper() for c in w)] in ([], ["TV"]), (lab, words)
        assert labels == {"I", "O"}
    assert all(m["rules"]["first_word_uncapitalised"] for m in mans)
    assert all(m["skipped"].get("duplicate_caption") == 1 for m in mans)


def test_non_utf8_lines_name_file_and_line(tmp_path):
    """SentEval files and caption corpora that are not UTF-8 raise BuildError naming file and line (not a bare
    UnicodeDecodeError); a region-graph JSON that is not UTF-8 names the file."""
    from value_pl.datasets.common import iter_json_array

    ov = write_senteval(tmp_path / "probing")
    bad = "tr\t0\ta b c\nva\t1\tun caf\u00e9 .\n".encode("latin-1")
    (tmp_path / "probing" / "sentence_length.txt").write_bytes(bad)
    with pytest.raises(BuildError, match=r"sentence_length\.txt:2: not UTF-8 text \(byte 0xe9 at column 12"):
        build("senteval", tmp_path / "se", dict(ov, **{"dataset.tasks": "[sentlen]"}))
    caps = tmp_path / "caps.txt"
    caps.write_bytes("a man .\nun caf\u00e9 .\n".encode("latin-1"))
    with pytest.raises(BuildError, match=r"caps\.txt:2: not UTF-8 text"):
        build("senteval_derived", tmp_path / "dv", {"dataset.captions": str(caps)})
    js = tmp_path / "rg.json"
    js.write_bytes('[{"image_id": 1}, {"phrase": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(BuildError, match=r"rg\.json: not UTF-8 text"):
        list(iter_json_array(js))


def test_labels_without_a_training_example_are_reported(tmp_path):
    """A label that only val/test have (a real risk with a cut SentEval file or a small derived corpus) is listed in
    the manifest and the build report: no prober can predict it, so its examples are errors whatever the model knows."""
    from value_pl.datasets.writer import report

    ov = write_senteval(tmp_path / "probing")
    (tmp_path / "probing" / "sentence_length.txt").write_text(
        "tr\t0\ta b c\ntr\t1\ta b c d\nva\t0\tx y z\nva\t2\tx y z w v\nte\t3\tp q r s t u\nte\t1\tp q r s\n")
    (m,) = build("senteval", tmp_path / "se", dict(ov, **{"dataset.tasks": "[sentlen]"}))
    assert m["labels_not_in_train"] == {"sentlen": {"val": ["2"], "test": ["3"]}}
    assert "WARNING sentlen: labels with no training example (a prober cannot predict them): val: 2; test: 3" \
        in report(m)
    write_senteval(tmp_path / "probing")  # the fixture's own file: every label has training examples
    (ok,) = build("senteval", tmp_path / "se2", dict(ov, **{"dataset.tasks": "[sentlen]"}))
    assert "labels_not_in_train" not in ok


def test_task_oddmanout_trains_on_the_shards_its_build_writes(tmp_path):
    """``oddmanout`` is SOMO under SentEval's file name (odd_man_out.txt): ``dataset.tasks=[oddmanout]`` writes the
    shard set ``<out>/oddmanout`` labelled for task ``oddmanout``, which ``task=oddmanout`` (listed beside ``somo`` in
    docs/probing.md) and the experiments' ``${paths.senteval}/${task.name}`` read. Before, the build wrote it as
    ``<out>/somo`` and ``task=oddmanout`` stopped with a KeyError: no labels for ``oddmanout``."""
    from types import SimpleNamespace

    from conftest import compose
    from value_pl.driver.setup import task_spec

    (tmp_path / "in").mkdir()
    rows = [("tr", "O", "the dog runs ."), ("tr", "C", "the dog reads ."), ("va", "O", "a cat eats ."),
            ("va", "C", "a cat flies ."), ("te", "O", "birds fly ."), ("te", "C", "birds read .")]
    (tmp_path / "in" / "odd_man_out.txt").write_text("".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows))
    mans = build("senteval", tmp_path / "se", {"dataset.dir": str(tmp_path / "in"),
                                                "dataset.tasks": "[oddmanout,somo]"})
    assert sorted(p.name for p in (tmp_path / "se").iterdir()) == ["oddmanout", "somo"]
    assert [m["labels"] for m in mans] == [{"oddmanout": ["C", "O"]}, {"somo": ["C", "O"]}]
    for task in ("oddmanout", "somo"):
        cfg = compose([f"task={task}", "prober=senteval_mlp", "experiment=table5", f"paths.senteval={tmp_path / 'se'}"])
        root = Path(cfg.data.root)
        assert root == tmp_path / "se" / task
        spec = task_spec(cfg, SimpleNamespace(root=root, manifest=json.loads((root / "manifest.json").read_text())))
        assert spec.name == task and spec.labels == ["C", "O"]
        assert {s["meta"]["sentence_labels"][task] for s in read_samples(root)} == {"C", "O"}
