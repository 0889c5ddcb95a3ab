"""Shared test set-up: W&B kept offline and out of ~, Hydra compose helpers, the demo shards."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True, scope="session")
def _offline_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("wandb")
    os.environ.update({
        "WANDB_MODE": "offline", "WANDB_DIR": str(d), "WANDB_CACHE_DIR": str(d / "cache"),
        "WANDB_CONFIG_DIR": str(d / "config"), "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    yield


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo shards: the committed ones when present, else freshly generated (same bytes)."""
    root = REPO / "shards" / "demo"
    if (root / "manifest.json").exists():
        return root
    from value_pl.datasets.demo import build_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    build_demo(out)
    return out


def compose(overrides: list[str], config_name: str = "train"):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return hcompose(config_name=config_name, overrides=overrides, return_hydra_config=False)


def run_cli(module: str, overrides: list[str], run_dir: Path, timeout: int = 600, env: dict | None = None):
    """Run ``python -m <module> <overrides> hydra.run.dir=<run_dir>``; return the CompletedProcess."""
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p
