"""Evaluate a saved prober: ``python -m value_pl.eval ckpt_path=RUN/checkpoints/last.ckpt``.

Same config groups as ``train``; backbone, task and prober come from the checkpoint unless
``use_checkpoint_config=false``. Writes ``results.json``/``results.md`` into the run dir.
"""
import hydra
from omegaconf import DictConfig

from . import CONFIG_DIR
from .data.options import refused_cleanly
from .driver.train import evaluate


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    with refused_cleanly():
        evaluate(cfg)


if __name__ == "__main__":
    main()
