"""Compare checkpoints during pretraining:
``python -m value_pl.compare checkpoints='ckpts/*.pt' backbone=uniter backbone.config=... suite=quick``.

Thin entry point: Hydra composes ``configs/compare.yaml``; the work is in :mod:`value_pl.compare.driver`
(checkpoint discovery, cache, outputs) and :mod:`value_pl.compare.suite` (the probe suite). See docs/compare.md.
"""
import hydra
from omegaconf import DictConfig

from .. import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    from ..data.options import refused_cleanly
    from . import compare

    with refused_cleanly():
        compare(cfg)


if __name__ == "__main__":
    main()
