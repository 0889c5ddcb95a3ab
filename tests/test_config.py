from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONFIGS, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def test_default_composes():
    cfg = compose(["prober=layer_emb", "task=vrc"])
    assert cfg.backbone.family == "uniter" and cfg.backbone.path == "minilm"
    assert cfg.prober.name == "layer_emb" and cfg.task.name == "vrc"
    assert cfg.data.root == "shards/demo"
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("group", ["backbone", "prober", "task", "data", "trainer", "logger"])
def test_every_group_option_composes(group):
    for p in sorted((CONFIGS / group).glob("*.yaml")):
        cfg = compose([f"{group}={p.stem}"])
        assert cfg[group] is not None, p


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_experiment_composes(exp):
    cfg = compose([f"experiment={exp}"])
    OmegaConf.to_container(cfg, resolve=False)
    assert cfg.task.name


def test_eval_config_composes():
    cfg = compose(["ckpt_path=/x/last.ckpt"], config_name="eval")
    assert cfg.ckpt_path == "/x/last.ckpt" and cfg.logger.name == "none"


def test_config_tree_mirrors_package():
    pkg = Path(__file__).resolve().parents[1] / "value_pl"
    for group, sub in {"backbone": "backbones", "prober": "probers", "data": "data"}.items():
        assert (CONFIGS / group).is_dir() and (pkg / sub).is_dir()
