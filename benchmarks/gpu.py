"""GPU benchmark (run through ``benchmarks/gpu.sh``): bf16 autocast, a UNITER-base-size model with random weights.

Samples/s and peak memory for: the bare sdpa forward, transformers' eager ``output_attentions=True`` forward (for
reference), online probe training (``layer_emb`` and ``attention``, all layers, one forward) and cached training
(heads fed from fp16 features copied host -> device). Prints one table. Synthetic in-memory batches: ~100 tokens
per sequence (24 text + 76 regions, with padding), 6 vrc pairs per image, 2048-d region features.

``--device cpu --layers 2 --hidden 64 --batch 4 --iters 2`` checks the script itself on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def synthetic_batch(B: int, T: int, R: int, dv: int, pairs: int, C: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tl = torch.randint(T // 2, T + 1, (B,), generator=g)
    rl = torch.randint(max(10, R // 2), R + 1, (B,), generator=g)
    ids = torch.randint(1000, 20000, (B, T), generator=g)
    tmask = (torch.arange(T)[None] < tl[:, None]).long()
    ids = ids * tmask
    special = torch.zeros(B, T, dtype=torch.long)
    special[:, 0] = 1
    special[torch.arange(B), tl - 1] = 1
    rmask = (torch.arange(R)[None] < rl[:, None]).long()
    pb, sa, sb = [], [], []
    for b in range(B):
        for _ in range(pairs):
            i, j = torch.randperm(int(rl[b]), generator=g)[:2].tolist()
            pb.append(b)
            sa.append((i, i + 1))
            sb.append((j, j + 1))
    w2t = torch.stack([torch.arange(1, T + 1), torch.arange(2, T + 2)], -1)[None].expand(B, T, 2).clone()
    batch = {
        "input_ids": ids, "text_mask": tmask, "special_mask": special, "word_to_token": w2t,
        "region_feats": torch.rand(B, R, dv, generator=g) * rmask[..., None],
        "region_boxes": torch.rand(B, R, 7, generator=g), "region_mask": rmask,
        "pair_b": torch.tensor(pb), "a_span": torch.tensor(sa), "b_span": torch.tensor(sb),
        "labels": torch.randint(0, C, (len(pb),), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build(layers: int, hidden: int, heads: int, tmp: Path, device):
    from value_pl.backbones.uniter import build_uniter

    cfg = {"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "intermediate_size": 4 * hidden, "max_position_embeddings": 512, "type_vocab_size": 2}
    p = tmp / "uniter.json"
    p.write_text(json.dumps(cfg))
    bb = build_uniter(OmegaConf.create({"name": "random-uniter", "pretrained": False, "config": str(p),
                                        "tokenizer": "minilm", "seed": 0}), img_dim=2048)
    return bb.to(device), cfg


def module_for(bb, prober: str, C: int, device):
    from value_pl.probers.module import ProbeModule

    m = ProbeModule(bb, task={"name": "vrc", "kind": "region_region", "labels": [str(i) for i in range(C)]},
                    prober={"name": prober}, seed=0)
    return m.to(device)


def measure(fn, iters: int, warmup: int, device) -> tuple[float, float]:
    """(seconds per call, peak memory in GiB during the calls; CPU: nan)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return dt, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device visible (torch.cuda.is_available() is False); "
              "use --device cpu with a small model to check the script", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(dev)
        mem = torch.cuda.get_device_properties(dev).total_memory / 2**30
        gpu = f"{name} ({mem:.0f} GiB)"
    else:
        gpu = "CPU (script check only)"
    B, T, R, C = args.batch, 24, 76, 16
    print(f"# value-pl GPU benchmark: {gpu}, torch {torch.__version__}, bf16 autocast")
    print(f"# model: random UNITER {args.layers} layers x {args.hidden} hidden x {args.heads} heads; batch {B} "
          f"images x {T + R} tokens, 6 vrc pairs per image; {args.iters} iterations after {args.warmup} warm-up")
    from value_pl.backbones.base import CaptureSpec

    rows = []
    with tempfile.TemporaryDirectory() as td:
        bb, cfg = build(args.layers, args.hidden, args.heads, Path(td), dev)
        batch = synthetic_batch(B, T, R, 2048, 6, C, dev)
        ac = dict(device_type=dev.type, dtype=torch.bfloat16)

        def bare():
            with torch.no_grad(), torch.autocast(**ac):
                bb(batch, CaptureSpec(hidden=[], attn=[], full_forward=True))

        rows.append(("bare sdpa forward", *measure(bare, args.iters, args.warmup, dev)))

        from transformers import BertConfig, BertModel

        ecfg = BertConfig(**cfg)
        ecfg._attn_implementation = "eager"
        eager = BertModel(ecfg, add_pooling_layer=False).eval().to(dev)
        x = torch.randn(B, T + R, args.hidden, device=dev)
        emask = torch.cat([batch["text_mask"], batch["region_mask"]], 1)

        def full():
            with torch.no_grad(), torch.autocast(**ac):
                eager(inputs_embeds=x, attention_mask=emask, output_attentions=True, output_hidden_states=True)

        rows.append(("eager forward, output_attentions=True (reference)", *measure(full, args.iters, args.warmup, dev)))
        eager = full = None  # free its weights before the next measurements
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        cached = {}
        for prober in ("layer_emb", "attention"):
            m = module_for(bb, prober, C, dev)
            opt = torch.optim.Adam(m.heads.parameters(), lr=1e-3)

            def step(m=m, opt=opt):
                with torch.autocast(**ac):
                    feats = m.extract(batch)
                    loss = sum(F.cross_entropy(v.float(), batch["labels"]) for v in m.logits(feats).values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            rows.append((f"online training, {prober} ({len(m.head_names)} heads)",
                         *measure(step, args.iters, args.warmup, dev)))
            if prober == "layer_emb":
                with torch.no_grad(), torch.autocast(**ac):
                    feats = m.extract(batch)
                pin = dev.type == "cuda"
                cached = {k: tuple((t.half().cpu().pin_memory() if pin else t.half().cpu()) for t in v)
                          for k, v in feats.items()}
                y = batch["labels"]

                def cstep(m=m, opt=opt):
                    f = {k: tuple(t.to(dev, non_blocking=True).float() for t in v) for k, v in cached.items()}
                    with torch.autocast(**ac):
                        loss = sum(F.cross_entropy(v.float(), y) for v in m.logits(f).values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                cache_rows = ("cached training, layer_emb (fp16 features, host -> device)",
                              *measure(cstep, args.iters, args.warmup, dev))
        rows.append(cache_rows)

    base = rows[0][1]
    print()
    print("| workload | samples/s | ms / batch | x bare forward | peak memory (GiB, incl. weights) |")
    print("|---|---:|---:|---:|---:|")
    for name, dt, peak in rows:
        print(f"| {name} | {B / dt:,.0f} | {1e3 * dt:.1f} | {dt / base:.2f} | {peak:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "batch": B, "rows": [
            {"workload": n, "samples_per_s": B / dt, "ms": 1e3 * dt, "peak_gib": p} for n, dt, p in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
