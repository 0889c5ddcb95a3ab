"""Peak memory of building a backbone from a Lightning checkpoint: ``python benchmarks/ckpt_rss.py``.

Writes a checkpoint such as a UNITER-base pretraining run saves (``--layers`` x ``--hidden`` BERT encoder with
UNITER's image embedding under ``state_dict['encoder.*']``, plus Adam's ``exp_avg`` and ``exp_avg_sq`` for every
weight under ``optimizer_states``: about 3x the weights), then builds the backbone from it (what ``compare`` does
for each checkpoint) in fresh processes and reports each one's peak resident set (``VmHWM``, Linux):

* ``no checkpoint`` -- the same model, untrained twin: the floor (model + libraries);
* ``read whole``    -- ``torch.load(weights_only=True)`` without ``mmap`` (value-pl before it mapped files);
* ``mapped``        -- what value-pl does (``value_pl.backbones.common.load_state``: ``mmap=True``).

Prints a table and writes ``--json`` if given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
MODES = {"none": "no checkpoint", "whole": "read whole", "mapped": "mapped"}


def backbone_cfg(config: Path, ckpt: Path | None):
    from omegaconf import OmegaConf

    return OmegaConf.create({"family": "uniter", "config": str(config), "tokenizer": "minilm", "img_dim": 2048,
                             "pretrained": ckpt is not None, "checkpoint": str(ckpt) if ckpt else None})


def vm_hwm_mib() -> float:
    """This process's peak resident set (``VmHWM``, MiB). Not ``ru_maxrss``: on Linux that survives ``exec`` and
    starts a child at its parent's peak (here: the parent that wrote a 1.3 GB checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(mode: str, config: Path, ckpt: Path) -> dict:
    """In a fresh process: build the backbone and report peak RSS (MiB)."""
    import functools

    import value_pl.backbones.uniter as U
    from value_pl.backbones import build_backbone

    if mode == "whole":
        U.load_state = functools.partial(U.load_state, mmap=False)
    before = vm_hwm_mib()
    t0 = time.perf_counter()
    bb = build_backbone(backbone_cfg(config, None if mode == "none" else ckpt))
    sec = time.perf_counter() - t0
    peak = vm_hwm_mib()
    return {"mode": mode, "peak_rss_mib": round(peak, 1), "rss_before_build_mib": round(before, 1),
            "seconds": round(sec, 2), "params": sum(p.numel() for p in bb.parameters())}


def write_checkpoint(d: Path, layers: int, hidden: int) -> tuple[Path, Path, dict]:
    import torch

    from value_pl.backbones import build_backbone

    config = d / "config.json"
    config.write_text(json.dumps({"vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
                                  "num_attention_heads": max(1, hidden // 64), "intermediate_size": 4 * hidden,
                                  "max_position_embeddings": 512, "type_vocab_size": 2}))
    bb = build_backbone(backbone_cfg(config, None))
    sd = {f"encoder.{k}": v for k, v in bb.state_dict().items()}
    del bb
    state = {i: {"step": torch.tensor(1000.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
             for i, v in enumerate(sd.values()) if v.is_floating_point()}
    ck = d / "epoch=3-step=1000.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": sd,
                "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-4, "params": list(state)}]}],
                "lr_schedulers": [], "loops": {}, "callbacks": {}}, ck)
    weights = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
    return config, ck, {"file_mib": round(ck.stat().st_size / 2**20, 1), "weights_mib": round(weights, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode (the min peak is reported)")
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "CONFIG", "CKPT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="ckpt_rss_") as tmp:
        config, ck, sizes = write_checkpoint(Path(tmp), a.layers, a.hidden)
        rows = {}
        for mode in MODES:
            runs = []
            for _ in range(a.repeat):
                p = subprocess.run([sys.executable, __file__, "--child", mode, str(config), str(ck)], env=env,
                                   capture_output=True, text=True, check=True)
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            rows[mode] = min(runs, key=lambda r: r["peak_rss_mib"])
    floor = rows["none"]["peak_rss_mib"]
    print(f"checkpoint: {a.layers} x {a.hidden} UNITER encoder + Adam moments, {sizes['file_mib']} MiB on disk "
          f"({sizes['weights_mib']} MiB of weights)\n")
    print("| build from | peak RSS (MiB) | over the untrained build (MiB) | seconds |\n|---|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {MODES[mode]} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - floor:.0f} | {r['seconds']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"sizes": sizes, "rows": rows, "layers": a.layers, "hidden": a.hidden},
                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
