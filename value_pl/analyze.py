"""Training-free analyses: ``python -m value_pl.analyze analysis=fusion backbone=... data=...``.

Thin entry point: Hydra composes ``configs/analyze.yaml``; the work is in :mod:`value_pl.analysis`.
``analysis=all`` runs fusion (Table 1), modality (Figs. 2/3a), i2t (Fig. 3b), coref (Tables 2/7,
Figs. 7/8), relation (Table 4, Figs. 9/10) and tsne (Fig. 6).
"""
import sys

import hydra
from omegaconf import DictConfig

from . import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="analyze")
def main(cfg: DictConfig) -> None:
    from .analysis import Unsupported
    from .data.options import refused_cleanly
    from .driver.analyze import analyze

    try:
        with refused_cleanly():
            analyze(cfg)
    except Unsupported as e:
        print(f"[value-pl] analysis={cfg.analysis.name} cannot run on backbone {cfg.backbone.get('name')}: {e}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
