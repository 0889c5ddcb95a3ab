"""Build shard sets from the public datasets: ``python -m value_pl.datasets.build dataset=<name> ...``.

Hydra (``configs/build.yaml`` + ``configs/dataset/<name>.yaml``), the same CLI style as ``train``::

    python -m value_pl.datasets.build dataset=flickr30k dataset.root=/data/flickr30k_entities \\
        dataset.features=/data/flickr30k_butd.tsv out=shards/flickr30k
    python -m value_pl.datasets.build dataset=vg dataset.region_graphs=/data/vg/region_graphs.json \\
        dataset.image_data=/data/vg/image_data.json dataset.features=/data/vg_butd.tsv out=shards/vg
    python -m value_pl.datasets.build dataset=vg_mismatch ...same as vg... out=shards/vg_mismatch
    python -m value_pl.datasets.build dataset=senteval dataset.dir=/data/SentEval/data/probing out=shards/senteval
    python -m value_pl.datasets.build dataset=senteval_derived dataset.captions=/data/captions.txt \\
        out=shards/senteval_derived

Each writes ``<out>/<split>-NNNNNN.tar`` + ``manifest.json`` atomically (``<out>.partial`` renamed at
the end) and prints a short report. SentEval builds one shard set per task under ``<out>/<task>``.
"""
from __future__ import annotations

from pathlib import Path

from .. import CONFIG_DIR
from .common import BuildError


def check_build(c: dict) -> None:
    """The build config's numbers in their ranges (:class:`~value_pl.data.options.OptionError` naming the key)."""
    from ..data.options import OptionError, choice, flag, number, numbers, value
    from .flickr30k import VCD_NEGATIVES
    from .regions import FORMATS

    number(c, "feature_dim", 1, integer=True)
    number(c, "maxcount", 1, integer=True)
    number(c, "maxsize", 1)
    number(c, "seed", 0, integer=True)
    for k in ("strict", "progress", "hash_inputs"):
        flag(c, k)
    for k in ("supplied_iou", "iou_threshold"):
        number(c, f"dataset.{k}", 0, 1, lo_open=True)
    for k in ("max_regions", "top_k", "max_pairs_per_predicate", "max_same_predicate_per_caption"):
        number(c, f"dataset.{k}", 1, integer=True)
    for k in ("features_format", "annotated_features_format"):
        choice(c, f"dataset.{k}", ("auto",) + tuple(FORMATS))
    choice(c, "dataset.variant", ("normal", "mismatch"))
    choice(c, "dataset.vcd_negatives", VCD_NEGATIVES)
    number(c, "dataset.uniter.conf_th", 0, 1)
    number(c, "dataset.uniter.min_bb", 1, integer=True)
    number(c, "dataset.uniter.max_bb", 1, integer=True)
    lo, hi = value(c, "dataset.uniter.min_bb", None), value(c, "dataset.uniter.max_bb", None)
    if lo is not None and hi is not None and lo > hi:
        raise OptionError(f"dataset.uniter.min_bb={lo} > dataset.uniter.max_bb={hi}")
    fr = value(c, "dataset.splits", None)
    if isinstance(fr, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fr.values()):
        if any(v < 0 for v in fr.values()) or sum(fr.values()) <= 0:
            raise OptionError(f"dataset.splits={fr}: fractions must be >= 0 with a positive sum (they are normalised)")
    numbers(c, "dataset.sentlen_bins", 0, integer=True)
    bins = value(c, "dataset.sentlen_bins", None)
    if bins and any(a >= b for a, b in zip(bins, bins[1:])):
        raise OptionError(f"dataset.sentlen_bins={bins}: the bin edges must increase")


def run_build(cfg) -> dict | list[dict]:
    """Dispatch on ``cfg.dataset.builder``; returns the manifest (a list of them for SentEval)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    check_build(c)
    builder = c["dataset"]["builder"]
    if builder == "flickr30k":
        from .flickr30k import build_flickr30k as fn
    elif builder == "vg":
        from .visual_genome import build_vg as fn
    elif builder == "senteval":
        from .senteval import build_senteval as fn
    elif builder == "senteval_derived":
        from .senteval import build_senteval_derived as fn
    else:
        raise BuildError(f"unknown dataset builder {builder!r} (flickr30k, vg, senteval, senteval_derived)")
    return fn(c["dataset"], out=c["out"], seed=c["seed"], maxcount=c["maxcount"], maxsize=c["maxsize"],
              feature_dim=c["feature_dim"], strict=c["strict"], progress_bar=c["progress"],
              hash_inputs=c["hash_inputs"])


def _main():
    import hydra
    from omegaconf import DictConfig

    from ..data.options import refused_cleanly
    from .writer import report

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="build")
    def main(cfg: DictConfig) -> None:
        with refused_cleanly():
            mans = run_build(cfg)
        for man in mans if isinstance(mans, list) else [mans]:
            print(report(man))
        print(f"shards written under {Path(cfg.out).resolve()}")

    main()


if __name__ == "__main__":
    _main()
