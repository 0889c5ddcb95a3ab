"""Text-only BERT-family backbone: MiniLM offline, HF parity, twins, text-only behaviour, tiny dirs."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, BertForMaskedLM, BertModel

from helpers_backbones import VOCAB, check_rows_sum_to_one, gather_rows, make_batch, row_request, tiny_tokenizer
from value_pl.backbones import build_backbone
from value_pl.backbones.capture import CaptureSpec
from value_pl.backbones.common import minilm_path
from value_pl.data.collate import TaskSpec


def build(**kw):
    return build_backbone(OmegaConf.create({"family": "bert", **kw}))


@pytest.fixture(scope="module")
def minilm():
    return build(path="minilm")


def test_minilm_offline_real_attentions(minilm):
    assert minilm.identity["pretrained"] and minilm.identity["model_type"] == "bert"
    assert minilm.identity["ignored_keys"] == 0 and minilm.num_layers == 6 and minilm.hidden_size == 384
    batch = make_batch(minilm, dv=8)
    assert batch["region_feats"].shape[1] == 0  # text only: regions dropped by the collator
    out = minilm(batch, CaptureSpec.everything())
    assert sorted(out.hidden) == sorted(minilm.sentence_layers()) and len(out.attn) == 6
    assert out.streams["joint"].region_offset is None
    check_rows_sum_to_one(out)
    ref = BertModel.from_pretrained(minilm_path(), attn_implementation="eager", local_files_only=True).eval()
    with torch.no_grad():
        r = ref(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                token_type_ids=torch.zeros_like(batch["input_ids"]), output_hidden_states=True, output_attentions=True)
    for l, h in enumerate(r.hidden_states):
        torch.testing.assert_close(out.hidden[f"hidden.joint.{l}"], h, atol=2e-5, rtol=1e-4)
    for l, a in enumerate(r.attentions):
        torch.testing.assert_close(out.attn[f"attn.joint.{l + 1}.self"], a, atol=1e-5, rtol=1e-4)
    # real (non-uniform) attention: rows are far more peaked than the uniform row over the real tokens
    n_real = batch["text_mask"].sum(1)[:, None, None].float()
    peak = out.attn["attn.joint.3.self"].amax(-1)  # (B, H, T)
    valid = batch["text_mask"].bool()[:, None, :].expand_as(peak)
    assert (peak - 1.0 / n_real)[valid].mean() > 0.2
    # and differ across heads
    a = out.attn["attn.joint.3.self"]
    assert (a - a.mean(1, keepdim=True)).abs().amax() > 0.1


def test_minilm_twin_and_rows(minilm):
    a = build(path="minilm", pretrained=False, seed=1)  # same-seed reproducibility: tiny dir test below
    assert a.weights_checksum() != minilm.weights_checksum() and a.config.to_dict() == minilm.config.to_dict()
    batch = make_batch(minilm, dv=8)
    oa = a(batch, CaptureSpec(hidden=[], attn=["attn.joint.1.self"]))
    op = minilm(batch, CaptureSpec(hidden=[], attn=["attn.joint.1.self"]))
    assert not torch.allclose(oa.attn["attn.joint.1.self"], op.attn["attn.joint.1.self"], atol=1e-3)
    full = minilm(batch, CaptureSpec(hidden=[], attn=None))
    part = minilm(batch, CaptureSpec(hidden=[], attn=None, rows=row_request(batch)))
    assert part.rows["joint"].shape == (3, 2)  # region rows are ignored: no regions in this stream
    for n, m in part.attn.items():
        torch.testing.assert_close(m, gather_rows(full.attn[n], part.rows["joint"]), atol=1e-6, rtol=1e-5)


def test_text_only_refuses_pairs(minilm):
    with pytest.raises(ValueError, match="text-only"):
        minilm.pair_layout("phrase_region")
    with pytest.raises(ValueError, match="text-only"):
        minilm.collator(TaskSpec("vrc", "region_region", ["on"]))
    assert minilm.collator(TaskSpec("sentlen", "sentence", ["1", "2"])).text_only


def test_tiny_dir_with_prefix_and_missing_key(tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    c = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64)
    mlm = BertForMaskedLM(c)
    mlm.save_pretrained(str(tmp_path / "mlm"))  # keys bert.* + cls.* head
    m = build(path=str(tmp_path / "mlm"), tokenizer=tok)
    own = m.state_dict()
    for k, v in mlm.bert.state_dict().items():
        assert torch.equal(own["model." + k], v), k
    assert m.load_report["ignored"] and all(k.startswith("cls.") for k in m.load_report["ignored"])
    sd = {("bert." + k): v for k, v in mlm.bert.state_dict().items() if "layer.1.output.dense.weight" not in k}
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(KeyError, match=r"model\.encoder\.layer\.1\.output\.dense\.weight"):
        build(path=str(tmp_path / "mlm"), checkpoint=str(tmp_path / "bad.bin"), tokenizer=tok)
    t1 = build(path=str(tmp_path / "mlm"), tokenizer=tok, pretrained=False, seed=4)
    t2 = build(path=str(tmp_path / "mlm"), tokenizer=tok, pretrained=False, seed=4)
    assert t1.weights_checksum() == t2.weights_checksum() != m.weights_checksum()



def test_electra_with_a_narrower_embedding_is_projected_as_in_transformers(tmp_path):
    """ELECTRA-small's embeddings (128-d) are projected to the hidden width (256) before the first layer; layer 0
    is the projected embedding output, and every layer equals ElectraModel's (eager) hidden states."""
    from transformers import ElectraConfig, ElectraModel

    tok = tiny_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    ref = ElectraModel(ElectraConfig(vocab_size=len(VOCAB), embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     attn_implementation="eager")).eval()
    ref.save_pretrained(str(tmp_path / "electra"))
    m = build(path=str(tmp_path / "electra"), tokenizer=tok)
    assert not m.load_report["ignored"] and not m.load_report.get("missing_optional")
    torch.testing.assert_close(m.model.embeddings_project.weight, ref.embeddings_project.weight, rtol=0, atol=0)
    batch = make_batch(m)
    out = m(batch, CaptureSpec.everything())
    with torch.no_grad():
        hs = ref(input_ids=batch["input_ids"], attention_mask=batch["text_mask"],
                 token_type_ids=torch.zeros_like(batch["input_ids"]), output_hidden_states=True).hidden_states
    real = batch["text_mask"].bool()
    assert len(hs) == 3 and out.hidden["hidden.joint.0"].shape[-1] == 32
    for i, h in enumerate(hs):
        torch.testing.assert_close(out.hidden[f"hidden.joint.{i}"][real], h[real], atol=1e-5, rtol=1e-5)
