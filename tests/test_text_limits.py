"""Text reaches every backbone whole (up to the model's positions), truncation is counted, and the cached
word-by-word tokenisation equals the tokenizer's own batch call on real-shaped text (SentEval/Flickr30k)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose
from helpers_backbones import VOCAB, tiny_tokenizer
from value_pl.backbones import build_backbone
from value_pl.data.collate import Collator, InputEncoder, TaskSpec

# SentEval probing files are Moses-tokenised with spaces around punctuation ("wasn 't"); SentLen bins reach 28+.
SENT_22 = ("the man in the red shirt , who was n't riding his bike , said that dog ran near "
           "the grass .").split()
SENT_28 = ("a young woman with a big hat holds the ball while two young guys run near the street and "
           "a dog runs on the grass with them .").split()


def sentence_sample(key, words, label):
    return {"key": key, "feats": np.zeros((0, 16), np.float16),
            "meta": {"words": words, "image": {"id": "none", "width": 1, "height": 1}, "phrases": [],
                     "regions": {"boxes": [], "chains": [], "source": []}, "pairs": {},
                     "sentence_labels": {"sentlen": label}}}


@pytest.fixture(scope="module")
def lxmert(tmp_path_factory):
    from transformers import LxmertConfig, LxmertModel

    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    d = tmp_path_factory.mktemp("lx")
    LxmertModel(LxmertConfig(vocab_size=len(VOCAB), hidden_size=16, num_attention_heads=2, intermediate_size=32,
                             l_layers=2, r_layers=1, x_layers=1, visual_feat_dim=16, visual_pos_dim=4,
                             max_position_embeddings=64)).save_pretrained(str(d))
    return build_backbone(OmegaConf.create({"family": "lxmert", "path": str(d), "tokenizer": tok}))


def test_long_sentences_reach_lxmert_as_different_inputs(lxmert):
    assert (len(SENT_22), len(SENT_28)) == (22, 28)
    assert lxmert.text_limit == 64  # the model's positions, not LXMERT's pretraining length of 20
    col = lxmert.collator(TaskSpec("sentlen", "sentence", ["3", "4"]))
    b = col([sentence_sample("a", SENT_22, "3"), sentence_sample("b", SENT_28, "4")])
    n = b["text_mask"].sum(1).tolist()
    assert n[0] >= 24 and n[1] >= 30 and n[0] != n[1]
    assert not torch.equal(b["input_ids"][0], b["input_ids"][1]) and b["counts"]["texts_truncated"] == 0
    from value_pl.backbones.capture import CaptureSpec

    out = lxmert(b, CaptureSpec(hidden=["hidden.lang.2"], attn=[]))  # the linguistic probe's layers
    assert out.hidden["hidden.lang.2"].shape[1] == b["input_ids"].shape[1]


def test_the_configs_keep_the_whole_text():
    for name in ("lxmert", "lxmert_hf", "lxmert_untrained", "uniter", "minilm_uniter", "bert", "visualbert"):
        assert compose([f"backbone={name}"]).backbone.max_text_len is None, name


def test_truncation_is_counted_and_phrases_lost_with_it(lxmert):
    enc = lxmert.input_encoder()
    enc.max_text_len = 12
    meta = {"words": SENT_28, "image": {"id": "1", "width": 100, "height": 100},
            "phrases": [{"span": [0, 3], "label": "people"}, {"span": [12, 14], "label": "people"}],
            "regions": {"boxes": [[0, 0, 10, 10], [5, 5, 50, 50]]},
            "pairs": {"vcd": [[0, 0, "coref"], [1, 1, "coref"], [1, 0, "not_coref"]]}}
    s = {"key": "k", "meta": meta, "feats": np.zeros((2, 16), np.float16)}
    b = Collator(enc, TaskSpec("vcd", "phrase_region", ["coref", "not_coref"]))([s])
    c = b["counts"]
    assert b["input_ids"].shape[1] == 12 and c["texts_truncated"] == 1
    assert c["phrases_dropped"] == 1 and c["pairs_dropped"] == 2 and c["pairs"] == 1
    assert b["a_span"].tolist() == [[1, 4]]  # "a young woman" after [CLS]


def _piece_tokenizer(d) -> str:
    """A BERT tokenizer whose "shirt" is three word pieces (sh ##ir ##t), every other word one piece."""
    from transformers import BertTokenizer

    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "in", "yellow", "sh", "##ir", "##t", "rides",
             "bike"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(str(d))
    return str(d)


@pytest.mark.parametrize("limit", [9, 10])
def test_a_phrase_whose_last_word_is_cut_part_way_is_dropped_and_counted(tmp_path, limit):
    """[CLS] a man in a yellow sh ##ir ##t rides a bike [SEP]: at 9 tokens "shirt" keeps sh ##ir, at 10 it is whole.
    A word cut part-way has no span: "a yellow shirt" is dropped and counted, never probed as "a yellow sh ##ir"."""
    from transformers import BertTokenizerFast

    from value_pl.analysis.pairs import AnalysisCollator

    tok = BertTokenizerFast.from_pretrained(_piece_tokenizer(tmp_path / "tok"))
    words = "a man in a yellow shirt rides a bike".split()
    enc = InputEncoder(tok, "uniter7", max_text_len=limit)
    got = enc.encode_text([words])
    assert got["truncated"].tolist() == [True] and got["input_ids"].shape[1] == limit
    shirt = [-1, -1] if limit == 9 else [6, 9]
    assert got["word_to_token"][0, 4:7].tolist() == [[5, 6], shirt, [-1, -1]]  # yellow, shirt, rides
    meta = {"words": words, "image": {"id": "1", "width": 100, "height": 100},
            "phrases": [{"span": [0, 2], "label": "people"}, {"span": [3, 6], "label": "clothing"},
                        {"span": [7, 9], "label": "other"}],
            "regions": {"boxes": [[0, 0, 10, 10], [5, 5, 50, 50]]},
            "pairs": {"vcd": [[0, 0, "coref"], [1, 1, "coref"], [1, 0, "not_coref"], [2, 1, "coref"]]}}
    s = {"key": "k", "meta": meta, "feats": np.zeros((2, 16), np.float16)}
    b = Collator(enc, TaskSpec("vcd", "phrase_region", ["coref", "not_coref"]))([s])
    c = b["counts"]
    if limit == 9:  # "a yellow shirt" cut part-way, "a bike" wholly: both lost, with their 3 pairs
        assert (c["phrases_dropped"], c["pairs_dropped"], c["pairs"]) == (2, 3, 1)
        assert b["a_span"].tolist() == [[1, 3]]  # "a man" only
    else:  # "shirt" ends at the cut: the phrase is whole
        assert (c["phrases_dropped"], c["pairs_dropped"], c["pairs"]) == (1, 1, 3)
        assert b["a_span"].tolist() == [[1, 3], [4, 9], [4, 9]]
    a = AnalysisCollator(Collator(enc))([s])  # the analyses read the same word spans
    assert a["coref_phrase"].tolist() == ([[1, 3]] if limit == 9 else [[1, 3], [4, 9]])
    assert a["analysis_missing"]["coref: phrase truncated by max_text_len"] == (2 if limit == 9 else 1)


@pytest.mark.parametrize("texts", [
    [SENT_22, SENT_28, ["Two", "young", "guys", "wasn", "'t", "there", "."]],
    [["A", "man", "in", "an", "orange", "hat", "starring", "at", "something", "."], ["x"], ["!!", "é", "naïve"]],
])
def test_cached_word_pieces_equal_the_tokenizer(texts):
    from value_pl.backbones.common import minilm_path, load_tokenizer

    tok = load_tokenizer(minilm_path())
    enc = InputEncoder(tok, "uniter7", max_text_len=512)
    got = enc.encode_text(texts)
    ref = tok(texts, is_split_into_words=True, add_special_tokens=True, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["text_mask"], ref["attention_mask"])
    for b in range(len(texts)):
        ids = ref.word_ids(b)
        for w in range(len(texts[b])):
            toks = [t for t, x in enumerate(ids) if x == w]
            assert got["word_to_token"][b, w].tolist() == ([toks[0], toks[-1] + 1] if toks else [-1, -1])
    enc2 = InputEncoder(tok, "uniter7", max_text_len=8)  # truncation as the tokenizer's own
    short = enc2.encode_text(texts)
    ref2 = tok(texts, is_split_into_words=True, truncation=True, max_length=8, padding=True, return_tensors="pt")
    assert torch.equal(short["input_ids"], ref2["input_ids"])
    assert short["truncated"].tolist() == [len(ref["input_ids"][b][ref["attention_mask"][b].bool()]) > 8
                                          for b in range(len(texts))]


def test_non_finite_features_name_the_shard_and_sample(lxmert):
    import pytest as _pytest

    from value_pl.data.schema import SchemaError

    f = np.zeros((2, 16), np.float16)
    f[1, 3] = np.inf
    s = {"key": "k9", "source": ("shards/x/train-000003.tar", 7), "feats": f,
         "meta": {"words": ["a", "dog"], "image": {"id": "1", "width": 10, "height": 10},
                  "regions": {"boxes": [[0, 0, 5, 5], [1, 1, 6, 6]]}, "phrases": [], "pairs": {}}}
    with _pytest.raises(SchemaError, match="train-000003.tar: sample k9: non-finite region features"):
        lxmert.collator()([s])
    f[1, 3] = np.nan
    with _pytest.raises(SchemaError, match="non-finite"):
        lxmert.collator()([s])


def test_a_run_warns_at_start_when_the_shards_hold_longer_texts(tmp_path, caplog):
    import logging

    from test_cache import small_demo, tiny_backbone
    from value_pl.driver.setup import build_module, make_datamodule

    root = tmp_path / "demo"
    man = small_demo(root, splits={"train": 8, "val": 4, "test": 4})
    longest = man["splits"]["train"]["max_words"]
    cfg = compose(["task=vrc", f"data.root={root}", *tiny_backbone(tmp_path), "logger=none",
                   f"backbone.max_text_len={longest}"])
    with caplog.at_level(logging.WARNING):
        build_module(cfg, make_datamodule(cfg))
    assert f"texts of up to {longest} words" in caplog.text and "counted in results.json 'truncated'" in caplog.text
    caplog.clear()
    cfg = compose(["task=vrc", f"data.root={root}", *tiny_backbone(tmp_path), "logger=none"])
    with caplog.at_level(logging.WARNING):
        build_module(cfg, make_datamodule(cfg))
    assert "texts of up to" not in caplog.text
