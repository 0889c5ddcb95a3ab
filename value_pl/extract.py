"""Feature cache: ``python -m value_pl.extract task=vrc prober=layer_emb data.root=SHARDS cache.root=CACHE``.

Thin entry point: Hydra composes ``configs/extract.yaml`` (the train config plus ``cache.*``); the work is in
:mod:`value_pl.driver.extract`. Train from the cache with ``python -m value_pl.train ... data.cache=CACHE``.
"""
import hydra
from omegaconf import DictConfig

from . import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="extract")
def main(cfg: DictConfig) -> None:
    from .data.options import refused_cleanly
    from .driver.extract import extract_cache

    with refused_cleanly():
        extract_cache(cfg)


if __name__ == "__main__":
    main()
