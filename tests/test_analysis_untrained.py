"""Appendix B: an untrained single-stream model keeps the modalities apart (NMI ~0.99 at every layer)."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from transformers import BertConfig

from value_pl.analysis.fusion import Fusion
from value_pl.backbones.common import load_tokenizer, resolve_path, seeded_init
from value_pl.backbones.uniter import UniterBackbone

WORDS = "a man in a red shirt rides a bike down the street while two dogs run next to him on the grass".split()


def realistic_samples(n=6, regions=36, dv=2048, seed=0):
    """Bottom-up-attention-like region features: non-negative, sparse (ReLU outputs), mean ~0.3, max ~8."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        feats = np.maximum(rng.normal(-0.6, 1.5, size=(regions, dv)) * rng.gamma(2.0, 0.5, size=(regions, 1)), 0)
        x1, y1 = rng.uniform(0, 400, (2, regions))
        boxes = np.stack([x1, y1, x1 + rng.uniform(20, 200, regions), y1 + rng.uniform(20, 200, regions)], 1)
        words = WORDS[: int(rng.integers(8, len(WORDS)))]
        out.append({"key": f"u{i}", "feats": feats.astype(np.float16),
                    "meta": {"words": words, "image": {"width": 640, "height": 480},
                             "regions": {"boxes": boxes.tolist()}, "phrases": [], "pairs": {}}})
    return out


@pytest.mark.slow
def test_untrained_bert_base_width_single_stream_nmi():
    # what build_uniter does for backbone.pretrained=false (minus the weights checksum, slow on 2 cores)
    config = BertConfig()  # bert-base sizes: 12 layers, 768 hidden, 12 heads
    bb = UniterBackbone(config, 2048, load_tokenizer(resolve_path("minilm")))
    seeded_init(bb, config.initializer_range, seed=0)
    bb.freeze()
    assert bb.hidden_size == 768 and bb.num_layers == 12
    samples = realistic_samples()
    f = np.stack([s["feats"] for s in samples]).astype(np.float32)
    assert 0.2 < f.mean() < 0.6 and f.max() > 5 and (f == 0).mean() > 0.5  # realistic scale
    batch = bb.collator()(samples)
    an = Fusion(bb, OmegaConf.create({"seed": 0}))
    an.update(bb(batch, an.capture(batch)), batch)
    res = an.result()
    nmi = [r["nmi"] for r in res["layers"]]
    assert [r["layer"] for r in res["layers"]] == list(range(13)) and res["samples"] == len(samples)
    print("NMI per layer:", [round(x, 3) for x in nmi])
    assert min(nmi) >= 0.95, nmi
