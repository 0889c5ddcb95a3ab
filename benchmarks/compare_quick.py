"""Seconds per checkpoint of ``python -m value_pl.compare ... suite=quick``: ``python benchmarks/compare_quick.py``.

Runs the real driver (:func:`value_pl.compare.compare`) on the embedded default backbone (MiniLM-UNITER:
6 layers, 384 hidden, 12 heads; ``backbone=minilm_uniter``) with the demo shards, over ``--n`` checkpoints
(copies of the packaged MiniLM directory with one weight perturbed each, so that every one is a distinct
checkpoint), then runs it again to time the cache hits. Reports per checkpoint: backbone build, suite,
total; the suite's frozen forwards; the cached re-run. Writes ``--json`` if given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads){dev}"


def make_checkpoints(root: Path, n: int) -> list[Path]:
    """n HF directories: the packaged MiniLM with the [CLS] word embedding nudged by i (distinct checksums)."""
    from safetensors.torch import load_file, save_file

    from value_pl.backbones.common import resolve_path

    src = Path(resolve_path("minilm"))
    out = []
    for i in range(n):
        d = root / f"minilm_step{(i + 1) * 1000}"
        shutil.copytree(src, d)
        st = d / "model.safetensors"
        if st.exists():
            sd = load_file(str(st))
            k = next(k for k in sd if k.endswith("word_embeddings.weight"))
            sd[k] = sd[k].clone()
            sd[k][101] += 0.01 * (i + 1)
            save_file(sd, str(st))
        out.append(d)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2, help="checkpoints to measure")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from conftest import compose

    from value_pl.compare import compare

    tmp = Path(tempfile.mkdtemp(prefix="compare_bench_"))
    try:
        make_checkpoints(tmp / "ckpts", a.n)
        over = [f"checkpoints={tmp / 'ckpts'}/*", "backbone=minilm_uniter", f"suite={a.suite}", "logger=none",
                f"out={tmp / 'run'}", f"device={a.device}", f"data.root={REPO / 'shards' / 'demo'}"]
        load0 = os.getloadavg()[0]
        t0 = time.time()
        res = compare(compose(over, "compare"))
        first = time.time() - t0
        t1 = time.time()
        res2 = compare(compose(over, "compare"))
        cached = time.time() - t1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = res["rows"]
    per = [r["seconds"]["total"] for r in rows]
    out = {
        "machine": machine(), "device": a.device, "suite": res["suite"], "checkpoints": len(rows),
        "seconds_per_checkpoint": {"median": round(statistics.median(per), 2), "each": per,
                                   "build": [r["seconds"]["build"] for r in rows],
                                   "suite": [r["seconds"]["suite"] for r in rows]},
        "forwards_per_checkpoint": rows[0]["forwards"],
        "first_run_seconds": round(first, 2), "cached_rerun_seconds": round(cached, 2),
        "cached_rows": sum(not r["computed"] for r in res2["rows"]),
        # other processes on the machine slow everything down: report the 1-minute load average
        "load_average": {"before": round(load0, 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(out, indent=1))
    print(f"\nsuite={a.suite} on MiniLM-UNITER + demo shards: {out['seconds_per_checkpoint']['median']:.1f} s per "
          f"checkpoint (median of {len(rows)}; {out['machine']}; load average {out['load_average']}); cached re-run of all: {out['cached_rerun_seconds']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
