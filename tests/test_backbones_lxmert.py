"""LXMERT: HF parity, all maps (incl. V->L and in-cross-layer self-attention), loading, twins, row capture."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LxmertConfig, LxmertForPreTraining, LxmertModel

from helpers_backbones import VOCAB, check_rows_sum_to_one, gather_rows, make_batch, row_request, tiny_tokenizer, write_json
from value_pl.backbones import build_backbone
from value_pl.backbones.capture import CaptureSpec
from value_pl.backbones.lxmert import map_lxmert_keys

DV = 16
TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=3,
            r_layers=2, x_layers=2, visual_feat_dim=DV, visual_pos_dim=4, max_position_embeddings=64,
            num_qa_labels=3, num_object_labels=5, num_attr_labels=4)
L, R, X = 3, 2, 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def hf_model(seed=1) -> LxmertModel:
    torch.manual_seed(seed)
    c = LxmertConfig(**TINY)
    c._attn_implementation = "eager"
    return LxmertModel(c).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lxmert_hf")
    m = hf_model()
    m.save_pretrained(str(d))
    return str(d), m


def build(**kw):
    return build_backbone(OmegaConf.create({"family": "lxmert", **kw}))


@pytest.fixture(scope="module")
def bb(hf_dir, tok):
    return build(path=hf_dir[0], tokenizer=tok)


def hf_forward(m: LxmertModel, batch):
    return m(input_ids=batch["input_ids"], attention_mask=batch["text_mask"], visual_feats=batch["region_feats"].float(),
             visual_pos=batch["region_boxes"], visual_attention_mask=batch["region_mask"],
             token_type_ids=torch.zeros_like(batch["input_ids"]), output_attentions=True, output_hidden_states=True)


def test_matches_hf_hidden_and_maps(bb, hf_dir):
    batch = make_batch(bb, dv=DV)
    assert batch["region_boxes"].shape[-1] == 4  # x1/W, y1/H, x2/W, y2/H
    out = bb(batch, CaptureSpec.everything())
    with torch.no_grad():
        ref = hf_forward(hf_dir[1], batch)
    assert len(ref.language_hidden_states) == L + X and len(ref.vision_hidden_states) == R + X
    for i, h in enumerate(ref.language_hidden_states):
        torch.testing.assert_close(out.hidden[f"hidden.lang.{i + 1}"], h, atol=1e-5, rtol=1e-4)
    for i, h in enumerate(ref.vision_hidden_states):
        torch.testing.assert_close(out.hidden[f"hidden.vis.{i + 1}"], h, atol=1e-5, rtol=1e-4)
    for i, a in enumerate(ref.language_attentions):
        torch.testing.assert_close(out.attn[f"attn.lang.{i + 1}.self"], a, atol=1e-6, rtol=1e-4)
    for i, a in enumerate(ref.vision_attentions):
        torch.testing.assert_close(out.attn[f"attn.vis.{i + 1}.self"], a, atol=1e-6, rtol=1e-4)
    # our L->V maps equal HF's cross_encoder_attentions
    assert len(ref.cross_encoder_attentions) == X
    for i, a in enumerate(ref.cross_encoder_attentions):
        torch.testing.assert_close(out.attn[f"attn.cross.{i + 1}.l2v"], a, atol=1e-6, rtol=1e-4)
    # embedding outputs are layer 0 of both streams
    emb = hf_dir[1].embeddings(batch["input_ids"], torch.zeros_like(batch["input_ids"]))
    torch.testing.assert_close(out.hidden["hidden.lang.0"], emb)
    vemb = hf_dir[1].encoder.visn_fc(batch["region_feats"].float(), batch["region_boxes"])
    torch.testing.assert_close(out.hidden["hidden.vis.0"], vemb)


def test_all_names_shapes_and_v2l(bb):
    batch = make_batch(bb, dv=DV)
    B, T = batch["input_ids"].shape
    Rg = batch["region_feats"].shape[1]
    H = bb.num_heads
    out = bb(batch, CaptureSpec.everything())
    assert sorted(out.hidden) == sorted(bb.hidden_names("lang") + bb.hidden_names("vis"))
    assert sorted(out.attn) == sorted(bb.attn_names())
    assert len(bb.hidden_names("lang")) == L + X + 1 and len(bb.hidden_names("vis")) == R + X + 1
    for x in range(1, X + 1):
        l2v, v2l = out.attn[f"attn.cross.{x}.l2v"], out.attn[f"attn.cross.{x}.v2l"]
        assert l2v.shape == (B, H, T, Rg) and v2l.shape == (B, H, Rg, T)
        assert out.attn_streams[f"attn.cross.{x}.v2l"] == ("vis", "lang")
        assert not torch.allclose(v2l, l2v.transpose(-1, -2), atol=1e-3)
        # in-cross-layer self-attentions
        assert out.attn[f"attn.lang.{L + x}.self"].shape == (B, H, T, T)
        assert out.attn[f"attn.vis.{R + x}.self"].shape == (B, H, Rg, Rg)
    # key masks: padded text tokens / regions get no attention
    tpad = batch["text_mask"] == 0
    rpad = batch["region_mask"] == 0
    v2l = out.attn["attn.cross.1.v2l"]
    assert torch.all(v2l.permute(0, 3, 1, 2)[tpad] == 0)
    l2v = out.attn["attn.cross.1.l2v"]
    b_ok = batch["region_mask"].sum(1) > 0
    assert torch.all(l2v[b_ok].permute(0, 3, 1, 2)[rpad[b_ok]] == 0)
    assert check_rows_sum_to_one(out) == len(bb.attn_names())
    assert torch.equal(out.modality_mask("vis")[0], torch.where(batch["region_mask"][0] > 0, 1, -1))


def test_requested_rows_equal_full_map_rows(bb):
    batch = make_batch(bb, dv=DV)
    full = bb(batch, CaptureSpec.everything())
    rows = row_request(batch)
    part = bb(batch, CaptureSpec(hidden=[], attn=None, rows=rows))
    assert set(part.rows) == {"lang", "vis"} and not part.hidden
    for name, a in part.attn.items():
        q_stream = part.attn_streams[name][0]
        torch.testing.assert_close(a, gather_rows(full.attn[name], part.rows[q_stream]), atol=1e-6, rtol=1e-5)
    check_rows_sum_to_one(part)


def test_capture_filter_and_layouts(bb):
    batch = make_batch(bb, dv=DV)
    out = bb(batch, CaptureSpec(hidden=["hidden.lang.*"], attn=["attn.cross.*.v2l"]))
    assert set(out.hidden) == {f"hidden.lang.{l}" for l in range(L + X + 1)}
    assert set(out.attn) == {f"attn.cross.{x}.v2l" for x in range(1, X + 1)}
    # a text-only request skips the visual and cross layers (and works without regions)
    tb = make_batch(bb, n_regions=(0, 0, 0), dv=DV)
    out = bb(tb, CaptureSpec(hidden=bb.sentence_layers(), attn=[]))
    assert sorted(out.hidden) == sorted(f"hidden.lang.{l}" for l in range(L + 1))
    pr = bb.pair_layout("phrase_region")
    assert [l.name for l in pr.layers] == [f"layer_{x:02d}" for x in range(1, X + 1)] + ["all_heads"]
    assert pr.layers[0].emb == (f"hidden.lang.{L + 1}", f"hidden.vis.{R + 1}")
    assert pr.layers[0].attn == [("attn.cross.1.l2v", "attn.cross.1.v2l")] and len(pr.layers[-1].attn) == X
    rr = bb.pair_layout("region_region")
    assert [l.name for l in rr.layers] == [f"layer_{l:02d}" for l in range(R + X + 1)] + ["all_heads"]
    assert rr.layers[0].attn == [] and rr.layers[R + 1].attn == [(f"attn.vis.{R + 1}.self",) * 2]
    # pair features through the output object (phrase tokens vs regions, both directions)
    b = torch.tensor([0, 1])
    a_sp, r_sp = torch.tensor([[1, 3], [1, 2]]), torch.tensor([[0, 1], [2, 3]])
    full = bb(batch, CaptureSpec.everything())
    assert full.attention_between("attn.cross.1.l2v", b, "text", a_sp, "region", r_sp).shape == (2, bb.num_heads)
    assert full.attention_between("attn.cross.1.v2l", b, "region", r_sp, "text", a_sp).shape == (2, bb.num_heads)
    assert full.embed("hidden.vis.3", b, "region", r_sp).shape == (2, 32)


def test_original_checkpoint_round_trip(tmp_path, tok, hf_dir):
    src = hf_dir[1].state_dict()
    sd = {"module.bert." + k: v.clone() for k, v in src.items()}
    sd["module.cls.predictions.bias"] = torch.zeros(len(VOCAB))
    sd["module.obj_predict_head.decoder_dict.obj.weight"] = torch.zeros(5, 32)
    sd["module.answer_head.logit_fc.3.weight"] = torch.zeros(3, 64)
    ck = tmp_path / "model_LXRT.pth"
    torch.save(sd, ck)
    cfg_json = write_json(tmp_path / "lxmert.json", TINY)
    m = build(checkpoint=str(ck), config=cfg_json, tokenizer=tok)
    own = m.state_dict()
    for k, v in src.items():
        assert torch.equal(own["lxmert." + k], v), k
    assert len(m.load_report["ignored"]) == 3 and m.identity["ignored_keys"] == 3
    assert all(k.startswith(("module.cls.", "module.obj_predict_head.", "module.answer_head."))
               for k in m.load_report["ignored"])
    assert map_lxmert_keys({"module.bert.encoder.x_layers.0.visual_attention.att.query.weight": 1}) == \
        {"lxmert.encoder.x_layers.0.visual_attention.att.query.weight": 1}
    # a missing encoder key is an error naming it
    bad = dict(sd)
    del bad["module.bert.encoder.x_layers.1.visual_attention.att.key.weight"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match=r"lxmert\.encoder\.x_layers\.1\.visual_attention\.att\.key\.weight"):
        build(checkpoint=str(tmp_path / "bad.pth"), config=cfg_json, tokenizer=tok)


def test_hf_dirs_round_trip(tmp_path, tok, hf_dir, bb):
    own = bb.state_dict()
    for k, v in hf_dir[1].state_dict().items():
        assert torch.equal(own["lxmert." + k], v), k
    assert bb.identity["family"] == "lxmert" and bb.identity["pretrained"] and len(bb.identity["checksum"]) == 16
    # an LxmertForPreTraining directory (keys lxmert.*, heads ignored)
    torch.manual_seed(3)
    c = LxmertConfig(**TINY)
    pt = LxmertForPreTraining(c)
    pt.save_pretrained(str(tmp_path / "pt"))
    m = build(path=str(tmp_path / "pt"), tokenizer=tok)
    own = m.state_dict()
    for k, v in pt.lxmert.state_dict().items():
        assert torch.equal(own["lxmert." + k], v), k
    assert m.load_report["ignored"] and all(not k.startswith("lxmert.") for k in m.load_report["ignored"])


def test_untrained_twin(hf_dir, tok, bb):
    a = build(path=hf_dir[0], tokenizer=tok, pretrained=False, seed=7)
    b = build(path=hf_dir[0], tokenizer=tok, pretrained=False, seed=7)
    c = build(path=hf_dir[0], tokenizer=tok, pretrained=False, seed=8)
    assert a.config.to_dict() == bb.config.to_dict()
    assert a.weights_checksum() == b.weights_checksum() != bb.weights_checksum()
    assert c.weights_checksum() != a.weights_checksum()
    sa, sp = a.state_dict(), bb.state_dict()
    assert not torch.equal(sa["lxmert.encoder.x_layers.0.visual_attention.att.query.weight"],
                           sp["lxmert.encoder.x_layers.0.visual_attention.att.query.weight"])
    assert not a.identity["pretrained"] and "untrained" in a.identity["source"]
    batch = make_batch(a, dv=DV)
    oa, ob = a(batch, CaptureSpec.everything()), b(batch, CaptureSpec.everything())
    for k in oa.attn:
        assert torch.equal(oa.attn[k], ob.attn[k])


def test_untrained_twin_draws_every_embedding_row(hf_dir, tok):
    """The original LXMERT init (``init_bert_weights``) draws every embedding row from N(0, std): the token-type
    vector all text tokens get and [CLS]'s position vector (padding_idx 0 in LXMERT's tables) are not zero."""
    a = build(path=hf_dir[0], tokenizer=tok, pretrained=False, seed=7)
    emb = a.lxmert.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        assert table.padding_idx == 0 and bool((table.weight.abs().sum(1) > 0).all())
    ids = torch.tensor([[2, 5, 3]])
    # the text embedding output includes the token-type-0 vector: it is not LN(word + position) alone
    no_type = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(3)[None]))
    assert not torch.allclose(emb(ids, torch.zeros_like(ids)), no_type, atol=1e-4)


def test_needs_weights_or_twin(tok):
    with pytest.raises(ValueError, match="backbone.path"):
        build(tokenizer=tok)


@pytest.mark.slow
@pytest.mark.parametrize("task,prober", [("vcd", "attention")])
def test_train_fast_dev_run(tmp_path, demo_root, task, prober):
    from helpers_backbones import fast_dev_run

    cfg_json = write_json(tmp_path / "tiny.json", dict(TINY, vocab_size=30522, visual_feat_dim=64))
    res = fast_dev_run(tmp_path, demo_root, ["backbone=lxmert_untrained", "backbone.tokenizer=minilm",
                                             f"backbone.config={cfg_json}", f"task={task}", f"prober={prober}"])
    assert res["backbone"]["family"] == "lxmert" and not res["backbone"]["pretrained"]
    names = [r["name"] for r in res["layers"]]
    if task == "vcd":
        assert names == [f"layer_{x:02d}" for x in range(1, X + 1)] + ["all_heads"]
    else:
        assert names == [f"layer_{l:02d}" for l in range(R + X + 1)]
