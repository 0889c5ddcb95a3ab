"""UNITER: BERT parity with zero regions, released-checkpoint loading, twins, row capture."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertModel

from helpers_backbones import VOCAB, check_rows_sum_to_one, gather_rows, make_batch, row_request, tiny_tokenizer, write_json
from value_pl.backbones import build_backbone
from value_pl.backbones.capture import CaptureSpec

DV = 16
TINY = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY)).save_pretrained(str(d))
    return str(d)


def build(**kw):
    return build_backbone(OmegaConf.create({"family": "uniter", "img_dim": DV, **kw}))


@pytest.fixture(scope="module")
def bb(bert_dir, tok):
    return build(path=bert_dir, tokenizer=tok)


def test_zero_regions_equals_bert(bb, bert_dir):
    batch = make_batch(bb, n_regions=(0, 0, 0), dv=DV)
    assert batch["region_feats"].shape[1] == 0 and int(batch["text_mask"].sum()) < batch["text_mask"].numel()
    out = bb(batch, CaptureSpec.everything())
    ref = BertModel.from_pretrained(bert_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        r = ref(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                token_type_ids=torch.zeros_like(batch["input_ids"]), output_hidden_states=True, output_attentions=True)
    assert len(r.attentions) == 2
    for l, h in enumerate(r.hidden_states):
        torch.testing.assert_close(out.hidden[f"hidden.joint.{l}"], h, atol=1e-5, rtol=1e-4)
    for l, a in enumerate(r.attentions):
        torch.testing.assert_close(out.attn[f"attn.joint.{l + 1}.self"], a, atol=1e-6, rtol=1e-4)
    check_rows_sum_to_one(out)


def test_with_regions_rows_and_masks(bb):
    batch = make_batch(bb, dv=DV)
    assert batch["region_boxes"].shape[-1] == 7
    B, T = batch["input_ids"].shape
    Rg = batch["region_feats"].shape[1]
    full = bb(batch, CaptureSpec.everything())
    assert full.attn["attn.joint.1.self"].shape == (B, 4, T + Rg, T + Rg)
    assert check_rows_sum_to_one(full) == 2
    keymask = torch.cat([batch["text_mask"], batch["region_mask"]], 1) == 0
    assert torch.all(full.attn["attn.joint.2.self"].permute(0, 3, 1, 2)[keymask] == 0)
    mm = full.modality_mask("joint")
    assert torch.equal(mm[:, T:] == 1, batch["region_mask"].bool())
    part = bb(batch, CaptureSpec(hidden=["hidden.joint.2"], attn=["attn.joint.*"], rows=row_request(batch)))
    assert set(part.hidden) == {"hidden.joint.2"} and set(part.attn) == {"attn.joint.1.self", "attn.joint.2.self"}
    for n, a in part.attn.items():
        torch.testing.assert_close(a, gather_rows(full.attn[n], part.rows["joint"]), atol=1e-6, rtol=1e-5)
    check_rows_sum_to_one(part)
    # the same pair value through the output object with or without row capture
    b = torch.tensor([0, 1])
    ts, rs = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1], [2, 3]])
    for d in [("text", ts, "region", rs), ("region", rs, "text", ts)]:
        torch.testing.assert_close(part.attention_between("attn.joint.2.self", b, *d),
                                   full.attention_between("attn.joint.2.self", b, *d))


def _reference_uniter(sd: dict, s: dict, ids: torch.Tensor, layers: int, heads: int):
    """UNITER's forward written out for ONE sample (ChenRocks/UNITER model.py semantics): text embeddings; image
    embeddings LN(img_linear(f)) + LN(pos_linear(box7)) + type(1), LN; regions right after the text; -10000 mask
    (all ones here); BERT layers. Returns the hidden states per layer and the attention maps."""
    import math

    import numpy as np
    import torch.nn.functional as F

    def ln(x, p):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-12)

    def lin(x, p):
        return x @ sd[p + ".weight"].T + sd[p + ".bias"]

    U = "uniter."
    n = len(ids)
    t = ln(sd[U + "embeddings.word_embeddings.weight"][ids] + sd[U + "embeddings.position_embeddings.weight"][:n]
           + sd[U + "embeddings.token_type_embeddings.weight"][0], U + "embeddings.LayerNorm")
    W, H = s["meta"]["image"]["width"], s["meta"]["image"]["height"]
    b = torch.tensor(s["meta"]["regions"]["boxes"], dtype=torch.float32).reshape(-1, 4)
    w, h = (b[:, 2] - b[:, 0]) / W, (b[:, 3] - b[:, 1]) / H
    box7 = torch.stack([b[:, 0] / W, b[:, 1] / H, b[:, 2] / W, b[:, 3] / H, w, h, w * h], 1)
    f = torch.from_numpy(s["feats"].astype(np.float32))
    I = U + "img_embeddings."
    v = ln(ln(lin(f, I + "img_linear"), I + "img_layer_norm") + ln(lin(box7, I + "pos_linear"), I + "pos_layer_norm")
           + sd[U + "embeddings.token_type_embeddings.weight"][1], I + "LayerNorm")
    x = torch.cat([t, v])
    hs, maps = [x], []
    for l in range(layers):
        P = f"{U}encoder.layer.{l}."
        q, k, val = (lin(x, P + "attention.self." + m).view(len(x), heads, -1).transpose(0, 1) for m in ("query", "key", "value"))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        ctx = (a @ val).transpose(0, 1).reshape(len(x), -1)
        y = ln(lin(ctx, P + "attention.output.dense") + x, P + "attention.output.LayerNorm")
        x = ln(lin(F.gelu(lin(y, P + "intermediate.dense")), P + "output.dense") + y, P + "output.LayerNorm")
        hs.append(x)
        maps.append(a)
    return hs, maps


def test_matches_a_reference_forward_sample_by_sample(tmp_path, tok):
    """Hidden states and attention maps at the real positions of a padded batch (unequal texts and region counts,
    regions after the padded text) equal UNITER's own forward of each sample alone; LayerNorms and biases are
    perturbed so that no 1/0 initialisation hides a mistake."""
    from helpers_backbones import fake_samples

    m = build(config=write_json(tmp_path / "c.json", TINY), tokenizer=tok, pretrained=False, seed=5)
    g = torch.Generator().manual_seed(0)
    sd = {k: v + 0.3 * torch.randn(v.shape, generator=g) if ("orm" in k or k.endswith(".bias")) else v
          for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    samples = fake_samples((5, 3, 2), DV, seed=1)
    batch = m.collator()(samples)
    T = batch["input_ids"].shape[1]
    out = m(batch, CaptureSpec.everything())
    for b, s in enumerate(samples):
        ids = batch["input_ids"][b][batch["text_mask"][b].bool()]
        nr = len(s["meta"]["regions"]["boxes"])
        real = torch.cat([torch.arange(len(ids)), T + torch.arange(nr)])
        hs, maps = _reference_uniter(sd, s, ids, TINY["num_hidden_layers"], TINY["num_attention_heads"])
        for l, h in enumerate(hs):
            torch.testing.assert_close(out.hidden[f"hidden.joint.{l}"][b, real], h, atol=2e-5, rtol=1e-4)
        for l, a in enumerate(maps):
            torch.testing.assert_close(out.attn[f"attn.joint.{l + 1}.self"][b][:, real][:, :, real], a, atol=1e-5, rtol=1e-4)


def _released_style_state(m) -> dict:
    """The module's weights under the released names: old LayerNorm gamma/beta + pretraining heads."""
    sd = {}
    for k, v in m.state_dict().items():
        if "LayerNorm" in k or "layer_norm" in k:
            k = k.replace(".weight", ".gamma").replace(".bias", ".beta")
        sd[k] = v.clone()
    sd["cls.predictions.bias"] = torch.zeros(len(VOCAB))
    sd["feat_regress.weight"] = torch.zeros(DV, 32)
    sd["region_classifier.net.0.weight"] = torch.zeros(32, 32)
    sd["itm_output.weight"] = torch.zeros(2, 32)
    return sd


def test_checkpoint_round_trip_and_missing_key(tmp_path, tok):
    src = build(config=write_json(tmp_path / "c.json", TINY), tokenizer=tok, pretrained=False, seed=5)
    sd = _released_style_state(src)
    assert any(k.endswith(".gamma") for k in sd) and "uniter.img_embeddings.mask_embedding.weight" in sd
    torch.save(sd, tmp_path / "uniter-tiny.pt")
    m = build(checkpoint=str(tmp_path / "uniter-tiny.pt"), config=str(tmp_path / "c.json"), tokenizer=tok, seed=99)
    own, ref = m.state_dict(), src.state_dict()
    assert own.keys() == ref.keys()
    for k in ref:
        assert torch.equal(own[k], ref[k]), k
    assert sorted(m.load_report["ignored"]) == ["cls.predictions.bias", "feat_regress.weight", "itm_output.weight",
                                                 "region_classifier.net.0.weight"]
    assert m.identity["ignored_keys"] == 4 and m.identity["checkpoint"].endswith("uniter-tiny.pt")
    # DataParallel-saved files load too
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "dp.pt")
    m2 = build(checkpoint=str(tmp_path / "dp.pt"), config=str(tmp_path / "c.json"), tokenizer=tok)
    assert m2.weights_checksum() == m.weights_checksum()
    # a missing encoder key fails, naming it
    del sd["uniter.encoder.layer.1.attention.self.key.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match=r"uniter\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        build(checkpoint=str(tmp_path / "bad.pt"), config=str(tmp_path / "c.json"), tokenizer=tok)


def test_checkpoint_with_more_layers_than_the_config_is_refused(tmp_path, tok):
    """A config smaller than the checkpoint's (here 2 layers for a 3-layer file) would load the first layers and
    probe a truncated model: the encoder keys it cannot hold are an error naming them, not "ignored" heads."""
    deeper = dict(TINY, num_hidden_layers=3)
    src = build(config=write_json(tmp_path / "c3.json", deeper), tokenizer=tok, pretrained=False, seed=5)
    torch.save({**src.state_dict(), "cls.predictions.bias": torch.zeros(3)}, tmp_path / "u3.pt")
    with pytest.raises(KeyError, match=r"encoder key\(s\) the model built from its config does not have"
                                       r".*uniter\.encoder\.layer\.2\.") as e:
        build(checkpoint=str(tmp_path / "u3.pt"), config=write_json(tmp_path / "c2.json", TINY), tokenizer=tok)
    assert "cls.predictions" not in str(e.value) and "backbone.config" in str(e.value)
    # the matching config loads (the head stays an ignored, reported key)
    m = build(checkpoint=str(tmp_path / "u3.pt"), config=str(tmp_path / "c3.json"), tokenizer=tok)
    assert m.load_report["ignored"] == ["cls.predictions.bias"]


def test_untrained_twin(bb, bert_dir, tok):
    a = build(path=bert_dir, tokenizer=tok, pretrained=False, seed=3)
    b = build(path=bert_dir, tokenizer=tok, pretrained=False, seed=3)
    assert a.config.to_dict() == bb.config.to_dict()
    assert a.weights_checksum() == b.weights_checksum() != bb.weights_checksum()
    assert build(path=bert_dir, tokenizer=tok, pretrained=False, seed=4).weights_checksum() != a.weights_checksum()
    k = "uniter.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(a.state_dict()[k], bb.state_dict()[k])
    assert not a.identity["pretrained"]


@pytest.mark.slow
def test_train_fast_dev_run_untrained_twin(tmp_path, demo_root):
    from helpers_backbones import fast_dev_run

    cfg_json = write_json(tmp_path / "tiny.json", dict(TINY, vocab_size=30522))
    res = fast_dev_run(tmp_path, demo_root, ["backbone=uniter_untrained", "backbone.tokenizer=minilm", "backbone.img_dim=64",
                                             f"backbone.config={cfg_json}", "task=vcc", "prober=layer_emb"])
    assert res["backbone"]["family"] == "uniter" and not res["backbone"]["pretrained"]
    assert [r["name"] for r in res["layers"]] == ["layer_00", "layer_01", "layer_02"]


def test_needs_weights_or_twin(tok):
    with pytest.raises(ValueError, match="backbone.checkpoint"):
        build(tokenizer=tok)


def test_frozen_stays_in_eval_and_unfreeze_trains_with_dropout(bert_dir, tok):
    """A built backbone is frozen: train() inside a module put in train mode leaves dropout off. unfreeze() (a
    backbone your own pretraining trains) gives gradients and a working train(): dropout on, outputs vary."""
    m = build(path=bert_dir, tokenizer=tok, pretrained=False, seed=1)
    wrapper = torch.nn.ModuleDict({"bb": m}).train()
    assert not any(x.training for x in m.modules()) and not any(p.requires_grad for p in m.parameters())
    batch = make_batch(m)
    spec = CaptureSpec(hidden=[f"hidden.joint.{m.num_layers}"], attn=[])
    a, b = (m(batch, spec).hidden[f"hidden.joint.{m.num_layers}"] for _ in range(2))
    assert torch.equal(a, b)  # no dropout
    m.unfreeze()
    wrapper.train()
    assert all(x.training for x in m.modules()) and all(p.requires_grad for p in m.parameters())
    a, b = (m(batch, spec).hidden[f"hidden.joint.{m.num_layers}"] for _ in range(2))
    assert not torch.equal(a, b) and a.requires_grad  # dropout on, gradients flow
    wrapper.eval()
    assert not any(x.training for x in m.modules())
    m.freeze()
    wrapper.train()
    assert not any(x.training for x in m.modules())
