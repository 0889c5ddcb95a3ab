"""Tiny backbones and a tiny SentEval-style shard set for the tests/test_tasks_*.py files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from helpers_backbones import VOCAB, tiny_tokenizer

SENT_TASKS = ("sentlen", "treedepth", "topconst", "bshift", "tense", "subjnum", "objnum", "somo", "coordinv",
              "wordcontent", "oddmanout")
DV = 64  # the demo shards' feature dim
#: small batches, no shuffle buffer: fast data for fast_dev_run
FAST_DATA = ["data.batch_size=8", "data.eval_batch_size=8", "data.shuffle_buffer=1", "data.num_workers=0"]


def one_thread():
    """Context for in-process runs: one torch thread (2 shared cores; oversubscription is 4x slower)."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def ctx():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return ctx()


def tiny_backbones(d: Path) -> dict[str, list[str]]:
    """Overrides for a tiny random single-stream (UNITER), two-stream (LXMERT) and text-only (BERT) model."""
    d = Path(d)
    tok = tiny_tokenizer(d / "tok")
    (d / "uniter.json").write_text(json.dumps(dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64,
                                                   max_position_embeddings=128)))
    (d / "lxmert.json").write_text(json.dumps(dict(vocab_size=len(VOCAB), hidden_size=32, num_attention_heads=4,
                                                   intermediate_size=64, l_layers=2, r_layers=1, x_layers=2,
                                                   visual_feat_dim=DV, visual_pos_dim=4, max_position_embeddings=128,
                                                   num_qa_labels=3, num_object_labels=5, num_attr_labels=4)))
    bert = d / "bert"
    bert.mkdir(exist_ok=True)
    from transformers import BertConfig

    BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=128).save_pretrained(str(bert))
    tiny_tokenizer(bert)
    common = ["backbone.pretrained=false", f"backbone.tokenizer={tok}"]
    return {
        "SS": ["backbone=minilm_uniter", "backbone.path=null", f"backbone.config={d / 'uniter.json'}", *common],
        "TS": ["backbone=lxmert_untrained", f"backbone.config={d / 'lxmert.json'}", "backbone.img_dim=null",
               "backbone.max_text_len=32", *common],
        "BERT": ["backbone=bert", f"backbone.path={bert}", "backbone.pretrained=false"],
    }


WORDS = "a man dog rides runs the street on near grass woman holds ball hat two young guys with red shirt".split()


def sentence_shards(root: Path, n=(96, 48, 48), seed: int = 0) -> Path:
    """Text-only samples with every sentence task's label; 'sentlen' = a planted length bin."""
    from value_pl.data.schema import SCHEMA_VERSION
    from value_pl.datasets.writer import ShardSetWriter

    rng = np.random.default_rng(seed)
    w = ShardSetWriter(root, "tiny_senteval", feature_dim=DV, maxcount=64)
    for split, count in zip(("train", "val", "test"), n):
        def gen():
            for i in range(count):
                L = int(rng.integers(3, 13))
                words = [str(x) for x in rng.choice(WORDS, L)]
                labels = {t: str(int(rng.integers(0, 2))) for t in SENT_TASKS}
                labels["sentlen"] = str((L - 3) // 3)  # 4 bins, planted
                meta = {"schema": SCHEMA_VERSION, "image": {"id": "none", "width": 1, "height": 1}, "words": words,
                        "phrases": [], "regions": {"boxes": [], "chains": [], "source": [], "names": []}, "pairs": {},
                        "sentence_labels": labels, "provenance": {"dataset": "tiny"}}
                yield f"{split}_{i:05d}", meta, np.zeros((0, DV), np.float16)
        w.write_split(split, gen())
    w.close()
    return root
