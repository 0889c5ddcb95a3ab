"""Long work shows a progress bar with a rate and an ETA on a terminal; quiet under ``progress=false`` and when
stderr is not a terminal (CI logs). Checked on the real bars of a shard build, feature extraction, an analysis
and a checkpoint comparison, with stderr replaced by a stream that says it is (or is not) a terminal."""
from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch

from conftest import compose
from fixtures_data import build, write_flickr30k
from helpers_backbones import write_json

# "<desc>: 100%|...| n/n [00:01<00:00, 12.3sample/s]": elapsed<remaining (ETA) and a rate
BAR = r"{desc}: +100%\|[^|]*\| {n}/{n} \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(?:{unit}/s|s/{unit})\]"


def no_bar(text: str) -> bool:
    """No progress bar frame in ``text`` (other stderr output, e.g. a logging handler's complaint, may be there)."""
    return not re.search(r"\d+%\||\d+(?:it|sample|img|ckpt)/s", text)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    """``.reset(tty)``: stderr becomes a fresh stream that is a terminal (tty=False: a pipe, as in CI). Called in
    the test itself: pytest swaps its own capture in after fixture setup."""

    class Box:
        def reset(self, tty=True):
            self.s = Terminal() if tty else io.StringIO()
            monkeypatch.setattr(sys, "stderr", self.s)
            return self

        def text(self):
            return self.s.getvalue()

    return Box()


def test_helper_rate_eta_and_quiet(stderr):
    from value_pl.data.progress import progress

    stderr.reset()
    for _ in progress(range(7), unit="sample", desc="work", mininterval=0):
        pass
    assert re.search(BAR.format(desc="work", n=7, unit="sample"), stderr.text()), stderr.text()
    stderr.reset(tty=False)  # CI log / redirected output
    bar = progress(total=3, desc="work")
    bar.update(3)
    bar.close()
    assert no_bar(stderr.text()), stderr.text()
    stderr.reset()
    assert list(progress(range(3), enabled=False, desc="work")) == [0, 1, 2] and no_bar(stderr.text())


def test_shard_build(stderr, tmp_path):
    stderr.reset()
    ov = write_flickr30k(tmp_path / "f30k")
    man = build("flickr30k", tmp_path / "out", ov, extra=["progress=true"])
    n = man["splits"]["train"]["samples"]
    assert n and re.search(r"flickr30k train: +100%\|.*img/s\]", stderr.text()), stderr.text()
    stderr.reset()
    build("flickr30k", tmp_path / "out2", ov)  # progress=false
    assert no_bar(stderr.text()), stderr.text()


def test_analysis(stderr, tmp_path, demo_root):
    from value_pl.driver.analyze import analyze

    stderr.reset()
    common = [f"data.root={demo_root}", "logger=none", "analysis=modality", "max_samples=16", "batch_size=8"]
    analyze(compose(common + [f"run_dir={tmp_path / 'a'}"], "analyze"))
    assert re.search(BAR.format(desc="analyze", n=16, unit="sample"), stderr.text()), stderr.text()
    stderr.reset()
    analyze(compose(common + ["progress=false", f"run_dir={tmp_path / 'b'}"], "analyze"))
    assert no_bar(stderr.text()), stderr.text()


def test_feature_extraction(stderr, tmp_path, demo_root):
    from value_pl.driver.extract import extract_cache

    stderr.reset()
    common = [f"data.root={demo_root}", "task=vcc", "prober=layer_emb", "layers=[1]", "cache.splits=[val]",
              "trainer.enable_progress_bar=false"]
    extract_cache(compose(common + [f"cache.root={tmp_path / 'c1'}"], "extract"))
    assert re.search(BAR.format(desc="extract val", n=160, unit="sample"), stderr.text()), stderr.text()
    stderr.reset(tty=False)
    extract_cache(compose(common + [f"cache.root={tmp_path / 'c2'}"], "extract"))
    assert no_bar(stderr.text()), stderr.text()


def test_checkpoint_comparison(stderr, tmp_path, demo_root):
    from omegaconf import OmegaConf

    from value_pl.backbones import build_backbone
    from value_pl.compare import compare

    stderr.reset()
    tiny = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=128, type_vocab_size=2)
    cfgf = write_json(tmp_path / "tiny.json", tiny)
    for step in (10, 20):
        bb = build_backbone(OmegaConf.create({"family": "uniter", "config": cfgf, "tokenizer": "minilm",
                                              "pretrained": False, "seed": step}), img_dim=64)
        torch.save(dict(bb.state_dict()), tmp_path / f"ckpt_step{step}.pt")
    common = [f"checkpoints={tmp_path}/*.pt", "backbone=uniter", f"backbone.config={cfgf}", "backbone.tokenizer=minilm",
              "backbone.img_dim=64", f"data.root={demo_root}", f"out={tmp_path / 'cmp'}", "logger=none", "plots=false",
              "suite.train_samples=16", "suite.val_samples=8", "suite.test_samples=8", "suite.analysis_samples=8",
              "suite.epochs=1", "suite.batch_size=8", "suite.rank=8", "suite.kmeans.n_init=1"]
    compare(compose(common, "compare"))
    assert re.search(BAR.format(desc="compare", n=2, unit="ckpt"), stderr.text()), stderr.text()
    stderr.reset()
    res = compare(compose(common + ["progress=false"], "compare"))  # served from the cache
    assert no_bar(stderr.text()) and res["built"] == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][0]["step"] == 10
