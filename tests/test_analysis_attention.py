"""Eq. 1, Eq. 2 and the max-attention tables (Tables 2, 4, 7) on hand-made attention with known answers,
single-stream and two-stream, plus the analysis collator's pairs and random partners."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from value_pl.analysis.common import Unsupported, merge_captures
from value_pl.analysis.fusion import Fusion
from value_pl.analysis.maxattn import Coref, Relation
from value_pl.analysis.modality import ImageToText, ModalityImportance
from value_pl.backbones.base import BackboneOutput, LayerSpec, PairLayout, StreamInfo

CFG = OmegaConf.create({"seed": 0, "i2t": {"threshold": 0.5, "include_special": False}})
T, R = 6, 3  # [CLS] w1 w2 w3 w4 [SEP] | r0 r1 r2


class FakeSingle:
    kind, family, num_heads = "single", "fake", 2

    def __init__(self, L=1):
        self.L = L

    def pair_layout(self, pair_kind):
        maps = [(f"attn.joint.{l}.self",) * 2 for l in range(1, self.L + 1)]
        layers = [LayerSpec(f"layer_{l:02d}", emb=(f"hidden.joint.{l}",) * 2) for l in range(self.L + 1)]
        return PairLayout(layers + [LayerSpec("all_heads", attn=maps)])


class FakeTwo:
    kind, family, num_heads = "two", "fake2", 2

    def pair_layout(self, pair_kind):
        if pair_kind == "phrase_region":
            return PairLayout([LayerSpec("layer_01", emb=("hidden.lang.2", "hidden.vis.2"),
                                         attn=[("attn.cross.1.l2v", "attn.cross.1.v2l")]),
                               LayerSpec("all_heads", attn=[("attn.cross.1.l2v", "attn.cross.1.v2l")])])
        return PairLayout([LayerSpec("all_heads", attn=[("attn.vis.1.self",) * 2, ("attn.vis.2.self",) * 2])])


def single_out(attn: dict, B=2, nreg=(3, 3), hidden=None) -> BackboneOutput:
    rm = torch.tensor([[1] * n + [0] * (R - n) for n in nreg])
    special = torch.tensor([[1, 0, 0, 0, 0, 1]] * B)
    return BackboneOutput(hidden=hidden or {}, attn=attn, streams={"joint": StreamInfo(T + R, 0, T)},
                          attn_streams={n: ("joint", "joint") for n in attn}, text_mask=torch.ones(B, T, dtype=torch.long),
                          region_mask=rm, word_to_token=torch.zeros(B, 1, 2, dtype=torch.long), special_mask=special)


# ------------------------------------------------------------------ Eq. 1
def test_modality_importance_eq1():
    a = torch.zeros(2, 2, T + R, T + R)  # (B, H, N, N) full maps, one layer
    # sample 0, head 0: [CLS] row: 0.2 on [CLS], 0.1+0.1 on words, 0.2 on [SEP], 0.3+0.1 on regions
    a[0, 0, 0] = torch.tensor([0.2, 0.1, 0.1, 0, 0, 0.2, 0.3, 0.1, 0])
    a[1, 0, 0] = torch.tensor([0.0, 0.3, 0.3, 0, 0, 0.0, 0.2, 0.1, 0.1])
    a[0, 1, 0] = torch.tensor([0.5, 0, 0, 0, 0, 0.5, 0, 0, 0])  # all on specials: 0 / 0
    a[1, 1, 0] = torch.tensor([0, 0, 0, 0, 0.4, 0, 0, 0, 0.6])
    an = ModalityImportance(FakeSingle(), CFG)
    spec = an.capture({"input_ids": torch.zeros(2, T)})
    assert spec.rows["text"].tolist() == [[0], [0]] and spec.attn == ["attn.joint.1.self"]
    an.update(single_out({"attn.joint.1.self": a}), {})
    res = an.result()
    assert res["samples"] == 2
    assert np.allclose(res["heads"]["text"], [[(0.2 + 0.6) / 2, 0.2]])
    assert np.allclose(res["heads"]["image"], [[(0.4 + 0.4) / 2, 0.3]])
    assert res["layers"][0]["text"] == pytest.approx((0.4 + 0.2) / 2)
    assert res["overall"]["text_sum"] == pytest.approx(0.6) and res["overall"]["image_sum"] == pytest.approx(0.7)


def test_modality_reads_cls_row_among_merged_rows():
    """Merged with other analyses' row requests, the [CLS] row is found by its position."""
    a_full = torch.rand(2, 2, T + R, T + R)
    rows = torch.tensor([[0, 2, 6], [0, 7, -1]])  # positions: [CLS], word, region...
    captured = a_full[torch.arange(2)[:, None], :, rows.clamp(min=0)].permute(0, 2, 1, 3)
    out = single_out({"attn.joint.1.self": captured})
    out.rows = {"joint": rows}
    an = ModalityImportance(FakeSingle(), CFG)
    an.update(out, {})
    ref = ModalityImportance(FakeSingle(), CFG)
    ref.update(single_out({"attn.joint.1.self": a_full}), {})
    assert np.allclose(an.result()["heads"]["text"], ref.result()["heads"]["text"])


# ------------------------------------------------------------------ Eq. 2
@pytest.mark.parametrize("include_special", [False, True])
def test_image_to_text_heads_eq2(include_special):
    a = torch.zeros(2, 2, T + R, T + R)
    # sample 0: head 0 region r1 (pos 7) sends 0.6 to words -> hit; head 1: 0.4 words + 0.3 [SEP]
    a[0, 0, 7, 1:5] = 0.15
    a[0, 1, 7, 1:5] = 0.1
    a[0, 1, 7, 5] = 0.3
    # sample 1 (2 real regions): head 0 only the padded region (pos 8) -> no hit; head 1 region 0: 0.55
    a[1, 0, 8, 1:5] = 0.25
    a[1, 1, 6, 1] = 0.55
    cfg = OmegaConf.merge(CFG, {"i2t": {"include_special": include_special}})
    an = ImageToText(FakeSingle(), cfg)
    spec = an.capture({"region_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])})
    assert spec.rows["region"].tolist() == [[0, 1, 2], [0, 1, -1]]
    an.update(single_out({"attn.joint.1.self": a}, nreg=(3, 2)), {})
    res = an.result()
    want_h1 = 1.0 if include_special else 0.5
    assert np.allclose(res["heads"], [[0.5, want_h1]])
    assert res["share_above_0.5"] == (0.5 if include_special else 0.0)
    assert res["max"] == want_h1


def test_two_stream_refuses_modality_and_i2t():
    for cls in (ModalityImportance, ImageToText):
        with pytest.raises(Unsupported, match="single-stream"):
            cls(FakeTwo(), CFG)


# ------------------------------------------------------------------ Table 2 / 7
def coref_batch(B=2):
    return {"input_ids": torch.zeros(B, T), "coref_b": torch.arange(B),
            "coref_phrase": torch.tensor([[1, 3]] * B), "coref_region": torch.tensor([[0, 1]] * B),
            "coref_type": ["people"] * B, "coref_rand_phrase": torch.tensor([[3, 5]] * B),
            "coref_rand_region": torch.tensor([[2, 3]] * B),
            "cmp_pair": torch.arange(B), "cmp_phrase": torch.tensor([[3, 5]] * B)}


def test_coref_tables_single_stream():
    a = torch.zeros(2, 2, T + R, T + R)
    for b, linked_h0 in ((0, 0.5), (1, 0.2)):
        # V->T: region 0 (pos 6) -> phrase tokens 1, 2 (linked) and 3, 4 (the other/random phrase)
        a[b, 0, 6, 1:5] = torch.tensor([0.1, linked_h0, 0.2, 0.05])
        a[b, 1, 6, 1:5] = torch.tensor([0.3, 0.1, 0.4, 0.0])
        # T->V: phrase tokens -> region 0 (linked) and region 2 (pos 8, random)
        a[b, 0, 1:3, 6] = torch.tensor([0.3, 0.1])
        a[b, 1, 1:3, 6] = torch.tensor([0.05, 0.6])
        a[b, 0, 1:3, 8] = torch.tensor([0.2, 0.25])
        a[b, 1, 1:3, 8] = torch.tensor([0.1, 0.1])
    an = Coref(FakeSingle(), CFG)
    batch = coref_batch()
    spec = an.capture(batch)
    assert spec.rows["text"].tolist() == [[1, 2], [1, 2]] and spec.rows["region"].tolist() == [[0], [0]]
    an.update(single_out({"attn.joint.1.self": a}), batch)
    r = an.result()["types"][0]
    assert r["type"] == "people" and r["pairs"] == 2
    assert r["vt"] == {"value": pytest.approx(0.35), "head": "1-1"}  # (0.5 + 0.2) / 2 > 0.3 of head 2
    assert r["tv"] == {"value": pytest.approx(0.6), "head": "1-2"}
    assert r["vt_rand"] == {"value": pytest.approx(0.4), "head": "1-2"}
    assert r["tv_rand"] == {"value": pytest.approx(0.25), "head": "1-1"}
    # Table 7, head 1-1: sample 0 0.5 > 0.2 (win), sample 1 0.2 vs 0.2 (not more: loss)
    assert r["table7"] == {"head": "1-1", "ratio": pytest.approx(0.5), "pairs": 2}
    md = an.markdown(an.result())
    assert "| people | 0.350 (1-1) | **0.600 (1-2)** | 0.400 (1-2) | 0.250 (1-1) | 2 |" in md


def test_coref_two_stream_uses_cross_maps():
    B = 2
    v2l = torch.zeros(B, 2, R, T)  # vision queries over language keys
    l2v = torch.zeros(B, 2, T, R)
    v2l[:, 1, 0, 2] = 0.7  # region 0 -> linked phrase token 2, head 2
    v2l[:, 0, 0, 3] = 0.9  # region 0 -> other phrase, head 1 (Rand.)
    l2v[:, 0, 1, 0] = 0.45  # phrase token 1 -> region 0, head 1
    l2v[:, 1, 2, 2] = 0.8  # phrase token 2 -> random region 2, head 2
    out = BackboneOutput(hidden={}, attn={"attn.cross.1.v2l": v2l, "attn.cross.1.l2v": l2v},
                         streams={"lang": StreamInfo(T, text_offset=0), "vis": StreamInfo(R, region_offset=0)},
                         attn_streams={"attn.cross.1.v2l": ("vis", "lang"), "attn.cross.1.l2v": ("lang", "vis")},
                         text_mask=torch.ones(B, T, dtype=torch.long), region_mask=torch.ones(B, R, dtype=torch.long),
                         word_to_token=torch.zeros(B, 1, 2, dtype=torch.long), special_mask=torch.zeros(B, T))
    an = Coref(FakeTwo(), CFG)
    an.update(out, coref_batch())
    r = an.result()["types"][0]
    assert r["vt"] == {"value": pytest.approx(0.7), "head": "1-2"}
    assert r["tv"] == {"value": pytest.approx(0.45), "head": "1-1"}
    assert r["vt_rand"] == {"value": pytest.approx(0.9), "head": "1-1"}
    assert r["tv_rand"] == {"value": pytest.approx(0.8), "head": "1-2"}
    assert r["table7"]["ratio"] == 1.0  # head 1-2: 0.7 > 0 for the other phrase


# ------------------------------------------------------------------ Table 4
def test_relation_table4_both_directions():
    a = torch.zeros(2, 2, T + R, T + R)
    s, o, rnd = 6, 7, 8  # regions 0, 1, 2
    a[:, 0, s, o], a[:, 0, o, s] = 0.4, 0.2  # head 1: mean 0.3
    a[:, 1, s, o], a[:, 1, o, s] = 0.1, 0.1
    a[:, 1, s, rnd], a[:, 1, rnd, s] = 0.2, 0.0  # Rand.: head 2 mean 0.1
    a[1, 0, s, o] = 0.8  # sample 1, head 1: (0.8 + 0.2) / 2 = 0.5 -> mean over pairs 0.4
    batch = {"input_ids": torch.zeros(2, T), "rel_b": torch.arange(2), "rel_s": torch.tensor([[0, 1]] * 2),
             "rel_o": torch.tensor([[1, 2]] * 2), "rel_rand": torch.tensor([[2, 3], [-1, -1]]), "rel_type": ["on", "on"]}
    an = Relation(FakeSingle(), CFG)
    assert an.capture(batch).rows["region"].tolist() == [[0, 1, 2], [0, 1, -1]]
    an.update(single_out({"attn.joint.1.self": a}), batch)
    r = an.result()["types"][0]
    assert r["type"] == "on" and r["pairs"] == 2
    assert r["max"] == {"value": pytest.approx(0.4), "head": "1-1"}
    assert r["rand"] == {"value": pytest.approx(0.1), "head": "1-2"}  # only sample 0 has a random region


def test_fusion_two_stream_takes_both_streams():
    B, D = 3, 8
    g = torch.Generator().manual_seed(0)
    lang = torch.randn(B, T, D, generator=g) + 5.0
    vis = torch.randn(B, R, D, generator=g) - 5.0
    out = BackboneOutput(hidden={"hidden.lang.2": lang, "hidden.vis.2": vis},
                         attn={}, streams={"lang": StreamInfo(T, text_offset=0), "vis": StreamInfo(R, region_offset=0)},
                         attn_streams={}, text_mask=torch.tensor([[1] * T, [1] * 4 + [0] * 2, [1] * T]),
                         region_mask=torch.tensor([[1] * R, [1] * R, [0] * R]),
                         word_to_token=torch.zeros(B, 1, 2, dtype=torch.long), special_mask=torch.zeros(B, T))
    out.hidden["hidden.lang.2"][1, 4:] = -5.0  # padding that looks like regions must not count
    an = Fusion(FakeTwo(), CFG)
    assert an.capture({}).hidden == ["hidden.lang.2", "hidden.vis.2"]
    an.update(out, {})
    res = an.result()
    # the first cross layer: index 1 here (Layer 1 of Table 8), column 0 of the paper's Table 1
    assert res["layers"] == [{"layer": 1, "table1": "0", "hidden": ["hidden.lang.2", "hidden.vis.2"],
                              "nmi": pytest.approx(1.0), "std": pytest.approx(0.0, abs=1e-6)}]
    assert "| Layer (Table 1) | 0 |" in an.markdown(res) and "| = layer (results.json) | 1 |" in an.markdown(res)
    assert res["samples"] == 2 and res["missing"] == {"fusion: sample without regions": 1}
    # t-SNE of the sample with no regions: drawn (text only), and said
    from value_pl.analysis.fusion import TSNE

    ts = TSNE(FakeTwo(), OmegaConf.create({"seed": 0, "tsne_sample": 2, "tsne_layers": [1]}))
    batch = {"_offset": 0, "keys": ["a", "b", "c"]}
    assert ts.capture(batch) is not None
    ts.update(out, batch)
    res = ts.result()
    assert res["key"] == "c" and set(res["layers"][0]["modality"]) == {0}
    assert res["missing"] == {"tsne: sample 2 has no regions (a text-only plot; choose another tsne_sample)": 1}


def test_merge_captures():
    from value_pl.backbones.capture import CaptureSpec

    a = CaptureSpec(hidden=["hidden.joint.1"], attn=["m1"], rows={"text": torch.tensor([[0], [0]])})
    b = CaptureSpec(hidden=[], attn=["m1", "m2"], rows={"text": torch.tensor([[2, 0], [-1, -1]]),
                                                          "region": torch.tensor([[1], [0]])})
    m = merge_captures([a, b])
    assert m.hidden == ["hidden.joint.1"] and m.attn == ["m1", "m2"]
    assert m.rows["text"].tolist() == [[0, 2], [0, -1]] and m.rows["region"].tolist() == [[1], [0]]


# ------------------------------------------------------------------ collator
def test_analysis_collator_pairs_partners_and_missing():
    from value_pl.analysis.pairs import AnalysisCollator
    from value_pl.backbones.common import load_tokenizer, minilm_path
    from value_pl.data.collate import Collator, InputEncoder

    meta = {"words": "a man rides a red bike near a dog".split(), "image": {"width": 100, "height": 100},
            "regions": {"boxes": [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 70, 10]]},
            "phrases": [{"span": [0, 2], "label": "people"}, {"span": [3, 6], "label": "vehicles"},
                        {"span": [7, 9], "label": "animals"}],
            "pairs": {"vcd": [[0, 0, "coref"], [1, 1, "coref"], [1, 2, "not_coref"], [2, 3, "coref"]],
                      "vrc": [[0, 1, "riding"], [0, 3, "near"]]}}
    s = {"key": "k0", "meta": meta, "feats": np.zeros((4, 8), np.float16)}
    enc = InputEncoder(load_tokenizer(minilm_path()), "uniter7", 64, max_regions=3)  # region 3 is cut
    col = AnalysisCollator(Collator(enc), seed=0)
    b1, b2 = col([s]), col([s])
    assert b1["coref_type"] == ["people", "vehicles"] and b1["coref_region"].tolist() == [[0, 1], [1, 2]]
    assert b1["coref_phrase"][0].tolist() == [1, 3]  # "a man" after [CLS]
    assert b1["analysis_missing"] == {"coref: region absent (or cut by max_regions)": 1, "relation: region absent (or cut by max_regions)": 1}
    for i in range(2):  # random partners are other phrases/regions, not linked ones
        assert b1["coref_rand_phrase"][i].tolist() != b1["coref_phrase"][i].tolist()
        assert b1["coref_rand_region"][i].tolist() != b1["coref_region"][i].tolist()
    assert b1["cmp_pair"].tolist() == [0, 0, 1, 1]  # both other phrases compete with each pair
    assert b1["rel_type"] == ["riding"] and b1["rel_rand"].tolist() == [[2, 3]]
    for k in ("coref_rand_phrase", "coref_rand_region", "rel_rand"):
        assert torch.equal(b1[k], b2[k])  # deterministic by (seed, key)


def test_random_regions_are_never_near_duplicates_of_the_pairs_own():
    """Real detections come in overlapping sets: a second box on the man (IoU ~0.8 with his region) is the man, not
    a random region. Rand. partners skip such boxes (counted), unless rand_iou=null."""
    from value_pl.analysis.pairs import AnalysisCollator
    from value_pl.backbones.common import load_tokenizer, minilm_path
    from value_pl.data.collate import Collator, InputEncoder

    boxes = [[0, 0, 40, 80], [2, 2, 40, 78],  # the man and a near-duplicate detection of him
             [50, 0, 90, 30], [52, 1, 90, 30],  # the bike and its near-duplicate
             [0, 85, 20, 99], [60, 60, 99, 99]]  # two unrelated regions
    meta = {"words": "a man rides a bike".split(), "image": {"width": 100, "height": 100},
            "regions": {"boxes": boxes},
            "phrases": [{"span": [0, 2], "label": "people"}, {"span": [3, 5], "label": "vehicles"}],
            "pairs": {"vcd": [[0, 0, "coref"], [1, 2, "coref"]], "vrc": [[0, 2, "riding"]]}}
    enc = InputEncoder(load_tokenizer(minilm_path()), "uniter7", 64)
    col, anyr = AnalysisCollator(Collator(enc), seed=0), AnalysisCollator(Collator(enc), seed=0, rand_iou=None)
    drawn, drawn_any = set(), set()  # random regions drawn over 60 samples
    for i in range(60):
        s = {"key": f"k{i}", "meta": meta, "feats": np.zeros((6, 8), np.float16)}
        b, a = col([s]), anyr([s])
        man, bike = b["coref_rand_region"][:, 0].tolist()
        assert man not in (0, 1) and bike not in (2, 3), (man, bike)
        assert b["rel_rand"][0, 0].item() in (4, 5)  # neither the man, the bike nor a duplicate of either
        drawn.update([man, bike, b["rel_rand"][0, 0].item()])
        drawn_any.update(a["coref_rand_region"][:, 0].tolist() + a["rel_rand"][:, 0].tolist())
        assert b["analysis_missing"] == {
            "coref rand: near-duplicates of the pair's own regions (not drawn as the random region)": 2,
            "relation rand: near-duplicates of the pair's own regions (not drawn as the random region)": 1}
        assert a["analysis_missing"] == {}
    assert drawn == {0, 1, 2, 3, 4, 5} and {4, 5} <= drawn_any  # other objects' regions remain partners
    # a phrase linked to a region that max_regions cuts: its other region's duplicates are still passed over
    meta2 = dict(meta, pairs={"vcd": [[0, 0, "coref"], [0, 5, "coref"]], "vrc": []})
    enc4 = InputEncoder(load_tokenizer(minilm_path()), "uniter7", 64, max_regions=4)
    b = AnalysisCollator(Collator(enc4), seed=0)([{"key": "k", "meta": meta2, "feats": np.zeros((6, 8), np.float16)}])
    assert b["coref_rand_region"][:, 0].tolist() in ([2], [3])
    assert b["analysis_missing"]["coref: region absent (or cut by max_regions)"] == 1
    assert {1, 3} <= drawn_any  # without the rule the duplicates are drawn


@pytest.mark.parametrize("special", [True, False])
def test_fusion_can_leave_cls_and_sep_out(special):
    """[CLS]/[SEP] whose states sit with the regions split the text cluster (NMI < 1) unless
    fusion.include_special=false takes them out of the clustering."""
    from value_pl.backbones.base import StreamInfo

    B, D = 2, 8
    g = torch.Generator().manual_seed(0)
    text = torch.randn(B, T, D, generator=g) * 0.1 + 5.0
    regs = torch.randn(B, R, D, generator=g) * 0.1 - 5.0
    text[:, 0] = text[:, T - 1] = -5.0  # [CLS] and [SEP] look like regions
    special_mask = torch.zeros(B, T)
    special_mask[:, 0] = special_mask[:, T - 1] = 1
    out = BackboneOutput(hidden={"hidden.joint.1": torch.cat([text, regs], 1)}, attn={},
                         streams={"joint": StreamInfo(T + R, text_offset=0, region_offset=T)}, attn_streams={},
                         text_mask=torch.ones(B, T, dtype=torch.long), region_mask=torch.ones(B, R, dtype=torch.long),
                         word_to_token=torch.zeros(B, 1, 2, dtype=torch.long), special_mask=special_mask)

    an = Fusion(FakeSingle(L=1), OmegaConf.create({"seed": 0, "fusion": {"include_special": special}}))
    an.layers = [(1, "hidden.joint.1", "hidden.joint.1")]
    an.update(out, {"keys": ["a", "b"]})
    res = an.result()
    nmi = res["layers"][0]["nmi"]
    assert (nmi < 0.9) if special else nmi == pytest.approx(1.0)
    assert ("incl. [CLS]/[SEP]" in res["tokens"]) == special


def test_tsne_nmi_uses_the_fusion_tables_kmeans():
    """The NMI in the t-SNE title is the fusion table's NMI of that sample, also under a non-default
    ``kmeans`` (before, t-SNE always clustered with n_init=10, max_iter=100 whatever the config)."""
    from value_pl.analysis.fusion import TSNE

    D = 4
    special_mask = torch.zeros(1, T)
    special_mask[:, 0] = special_mask[:, T - 1] = 1

    def fusion_and_tsne(h, n_init):
        out = BackboneOutput(hidden={"hidden.joint.0": h, "hidden.joint.1": h}, attn={},
                             streams={"joint": StreamInfo(T + R, text_offset=0, region_offset=T)}, attn_streams={},
                             text_mask=torch.ones(1, T, dtype=torch.long), region_mask=torch.ones(1, R, dtype=torch.long),
                             word_to_token=torch.zeros(1, 1, 2, dtype=torch.long), special_mask=special_mask)
        cfg = OmegaConf.create({"seed": 0, "kmeans": {"n_init": n_init, "max_iter": 100}, "tsne_sample": 0,
                                "tsne_layers": [1]})
        fu, ts = Fusion(FakeSingle(L=1), cfg), TSNE(FakeSingle(L=1), cfg)
        batch = {"_offset": 0, "keys": ["k"]}
        fu.update(out, batch)
        ts.update(out, batch)
        return fu.result()["layers"][1]["nmi"], ts.result()["layers"][0]["nmi"]

    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # tokens for which one restart and ten restarts give different partitions
        h = torch.randn(1, T + R, D, generator=g) * torch.rand(1, T + R, 1, generator=g) * 4
        one, ten = fusion_and_tsne(h, 1)[0], fusion_and_tsne(h, 10)[0]
        if abs(one - ten) > 1e-3:
            break
    else:
        pytest.fail("no sample found on which n_init matters")
    fu, ts = fusion_and_tsne(h, 1)
    assert ts == pytest.approx(fu, abs=1e-12) and fu == pytest.approx(one)


# ------------------------------------------------------------------ maxattn.average: pairs or samples
def _random_coref(seed=0, B=6, L=2):
    """Random attention for ``B`` samples and their coref pairs (0-4 a sample, two types, some without a Rand.
    partner): (attention per map, pairs as (sample, type, phrase span, region, rand phrase, rand region))."""
    g = torch.Generator().manual_seed(seed)
    attn = {f"attn.joint.{l}.self": torch.rand(B, 2, T + R, T + R, generator=g) for l in range(1, L + 1)}
    pairs = []
    for b in range(B):
        for _ in range(int(torch.randint(0, 5, (1,), generator=g))):
            s = int(torch.randint(1, 4, (1,), generator=g))
            e = s + int(torch.randint(1, 3, (1,), generator=g))
            r = int(torch.randint(0, R, (1,), generator=g))
            rp = (4, 6) if bool(torch.rand(1, generator=g) < 0.7) else (-1, -1)
            rr = int(torch.randint(0, R, (1,), generator=g)) if bool(torch.rand(1, generator=g) < 0.7) else -1
            pairs.append((b, ["people", "scene"][int(torch.rand(1, generator=g) < 0.4)], (s, e), r, rp, rr))
    return attn, pairs


def _coref_batches(attn, pairs, samples):
    """The batch of ``samples`` (their attention and pairs, sample indices renumbered) as the collator gives it."""
    ps = [p for p in pairs if p[0] in samples]
    new = {b: i for i, b in enumerate(samples)}
    batch = {"input_ids": torch.zeros(len(samples), T), "coref_b": torch.tensor([new[p[0]] for p in ps], dtype=torch.long),
             "coref_phrase": torch.tensor([p[2] for p in ps], dtype=torch.long).view(-1, 2),
             "coref_region": torch.tensor([[p[3], p[3] + 1] for p in ps], dtype=torch.long).view(-1, 2),
             "coref_type": [p[1] for p in ps],
             "coref_rand_phrase": torch.tensor([p[4] for p in ps], dtype=torch.long).view(-1, 2),
             "coref_rand_region": torch.tensor([[p[5], p[5] + 1] if p[5] >= 0 else [-1, -1] for p in ps],
                                               dtype=torch.long).view(-1, 2),
             "cmp_pair": torch.zeros(0, dtype=torch.long), "cmp_phrase": torch.zeros(0, 2, dtype=torch.long)}
    out = single_out({k: v[list(samples)] for k, v in attn.items()}, B=len(samples), nreg=(R,) * len(samples))
    return out, batch


def _run_coref(average, attn, pairs, split):
    an = Coref(FakeSingle(L=2), OmegaConf.merge(CFG, {"maxattn": {"average": average}}))
    for samples in split:
        out, batch = _coref_batches(attn, pairs, samples)
        if batch["coref_b"].numel():
            an.update(out, batch)
    return {r["type"]: r for r in an.result()["types"]}, an.result()


def _brute_coref(attn, pairs, average):
    """Per type and direction, the (L, H) means by a plain loop: per pair the max over the phrase's tokens; per
    sample the mean of its pairs, then the mean over samples (``samples``), or the mean over all pairs."""
    maps = sorted(attn)
    H = attn[maps[0]].shape[1]

    def value(p, key):
        b, _, (s, e), r, (rs, re_), rr = p
        if key == "vt":
            return [[float(attn[m][b, h, T + r, s:e].max()) for h in range(H)] for m in maps]
        if key == "tv":
            return [[float(attn[m][b, h, s:e, T + r].max()) for h in range(H)] for m in maps]
        if key == "vt_rand":
            return None if rs < 0 else [[float(attn[m][b, h, T + r, rs:re_].max()) for h in range(H)] for m in maps]
        return None if rr < 0 else [[float(attn[m][b, h, s:e, T + rr].max()) for h in range(H)] for m in maps]

    out = {}
    for t in sorted({p[1] for p in pairs}):
        for key in ("vt", "tv", "vt_rand", "tv_rand"):
            vals = [(p[0], value(p, key)) for p in pairs if p[1] == t]
            vals = [(b, np.array(v)) for b, v in vals if v is not None]
            if average == "samples":
                per = [np.mean([v for bb, v in vals if bb == b], 0) for b in sorted({b for b, _ in vals})]
                out[(t, key)] = np.mean(per, 0)
            else:
                out[(t, key)] = np.mean([v for _, v in vals], 0)
    return out


@pytest.mark.parametrize("average", ["pairs", "samples"])
def test_coref_means_equal_a_per_sample_loop_and_not_the_batch_size(average):
    """``maxattn.average=samples`` (Table 2's "averaged across all data samples"): each sample's pairs of a type are
    averaged first, then the samples; ``pairs`` (the default) averages the pairs. Both equal a plain loop, whether
    the samples come one, two-three or all six at a time."""
    attn, pairs = _random_coref()
    counts = {t: sum(p[1] == t for p in pairs) for t in ("people", "scene")}
    assert len({p[0] for p in pairs}) >= 4 and min(counts.values()) >= 3  # several samples with several pairs
    want = _brute_coref(attn, pairs, average)
    results = [_run_coref(average, attn, pairs, split) for split in
               ([range(6)], [[0, 1], [2, 3, 4], [5]], [[i] for i in range(6)])]
    for rows, res in results:
        assert res["maxattn"] == {"average": average}
        for t, r in rows.items():
            assert r["pairs"] == counts[t] and r["samples"] == len({p[0] for p in pairs if p[1] == t})
            np.testing.assert_allclose(r["vt_heads"], want[(t, "vt")], atol=1e-6)
            np.testing.assert_allclose(r["tv_heads"], want[(t, "tv")], atol=1e-6)
            for key in ("vt_rand", "tv_rand"):
                assert r[key]["value"] == pytest.approx(float(want[(t, key)].max()), abs=1e-6)
    for key in ("vt", "tv", "vt_rand", "tv_rand"):  # the same heads selected, whatever the batches
        assert len({tuple(rows[t][key]["head"] for t in sorted(rows)) for rows, _ in results}) == 1
    if average == "samples":  # the two readings differ on these samples
        other = _brute_coref(attn, pairs, "pairs")
        assert not np.allclose(other[("people", "vt")], want[("people", "vt")], atol=1e-4)


def test_relation_means_over_samples_equal_a_per_sample_loop():
    """Table 4 under ``maxattn.average=samples``: per sample the mean over its relations of one predicate (each the
    mean of both directions), then over samples; the same read in any batches."""
    g = torch.Generator().manual_seed(1)
    B = 5
    a = torch.rand(B, 2, T + R, T + R, generator=g)
    rels = [(0, "on", 0, 1, 2), (0, "on", 1, 2, -1), (0, "on", 2, 0, 1), (1, "on", 1, 0, 2), (2, "wearing", 0, 2, 1),
            (3, "on", 2, 1, 0), (3, "wearing", 1, 0, -1), (4, "wearing", 0, 1, 2), (4, "wearing", 2, 1, 0)]

    def batch_of(samples):
        rs = [r for r in rels if r[0] in samples]
        new = {b: i for i, b in enumerate(samples)}
        def sp(i):
            return [i, i + 1] if i >= 0 else [-1, -1]

        return {"input_ids": torch.zeros(len(samples), T), "rel_b": torch.tensor([new[r[0]] for r in rs]),
                "rel_s": torch.tensor([sp(r[2]) for r in rs]), "rel_o": torch.tensor([sp(r[3]) for r in rs]),
                "rel_rand": torch.tensor([sp(r[4]) for r in rs]), "rel_type": [r[1] for r in rs]}

    def brute(key):
        out = {}
        for t in ("on", "wearing"):
            per = []
            for b in sorted({r[0] for r in rels if r[1] == t}):
                o = [r[4 if key == "rand" else 3] for r in rels if r[0] == b and r[1] == t]
                s = [r[2] for r in rels if r[0] == b and r[1] == t]
                v = [[0.5 * float(a[b, h, T + si, T + oi] + a[b, h, T + oi, T + si]) for h in range(2)]
                     for si, oi in zip(s, o) if oi >= 0]
                if v:
                    per.append(np.mean(v, 0))
            out[t] = np.mean(per, 0)
        return out

    want, want_rand = brute("rel"), brute("rand")
    for split in ([range(B)], [[0, 1], [2, 3, 4]], [[i] for i in range(B)]):
        an = Relation(FakeSingle(), OmegaConf.merge(CFG, {"maxattn": {"average": "samples"}}))
        for samples in split:
            an.update(single_out({"attn.joint.1.self": a[list(samples)]}, B=len(samples), nreg=(R,) * len(samples)),
                      batch_of(list(samples)))
        res = an.result()
        assert res["maxattn"] == {"average": "samples"}
        rows = {r["type"]: r for r in res["types"]}
        assert (rows["on"]["pairs"], rows["on"]["samples"], rows["wearing"]["pairs"]) == (5, 3, 4)
        for t in rows:
            np.testing.assert_allclose(np.array(rows[t]["heads"])[0], want[t], atol=1e-6)
            assert rows[t]["rand"]["value"] == pytest.approx(float(want_rand[t].max()), abs=1e-6)


def test_maxattn_average_is_checked():
    with pytest.raises(ValueError, match="maxattn.average='sample': use one of pairs, samples"):
        Coref(FakeSingle(), OmegaConf.merge(CFG, {"maxattn": {"average": "sample"}}))
    assert Coref(FakeSingle(), CFG).average == "pairs"  # unset: the default
