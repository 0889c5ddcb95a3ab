"""Tiny offline fixtures for the backbone tests: tokenizer dirs, fake samples, batches, row requests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from value_pl.backbones.base import REGION, TEXT

WORDS = ("a man in the red shirt rides bike on street dog runs near two young guys with hat grass "
         "woman holds ball").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + ["##s", "##ing", "big"]

SENTENCES = [
    "A man in the red shirt rides a bike on the street".split(),
    "Two young guys with hats".split(),
    "A dog runs near the grass".split(),
]


def tiny_tokenizer(d: Path) -> str:
    """A BERT word-piece tokenizer over :data:`VOCAB`, saved to ``d`` (offline)."""
    from transformers import BertTokenizer

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(str(d))
    return str(d)


def fake_samples(n_regions=(5, 3, 0), dv: int = 16, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (words, n) in enumerate(zip(SENTENCES, n_regions)):
        boxes = []
        for _ in range(n):
            x1, y1 = rng.uniform(0, 200, 2)
            boxes.append([float(x1), float(y1), float(x1 + rng.uniform(10, 100)), float(y1 + rng.uniform(10, 100))])
        out.append({
            "key": f"s{i}",
            "meta": {"words": list(words), "image": {"id": str(i), "width": 320, "height": 240},
                     "regions": {"boxes": boxes}, "phrases": [], "pairs": {}},
            "feats": rng.normal(size=(n, dv)).astype(np.float16),
        })
    return out


def make_batch(backbone, n_regions=(5, 3, 0), dv: int = 16, seed: int = 0) -> dict:
    return backbone.collator()(fake_samples(n_regions, dv, seed))


def row_request(batch: dict) -> dict:
    """Rows per modality: [CLS] and token 2 of each text; regions 0 and the last real one (-1 padded)."""
    B, T = batch["input_ids"].shape
    text = torch.tensor([[0, 2]] * B)
    nreg = batch["region_mask"].sum(1)
    region = torch.full((B, 2), -1, dtype=torch.long)
    for b in range(B):
        if nreg[b] > 0:
            region[b, 0] = 0
        if nreg[b] > 1:
            region[b, 1] = int(nreg[b]) - 1
    return {TEXT: text, REGION: region}


def check_rows_sum_to_one(out, tol: float = 1e-5) -> int:
    """Every captured (non-padding) attention row sums to 1; returns how many maps were checked."""
    n = 0
    for name, a in out.attn.items():
        q_stream, _ = out.attn_streams[name]
        s = a.sum(-1)  # (B, H, Nq)
        if q_stream in out.rows:
            valid = (out.rows[q_stream] >= 0)[:, None, :].expand_as(s)
        else:
            valid = torch.ones_like(s, dtype=torch.bool)
        if a.shape[-1] == 0:
            continue
        assert torch.allclose(s[valid], torch.ones_like(s[valid]), atol=tol), name
        assert torch.all(s[~valid] == 0), name
        n += 1
    return n


def gather_rows(full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, N, K) full map, (B, R) positions (-1 pad) -> (B, H, R, K) with zero padding rows."""
    B, H, N, K = full.shape
    idx = rows.clamp(min=0)[:, None, :, None].expand(B, H, rows.shape[1], K)
    g = torch.gather(full, 2, idx)
    return g * (rows >= 0)[:, None, :, None].to(g.dtype)


def write_json(path: Path, d: dict) -> str:
    Path(path).write_text(json.dumps(d))
    return str(path)


def fast_dev_run(tmp_path: Path, demo_root, overrides: list[str]) -> dict:
    """One in-process ``value_pl.train`` fast_dev_run on the demo shards; returns results.json as a dict."""
    from conftest import compose
    from value_pl.driver.train import train

    run = Path(tmp_path) / "run"
    cfg = compose([f"data.root={demo_root}", "logger=none", "trainer.enable_progress_bar=false",
                   "++trainer.fast_dev_run=true", "data.batch_size=8", "data.eval_batch_size=8",
                   f"run_dir={run}", *overrides])
    train(cfg)
    return json.loads((run / "results.json").read_text())
