"""Mismatched inputs stop before the first batch, in one sentence naming both sides and the override that fixes it.

Each mismatch for each backbone family that has it (tiny configs, the tiny tokenizer): feature width (UNITER,
LXMERT, VisualBERT; random image side vs weights that fix it), box format (UNITER, LXMERT), vocabulary and text
length (all four). Then the places runs start: ``train`` (build_module), ``analyze`` and ``compare`` refuse a
UNITER checkpoint made for other features than the shards' (the raw failure was a matmul shape error).
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertConfig, RobertaConfig

from conftest import compose
from helpers_backbones import VOCAB, make_batch, tiny_tokenizer, write_json
from value_pl.backbones import build_backbone
from value_pl.backbones.checks import InputMismatchError, check_inputs, input_problems

SHARDS = {"feature_dim": 64}
DV = 16
BERT = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=2)
LXMERT = dict(vocab_size=len(VOCAB), hidden_size=32, num_attention_heads=4, intermediate_size=64, l_layers=1,
              r_layers=1, x_layers=1, visual_feat_dim=DV, visual_pos_dim=4, max_position_embeddings=64)
VB = dict(BERT, visual_embedding_dim=DV)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("checks")
    tiny_tokenizer(d / "tok")
    return d


def build(d, family, config: dict | None = None, **kw):
    cfg = {"family": family, "name": f"tiny-{family}", "tokenizer": str(d / "tok"), "pretrained": False, **kw}
    if config is not None:
        cfg["config"] = write_json(d / f"{family}-{abs(hash(str(config)))}.json", config)
    return build_backbone(OmegaConf.create(cfg), img_dim=SHARDS["feature_dim"])


def only(bb, regions=True) -> str:
    probs = input_problems(bb, SHARDS, "shards/x", regions=regions)
    assert len(probs) == 1, probs
    with pytest.raises(InputMismatchError) as e:
        check_inputs(bb, SHARDS, "shards/x", regions=regions)
    assert str(e.value) == probs[0]
    return probs[0]


def test_matching_inputs_pass(d):
    for bb in (build(d, "uniter", BERT), build(d, "lxmert", LXMERT, img_dim=64), build(d, "visualbert", VB)):
        assert input_problems(bb, SHARDS, "shards/x") == [], bb.family
        bb(make_batch(bb, dv=64))  # and the batch goes through
    bb = build(d, "uniter", BERT, img_dim=DV)  # sentence tasks have no regions: the width does not matter
    assert input_problems(bb, SHARDS, "shards/x", regions=False) == []


@pytest.mark.parametrize("family,config,field", [("uniter", BERT, "img_dim"), ("lxmert", LXMERT, "visual_feat_dim"),
                                                 ("visualbert", VB, "visual_embedding_dim")])
def test_feature_width_random_image_side(d, family, config, field):
    msg = only(build(d, family, config, img_dim=DV))
    assert msg == (f"backbone tiny-{family} ({family}) expects 16-d region features ({field}=16) but the shards at "
                   f"shards/x have 64-d features (manifest.json feature_dim=64): set backbone.img_dim=64 (or null to "
                   f"follow the shards), or rebuild the shards with feature_dim=16."), msg


def test_feature_width_fixed_by_weights(d):
    """A UNITER checkpoint for 16-d features (width read from the checkpoint) on 64-d shards: only a rebuild helps."""
    src = build(d, "uniter", BERT, img_dim=DV)
    torch.save(dict(src.state_dict()), d / "uniter16.pt")
    bb = build(d, "uniter", BERT, checkpoint=str(d / "uniter16.pt"), pretrained=True)
    assert bb.img_dim == DV
    msg = only(bb)
    assert msg.endswith(f"rebuild the shards with feature_dim=16 (the image embedding comes from {d / 'uniter16.pt'}, "
                        "so backbone.img_dim cannot change it)."), msg
    # LXMERT and VisualBERT from an HF directory: the same advice
    from transformers import LxmertConfig, LxmertModel, VisualBertConfig, VisualBertModel

    LxmertModel(LxmertConfig(**LXMERT)).save_pretrained(str(d / "lx"))
    VisualBertModel(VisualBertConfig(**VB)).save_pretrained(str(d / "vb"))
    for fam, path in (("lxmert", d / "lx"), ("visualbert", d / "vb")):
        msg = only(build(d, fam, None, path=str(path), pretrained=True))
        assert "rebuild the shards with feature_dim=16" in msg and f"comes from {path}" in msg, msg


def test_box_format(d):
    msg = only(build(d, "uniter", BERT, box_mode="xyxy4"))
    assert msg == ("backbone tiny-uniter (uniter) takes 7-d boxes (pos_linear in_features=7) but its box mode xyxy4 "
                   "encodes 4-d boxes: set backbone.box_mode=uniter7."), msg
    msg = only(build(d, "lxmert", dict(LXMERT, visual_pos_dim=7), img_dim=64))
    assert msg == ("backbone tiny-lxmert (lxmert) takes 7-d boxes (visual_pos_dim=7) but its box mode xyxy4 encodes "
                   "4-d boxes: set backbone.box_mode=uniter7."), msg
    msg = only(build(d, "lxmert", LXMERT, img_dim=64, box_mode="uniter7"))
    assert msg.endswith("takes 4-d boxes (visual_pos_dim=4) but its box mode uniter7 encodes 7-d boxes: "
                        "set backbone.box_mode=xyxy4."), msg
    # the override is real: with it, the 7-d LXMERT variant runs on 7-d boxes
    bb = build(d, "lxmert", dict(LXMERT, visual_pos_dim=7), img_dim=64, box_mode="uniter7")
    assert input_problems(bb, SHARDS) == [] and make_batch(bb, dv=64)["region_boxes"].shape[-1] == 7
    with pytest.raises(ValueError, match="box_mode='xywh'"):
        build(d, "uniter", BERT, box_mode="xywh")


def bert_dir(d, name, cfg):
    cfg.save_pretrained(str(d / name))
    return str(d / name)


@pytest.mark.parametrize("family", ["uniter", "lxmert", "visualbert", "bert"])
def test_vocabulary_and_text_length(d, family):
    small = len(VOCAB) - 5
    configs = {"uniter": dict(BERT, vocab_size=small), "lxmert": dict(LXMERT, vocab_size=small),
               "visualbert": dict(VB, vocab_size=small)}
    if family == "bert":
        bb = build(d, "bert", None, path=bert_dir(d, "bert-small", BertConfig(**dict(BERT, vocab_size=small))))
    else:
        bb = build(d, family, configs[family], img_dim=64)
    msg = only(bb, regions=family != "bert")
    assert msg == (f"the tokenizer at {d / 'tok'} has {len(VOCAB)} tokens but backbone tiny-{family} ({family}) has "
                   f"{small} word embeddings (vocab_size={small}): set backbone.tokenizer=DIR to the tokenizer the "
                   f"model was trained with."), msg
    full = {"uniter": BERT, "lxmert": LXMERT, "visualbert": VB}
    if family == "bert":
        bb = build(d, "bert", None, path=bert_dir(d, "bert-ok", BertConfig(**BERT)), max_text_len=100)
    else:
        bb = build(d, family, full[family], img_dim=64, max_text_len=100)
    msg = only(bb, regions=family != "bert")
    assert msg == (f"backbone.max_text_len=100 but backbone tiny-{family} ({family}) has 64 text positions "
                   f"(max_position_embeddings=64): set backbone.max_text_len=64 or less."), msg


def test_roberta_positions_count_the_padding_offset(d):
    rob = RobertaConfig(**dict(BERT, max_position_embeddings=66, type_vocab_size=1), pad_token_id=1)
    path = bert_dir(d, "roberta", rob)
    assert input_problems(build(d, "bert", None, path=path, max_text_len=64), SHARDS, regions=False) == []
    msg = only(build(d, "bert", None, path=path, max_text_len=65), regions=False)
    assert "has 64 text positions (max_position_embeddings=66, 2 reserved for padding)" in msg, msg


@pytest.fixture(scope="module")
def ckpt16(d):
    """A UNITER checkpoint made for 16-d region features, and its (tiny, BERT-style) config."""
    src = build(d, "uniter", BERT, img_dim=DV)
    p = d / "ckpt_step10.pt"
    torch.save(dict(src.state_dict()), p)
    return p, write_json(d / "uniter-tiny.json", BERT)


def test_runs_stop_before_the_first_batch(d, ckpt16, demo_root, tmp_path, monkeypatch):
    """train, analyze and compare with a 16-d UNITER checkpoint on the 64-d demo shards: the sentence, no forward."""
    from value_pl.backbones.uniter import UniterBackbone
    from value_pl.compare import compare
    from value_pl.driver.analyze import analyze
    from value_pl.driver.train import train

    def no_forward(*a, **k):
        raise AssertionError("a forward pass ran")

    monkeypatch.setattr(UniterBackbone, "forward", no_forward)
    ckpt, config = ckpt16
    bb = ["backbone=uniter", f"backbone.config={config}", f"backbone.tokenizer={d / 'tok'}", "backbone.img_dim=null",
          f"data.root={demo_root}", "logger=none"]
    want = (f"expects 16-d region features (img_dim=16) but the shards at {demo_root} have 64-d features "
            f"(manifest.json feature_dim=64): rebuild the shards with feature_dim=16")
    with pytest.raises(InputMismatchError, match=r"expects 16-d region features \(img_dim=16\)") as e:
        train(compose(bb + [f"backbone.checkpoint={ckpt}", "task=vcd", "prober=layer_emb",
                            f"run_dir={tmp_path / 'train'}"]))
    assert want in str(e.value)
    with pytest.raises(InputMismatchError) as e:
        analyze(compose(bb + [f"backbone.checkpoint={ckpt}", "analysis=modality", f"run_dir={tmp_path / 'an'}"],
                        "analyze"))
    assert want in str(e.value)
    with pytest.raises(InputMismatchError) as e:
        compare(compose(bb + [f"checkpoints={ckpt}", f"out={tmp_path / 'cmp'}"], "compare"))
    assert want in str(e.value)


CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "a", "Man", "man", "The", "the", "dog", "rides"]


def tok_dir(d, name: str, vocab: list[str], tokenizer_config: dict | None) -> str:
    """vocab.txt + config.json (as in a model directory), with or without tokenizer_config.json."""
    p = d / name
    p.mkdir(exist_ok=True)
    (p / "vocab.txt").write_text("\n".join(vocab) + "\n")
    write_json(p / "config.json", {"model_type": "bert", "vocab_size": len(vocab)})
    if tokenizer_config is not None:
        write_json(p / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", **tokenizer_config})
    return str(p)


def test_letter_case_of_tokenizer_and_vocabulary(d):
    from types import SimpleNamespace

    from value_pl.backbones.checks import case_problem
    from value_pl.backbones.common import load_tokenizer, minilm_path

    cfg = dict(BERT, vocab_size=len(CASED_VOCAB))
    # a cased vocab.txt without its tokenizer_config.json: transformers lowercases (do_lower_case defaults to True)
    bb = build(d, "uniter", cfg, img_dim=64, tokenizer=tok_dir(d, "cased-bare", CASED_VOCAB, None))
    assert bb.tokenizer.tokenize("The Man") == ["the", "man"]
    msg = only(bb)
    assert "lowercases its input but its vocabulary is cased (e.g. 'Man' and 'man' are different tokens)" in msg, msg
    assert "do_lower_case: false" in msg
    ok = build(d, "uniter", cfg, img_dim=64, tokenizer=tok_dir(d, "cased", CASED_VOCAB, {"do_lower_case": False}))
    assert ok.tokenizer.tokenize("The Man") == ["The", "Man"] and input_problems(ok, SHARDS) == []
    # an uncased vocabulary read without lowercasing: capitalised words would be [UNK]
    bb = build(d, "uniter", BERT, img_dim=64, tokenizer=tok_dir(d, "uncased-kept", VOCAB, {"do_lower_case": False}))
    msg = only(bb)
    assert "keeps letter case but its vocabulary is uncased" in msg and "[UNK]" in msg, msg
    # the tiny (uncased) test tokenizer and the packaged MiniLM (bert-base-uncased vocabulary) pass
    assert case_problem(build(d, "uniter", BERT, img_dim=64)) is None
    assert case_problem(SimpleNamespace(tokenizer=load_tokenizer(minilm_path()))) is None
