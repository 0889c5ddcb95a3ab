"""Word-by-word tokenisation equals the tokenizer's own tokenisation of the sentence for every tokenizer family a
backbone may use: WordPiece (uncased MiniLM, a cased vocabulary), byte-level BPE (RoBERTa: words after the first
carry the space marker ``Ġ``) and SentencePiece-style Unigram (XLM-R: ``▁``), all built here offline.

Token ids, each word's token span (reference: the tokens the sentence gains with that word), the per-worker caches
(a word first in one text and later in another), truncation (as the tokenizer's own) and phrase spans; the RoBERTa
backbone end to end (``<s> ... </s>``, padding id, positions from ``padding_idx + 1``, hidden states equal to
transformers' own forward; CamemBERT's model type, which does not say "roberta"); and the check that refuses a
tokenizer whose pieces cross spaces.
"""
from __future__ import annotations

import json
import pickle
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from value_pl.backbones import build_backbone
from value_pl.backbones.checks import input_problems, tokenisation_problem
from value_pl.data.collate import Collator, InputEncoder, TaskSpec

CORPUS = ["A man in a red shirt rides a bike near the street .", "Two young guys with shaggy hair look at their hands .",
          "The dog runs on the grass", "a woman is playing the guitar in a café .", "naïve people smile at 東京"] * 4
TEXTS = [
    "A man in a red shirt , who was n't there , rides a bike .".split(),
    "Two young guys with shaggy hair look at their hands near the street .".split(),
    ["naïve", "Zoë", "smiles", "😀", "at", "東京", "\u200b", "in", "a", "Café", "A"],  # "\u200b": no WordPiece pieces
    ["man"],  # a word first here and later in the other texts
    [],
]


def _fast(d, tok, config: dict) -> str:
    from transformers import AutoTokenizer

    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=32)))
    AutoTokenizer.from_pretrained(str(d))  # loads
    return str(d)


def byte_bpe(d) -> str:
    """RoBERTa-style: byte-level BPE, ``<s> $A </s>``, ``<pad>`` = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return _fast(d, tok, {"tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                          "unk_token": "<unk>", "pad_token": "<pad>", "sep_token": "</s>", "cls_token": "<s>",
                          "mask_token": "<mask>"})


def unigram(d) -> str:
    """XLM-R-style: Unigram with the SentencePiece ``▁`` marker (Metaspace), ``<s> $A </s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return _fast(d, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                          "unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>"})


def wordpiece_cased(d) -> str:
    from transformers import BertTokenizer

    d.mkdir(parents=True, exist_ok=True)
    words = sorted({w for s in CORPUS for w in s.split()} | {"Man", "Café", "##s", "##é", ",", "'", "t", "n"})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizer(vocab=str(d / "vocab.txt"), do_lower_case=False).save_pretrained(str(d))
    return str(d)


def wordpiece_uncased(d) -> str:
    from value_pl.backbones.common import minilm_path

    return minilm_path()


FAMILIES = {"wordpiece_uncased": wordpiece_uncased, "wordpiece_cased": wordpiece_cased, "byte_bpe": byte_bpe,
            "unigram": unigram}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tok(request, tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FAMILIES[request.param](tmp_path_factory.mktemp(request.param)))


def reference(tok, words):
    """The sentence's ids, and each word's span: the tokens ``" ".join(words[:i + 1])`` has beyond ``words[:i]``."""
    ids = tok(" ".join(words), verbose=False)["input_ids"]
    n = [len(tok(" ".join(words[:i]), add_special_tokens=False, verbose=False)["input_ids"]) for i in range(len(words) + 1)]
    pre = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"]) - 1  # [CLS]/<s> (1 after)
    return ids, [[pre + a, pre + b] if b > a else [-1, -1] for a, b in zip(n, n[1:])]


def test_word_by_word_equals_the_sentence(tok):
    enc = InputEncoder(tok, max_text_len=512)
    for _ in range(2):  # cold caches, then warm ones
        got = enc.encode_text(TEXTS)
        for b, words in enumerate(TEXTS):
            ids, spans = reference(tok, words)
            n = int(got["text_mask"][b].sum())
            assert got["input_ids"][b, :n].tolist() == ids, (b, tok.convert_ids_to_tokens(ids))
            assert got["word_to_token"][b, :len(words)].tolist() == spans, b
            assert (got["input_ids"][b, n:] == tok.pad_token_id).all()
    fresh = pickle.loads(pickle.dumps(enc))  # a loader worker: empty caches, the same encoding
    assert not fresh._pieces and not fresh._first
    again = fresh.encode_text(TEXTS[::-1])
    assert torch.equal(again["word_to_token"].flip(0)[:, :got["word_to_token"].shape[1]], got["word_to_token"])


@pytest.mark.parametrize("limit", [6, 9, 13])
def test_truncation_is_the_tokenizers_and_keeps_phrase_spans_exact(tok, limit):
    words = TEXTS[0]  # "A man in a red shirt , who was n't there , ..."
    enc = InputEncoder(tok, max_text_len=limit)
    got = enc.encode_text([words])
    ref = tok(" ".join(words), truncation=True, max_length=limit)["input_ids"]
    assert got["input_ids"][0].tolist() == ref and got["truncated"].tolist() == [True]
    _, spans = reference(tok, words)
    post = 1  # </s> or [SEP]
    kept = [s if 0 <= s[1] <= limit - post else [-1, -1] for s in spans]  # a word cut part-way has no span
    assert got["word_to_token"][0].tolist() == kept
    phrases = [[0, 2], [3, 6], [8, 10]]  # "A man", "a red shirt", "was n't"
    meta = {"words": words, "image": {"id": "1", "width": 10, "height": 10},
            "phrases": [{"span": p, "label": "other"} for p in phrases], "regions": {"boxes": [[0, 0, 5, 5]]},
            "pairs": {"vcd": [[i, 0, "coref"] for i in range(len(phrases))]}}
    b = Collator(enc, TaskSpec("vcd", "phrase_region", ["coref", "not_coref"]))(
        [{"key": "k", "meta": meta, "feats": np.zeros((1, 4), np.float16)}])
    whole = [[kept[s][0], kept[e - 1][1]] for s, e in phrases if min(kept[w][0] for w in range(s, e)) >= 0]
    assert b["a_span"].tolist() == whole and b["counts"]["phrases_dropped"] == len(phrases) - len(whole)


@pytest.fixture(scope="module")
def roberta_dirs(tmp_path_factory):
    import shutil

    from transformers import CamembertConfig, CamembertModel, RobertaConfig, RobertaModel

    out = {}
    for name, cfg, cls in (("roberta", RobertaConfig, RobertaModel), ("camembert", CamembertConfig, CamembertModel)):
        d = tmp_path_factory.mktemp(name)
        tok_dir = byte_bpe(d / "tok")
        shutil.copy(f"{tok_dir}/tokenizer.json", d / "tokenizer.json")
        conf = json.loads((d / "tok" / "tokenizer_config.json").read_text())
        conf.pop("model_max_length")  # the positions come from the model's config alone
        (d / "tokenizer_config.json").write_text(json.dumps(conf))
        torch.manual_seed(0)
        cls(cfg(vocab_size=400, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=34, pad_token_id=1, bos_token_id=0, eos_token_id=2)).save_pretrained(str(d))
        out[name] = str(d)
    return out


@pytest.mark.parametrize("name", ["roberta", "camembert"])
def test_roberta_style_backbone_end_to_end(roberta_dirs, name):
    from transformers import AutoModel

    bb = build_backbone(OmegaConf.create({"family": "bert", "path": roberta_dirs[name]}))
    tok = bb.tokenizer
    assert bb.position_offset() == 2 and bb.position_limit == bb.text_limit == 32  # 34 positions, 2 reserved
    assert input_problems(bb, None, regions=False) == []
    long = ("a man " * 20).split()  # past the 32 positions: cut to exactly 32 tokens
    texts = [TEXTS[0], TEXTS[2], long]
    col = bb.collator(TaskSpec("t", "sentence", ["x"]))
    batch = col([{"key": str(i), "feats": np.zeros((0, 4), np.float16),
                  "meta": {"words": w, "image": {"id": "-", "width": 1, "height": 1}, "phrases": [],
                           "regions": {"boxes": []}, "pairs": {}, "sentence_labels": {"t": "x"}}}
                 for i, w in enumerate(texts)])
    ids, mask = batch["input_ids"], batch["text_mask"]
    assert ids.shape[1] == 32 and batch["counts"]["texts_truncated"] == 1
    ref = tok([" ".join(w) for w in texts], padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert tok.convert_ids_to_tokens(ids[0, :3].tolist()) == ["<s>", "A", "Ġman"] and ids[1, -1] == tok.pad_token_id == 1
    assert ids[0, int(mask[0].sum()) - 1] == tok.convert_tokens_to_ids("</s>")
    out = bb(batch)
    hf = AutoModel.from_pretrained(roberta_dirs[name]).eval()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state  # positions from padding_idx + 1
    keep = mask.bool()
    torch.testing.assert_close(out.hidden["hidden.joint.2"][keep], want[keep], rtol=1e-4, atol=1e-4)


def test_a_tokenizer_whose_pieces_cross_spaces_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, processors, trainers
    from transformers import AutoTokenizer

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))  # no pre-tokenizer: merges run across spaces ("a m")
    bpe.train_from_iterator(["a man in a red t-shirt , who was n't there , rides 2 bikes past the café"] * 20,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    bpe.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    d = _fast(tmp_path / "cross", bpe, {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]",
                                         "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    msg = tokenisation_problem(types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(d)))
    assert msg and d in msg and "word by word" in msg and "cannot give each word its own token span" in msg
    for make in FAMILIES.values():
        good = AutoTokenizer.from_pretrained(make(tmp_path / make.__name__))
        assert tokenisation_problem(types.SimpleNamespace(tokenizer=good)) is None, make.__name__


@pytest.mark.parametrize("limit", [None, 8])
def test_words_with_no_pieces_are_skipped_not_taken_for_truncation(limit):
    """A lone zero-width space has no WordPiece pieces: a phrase that starts, ends or is interrupted by one keeps its
    span (in training and in the analyses alike), also in a truncated text; a phrase of such words alone has none."""
    from value_pl.analysis.pairs import AnalysisCollator
    from value_pl.backbones.common import load_tokenizer, minilm_path

    zw = "\u200b"
    words = [zw, "a", "man", zw, "in", "red", zw, zw, "rides", "a", "bike", "down", "the", "road"]
    enc = InputEncoder(load_tokenizer(minilm_path()), max_text_len=limit or 512)
    phrases = [[0, 3], [3, 6], [6, 8], [9, 11]]  # "(zw) a man", "(zw) in red", "zw zw", "a bike"
    meta = {"words": words, "image": {"id": "1", "width": 10, "height": 10},
            "phrases": [{"span": p, "label": "other"} for p in phrases], "regions": {"boxes": [[0, 0, 5, 5]]},
            "pairs": {"vcd": [[i, 0, "coref"] for i in range(len(phrases))]}}
    s = {"key": "k", "meta": meta, "feats": np.zeros((1, 4), np.float16)}
    b = Collator(enc, TaskSpec("vcd", "phrase_region", ["coref", "not_coref"]))([s])
    # [CLS] a man in red rides a bike ...: "bike" (token 7) is cut at 8 tokens ([CLS] + 6 + [SEP])
    want = [[1, 3], [3, 5]] + ([[6, 8]] if limit is None else [])
    assert b["a_span"].tolist() == want and b["counts"]["texts_truncated"] == (limit is not None)
    assert b["counts"]["phrases_dropped"] == 4 - len(want)
    a = AnalysisCollator(Collator(enc))([s])
    assert a["coref_phrase"].tolist() == want
    assert a["analysis_missing"].get("coref: phrase with no tokens") == 1
    assert a["analysis_missing"].get("coref: phrase truncated by max_text_len") == (None if limit is None else 1)
