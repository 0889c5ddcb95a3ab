"""VisualBERT through transformers: HF parity (hidden + attentions), loading, twins, row capture."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import VisualBertConfig, VisualBertForPreTraining, VisualBertModel

from helpers_backbones import VOCAB, check_rows_sum_to_one, gather_rows, make_batch, row_request, tiny_tokenizer
from value_pl.backbones import build_backbone
from value_pl.backbones.capture import CaptureSpec

DV = 16
TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, visual_embedding_dim=DV, pad_token_id=0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def vb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vb")
    torch.manual_seed(0)
    m = VisualBertForPreTraining(VisualBertConfig(**TINY))  # keys visual_bert.* + cls.*
    m.save_pretrained(str(d))
    return str(d), m


def build(**kw):
    return build_backbone(OmegaConf.create({"family": "visualbert", **kw}), img_dim=DV)


@pytest.fixture(scope="module")
def bb(vb_dir, tok):
    return build(path=vb_dir[0], tokenizer=tok)


def test_matches_hf(bb, vb_dir):
    batch = make_batch(bb, dv=DV)
    out = bb(batch, CaptureSpec.everything())
    c = VisualBertConfig(**TINY)
    c._attn_implementation = "eager"
    ref = VisualBertModel(c).eval()
    ref.load_state_dict(vb_dir[1].visual_bert.state_dict())
    B, R = batch["region_mask"].shape
    with torch.no_grad():
        r = ref(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                token_type_ids=torch.zeros_like(batch["input_ids"]), visual_embeds=batch["region_feats"].float(),
                visual_attention_mask=batch["region_mask"], visual_token_type_ids=torch.ones(B, R, dtype=torch.long),
                output_hidden_states=True, output_attentions=True)
    for l, h in enumerate(r.hidden_states):
        torch.testing.assert_close(out.hidden[f"hidden.joint.{l}"], h, atol=1e-5, rtol=1e-4)
    for l, a in enumerate(r.attentions):
        torch.testing.assert_close(out.attn[f"attn.joint.{l + 1}.self"], a, atol=1e-6, rtol=1e-4)
    assert check_rows_sum_to_one(out) == 2
    assert out.streams["joint"].region_offset == batch["input_ids"].shape[1]
    # boxes are not an input of VisualBERT
    batch2 = dict(batch, region_boxes=torch.rand_like(batch["region_boxes"]))
    torch.testing.assert_close(bb(batch2, CaptureSpec(hidden=["hidden.joint.2"])).hidden["hidden.joint.2"],
                               out.hidden["hidden.joint.2"])


def test_rows_and_layout(bb):
    batch = make_batch(bb, dv=DV)
    full = bb(batch, CaptureSpec.everything())
    part = bb(batch, CaptureSpec(hidden=[], attn=["attn.joint.2.self"], rows=row_request(batch)))
    assert list(part.attn) == ["attn.joint.2.self"]
    torch.testing.assert_close(part.attn["attn.joint.2.self"],
                               gather_rows(full.attn["attn.joint.2.self"], part.rows["joint"]), atol=1e-6, rtol=1e-5)
    check_rows_sum_to_one(part)
    lay = bb.pair_layout("region_region")
    assert [l.name for l in lay.layers] == ["layer_00", "layer_01", "layer_02", "all_heads"]


def test_loading_and_twins(bb, vb_dir, tok, tmp_path):
    own = bb.state_dict()
    for k, v in vb_dir[1].visual_bert.state_dict().items():
        assert torch.equal(own["visual_bert." + k], v), k
    assert bb.load_report["ignored"] and all(k.startswith("cls.") for k in bb.load_report["ignored"])
    sd = {k: v for k, v in vb_dir[1].state_dict().items() if k != "visual_bert.embeddings.visual_projection.weight"}
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(KeyError, match=r"visual_bert\.embeddings\.visual_projection\.weight"):
        build(path=vb_dir[0], checkpoint=str(tmp_path / "bad.bin"), tokenizer=tok)
    a = build(path=vb_dir[0], tokenizer=tok, pretrained=False, seed=2)
    b = build(path=vb_dir[0], tokenizer=tok, pretrained=False, seed=2)
    assert a.weights_checksum() == b.weights_checksum() != bb.weights_checksum()
    assert a.config.to_dict() == bb.config.to_dict()


@pytest.mark.slow
def test_train_fast_dev_run(tmp_path, demo_root):
    from helpers_backbones import fast_dev_run, write_json

    cfg_json = write_json(tmp_path / "tiny.json", dict(TINY, vocab_size=30522, visual_embedding_dim=64))
    res = fast_dev_run(tmp_path, demo_root, ["backbone=visualbert", "backbone.path=null", "backbone.tokenizer=minilm",
                                             f"backbone.config={cfg_json}", "backbone.pretrained=false",
                                             "task=vri", "prober=attention"])
    assert res["backbone"]["family"] == "visualbert" and res["backbone"]["img_dim"] == 64
    assert [r["name"] for r in res["layers"]] == ["layer_01", "layer_02", "all_heads"]


def test_needs_weights_or_twin(tok):
    with pytest.raises(ValueError, match="backbone.path"):
        build(tokenizer=tok)
