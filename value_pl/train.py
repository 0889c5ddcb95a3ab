"""Train probers on a frozen backbone: ``python -m value_pl.train prober=layer_emb task=vrc``.

Thin entry point: Hydra composes ``configs/train.yaml``; the work is in :mod:`value_pl.driver.train`.
"""
import hydra
from omegaconf import DictConfig

from . import CONFIG_DIR
from .data.options import refused_cleanly
from .driver.train import train


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    with refused_cleanly():
        train(cfg)


if __name__ == "__main__":
    main()
