"""``python -m value_pl.analyze``: every table and figure on the embedded default, two-stream runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import compose, run_cli

PNGS = ["fusion_nmi", "modality_heads", "modality_layers", "i2t_heads", "coref_v2t_heads", "relation_heads", "tsne"]


@pytest.mark.slow
def test_cli_all_on_default_writes_every_output(tmp_path, demo_root):
    d = tmp_path / "run"
    p = run_cli("value_pl.analyze", ["analysis=all", f"data.root={demo_root}", "max_samples=20", "batch_size=8",
                                     "progress=false", "logger=wandb"], d)
    for a in ("fusion", "modality", "i2t", "coref", "relation", "tsne"):
        assert (d / f"{a}.json").exists() and (d / f"{a}.md").exists(), a
    for f in PNGS:
        assert (d / f"{f}.png").stat().st_size > 1000, f
    fusion = json.loads((d / "fusion.json").read_text())
    assert [r["layer"] for r in fusion["layers"]] == list(range(7))  # embeddings + 6 MiniLM layers
    # Table 1 numbering: the embeddings are not "layer 0" (nor 1); the first layer is Table 1's 0
    assert [r["table1"] for r in fusion["layers"]] == ["emb.", "0", "1", "2", "3", "4", "5"]
    assert all(0.0 <= r["nmi"] <= 1.0 for r in fusion["layers"]) and fusion["samples"] == 20
    coref = json.loads((d / "coref.json").read_text())
    assert coref["pairs"] > 0 and all(r["vt"]["head"].count("-") == 1 for r in coref["types"])
    assert all(r["table7"] is not None for r in coref["types"])
    summary = json.loads((d / "analysis.json").read_text())
    assert summary["samples"] == 20 and summary["skipped"] == {}
    assert "| Coref Type | V→T | T→V | V→T (Rand.) | T→V (Rand.) | pairs |" in (d / "coref.md").read_text()
    assert "| Layer (Table 1) | emb. | 0 | 1 | 2 | 3 | 4 | 5 |" in p.stdout
    assert list((d / "wandb").glob("offline-run-*")), "W&B offline run missing"
    from wandb_files import offline_runs

    (run,) = offline_runs(d)  # the dashboard's NMI line in Table 1 numbering too (-1 = the embeddings)
    t = run.chart("fusion/nmi")["table"]
    assert sorted({row[t["columns"].index("step")] for row in t["data"]}) == [-1, 0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def tiny_lxmert(tmp_path_factory):
    d = tmp_path_factory.mktemp("lx")
    (d / "config.json").write_text(json.dumps({
        "vocab_size": 30522, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "l_layers": 2,
        "r_layers": 2, "x_layers": 3, "visual_feat_dim": 64, "visual_pos_dim": 4, "max_position_embeddings": 128}))
    return str(d / "config.json")


@pytest.mark.slow
def test_two_stream_all_and_refusals(tmp_path, demo_root, tiny_lxmert):
    pytest.importorskip("value_pl.backbones.lxmert")
    from value_pl.analysis.common import Unsupported
    from value_pl.driver.analyze import analyze

    common = [f"data.root={demo_root}", "max_samples=12", "batch_size=6", "progress=false", "logger=none",
              "backbone.family=lxmert", "backbone.name=tiny-lxmert", "backbone.pretrained=false",
              f"backbone.config={tiny_lxmert}", "backbone.tokenizer=minilm"]
    d = tmp_path / "two"
    cfg = compose(["analysis=all", *common, f"+run_dir={d}"], "analyze")
    summary = analyze(cfg)
    assert set(summary["skipped"]) == {"modality", "i2t"} and "single-stream" in summary["skipped"]["modality"]
    fusion = json.loads((d / "fusion.json").read_text())
    assert [r["layer"] for r in fusion["layers"]] == [1, 2, 3]  # the cross layers
    assert [r["table1"] for r in fusion["layers"]] == ["0", "1", "2"]  # numbered as in Table 1
    assert fusion["layers"][0]["hidden"] == ["hidden.lang.3", "hidden.vis.3"]
    coref = json.loads((d / "coref.json").read_text())
    assert coref["maps"]["v2t"] == ["attn.cross.1.v2l", "attn.cross.2.v2l", "attn.cross.3.v2l"]
    assert len(coref["types"][0]["vt_heads"]) == 3 and len(coref["types"][0]["vt_heads"][0]) == 4
    rel = json.loads((d / "relation.json").read_text())
    assert rel["maps"] == [f"attn.vis.{l}.self" for l in range(1, 6)] and rel["pairs"] > 0
    assert "Not run" in (d / "modality.md").read_text()
    with pytest.raises(Unsupported, match="two-stream"):
        analyze(compose(["analysis=modality", *common, f"+run_dir={tmp_path / 'm'}"], "analyze"))


@pytest.mark.slow
def test_fusion_nmi_does_not_depend_on_the_batch_size(tmp_path, demo_root):
    """Each sample's k-means restarts are seeded by (seed, sample key, layer): the same samples give the same
    NMI per layer read 1, 3 or 8 at a time (before, a sample's partition changed with its batch-mates)."""
    from value_pl.driver.analyze import analyze

    nmis = []
    for bs in (1, 3, 8):
        d = tmp_path / f"bs{bs}"
        analyze(compose([f"data.root={demo_root}", "analysis=fusion", "max_samples=8", f"batch_size={bs}",
                         "progress=false", "logger=none", f"run_dir={d}"], config_name="analyze"))
        res = json.loads((d / "fusion.json").read_text())
        assert res["samples"] == 8
        nmis.append([r["nmi"] for r in res["layers"]])
    np.testing.assert_allclose(nmis[0], nmis[1], atol=1e-6)
    np.testing.assert_allclose(nmis[0], nmis[2], atol=1e-6)


def test_inputs_cut_by_the_backbones_limits_are_reported(tmp_path, demo_root):
    """Texts over max_text_len and regions over max_regions change what every analysis sees: counted in
    analysis.json and each result, and said in each .md (before, the analyses ran on the cut inputs silently)."""
    from value_pl.driver.analyze import analyze

    common = [f"data.root={demo_root}", "analysis=fusion", "max_samples=6", "batch_size=4", "progress=false",
              "logger=none"]
    d = tmp_path / "cut"
    summary = analyze(compose([*common, "backbone.max_regions=4", "backbone.max_text_len=10", f"run_dir={d}"],
                              config_name="analyze"))
    want = {"texts": 6, "regions": 6, "max_text_len": 10, "max_regions": 4}  # demo: 10 regions, 11+ words each
    assert summary["inputs_cut"] == want
    assert json.loads((d / "fusion.json").read_text())["inputs_cut"] == want
    assert "6 text(s) longer than max_text_len=10" in (d / "fusion.md").read_text()
    d2 = tmp_path / "whole"
    summary = analyze(compose([*common, f"run_dir={d2}"], config_name="analyze"))
    assert summary["inputs_cut"]["texts"] == 0 and summary["inputs_cut"]["regions"] == 0
    assert "Inputs cut" not in (d2 / "fusion.md").read_text()


@pytest.mark.slow
def test_a_capped_analysis_reads_the_same_samples_with_any_number_of_workers(tmp_path, demo_root):
    """``max_samples=N`` is the split's first N samples in shard order: with loader workers, each reading its own
    part, the first N samples to arrive were others (another coreference table for the same command)."""
    from value_pl.data.datamodule import ShardDataModule
    from value_pl.driver.analyze import analyze

    dm = ShardDataModule(demo_root, batch_size=4)
    first = [s["key"] for s in dm.stream("test", False, collate=list).samples()][:10]
    for w in (0, 2):
        got = [s["key"] for b in dm.loader("test", False, collate=list, batch_size=4, num_workers=w, limit=10)
               for s in b]
        assert sorted(got) == sorted(first), w
    res = []
    for w in (0, 2):
        d = tmp_path / f"w{w}"
        analyze(compose([f"data.root={demo_root}", "analysis=coref", "max_samples=24", "batch_size=4",
                         f"data.num_workers={w}", "progress=false", "logger=none", f"run_dir={d}"],
                        config_name="analyze"))
        res.append(json.loads((d / "coref.json").read_text()))
    def same(x, y) -> bool:  # (the same pairs summed in another order: equal up to float rounding)
        if isinstance(x, float):
            return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
        return x == y

    assert res[0]["samples_seen"] == res[1]["samples_seen"] == 24
    assert res[0]["pairs"] == res[1]["pairs"] and same(res[0]["types"], res[1]["types"])
