"""Training-free analyses of a frozen backbone (VALUE Table 1, Figs. 2, 3, 6-10, Tables 2, 4, 7).

``python -m value_pl.analyze analysis=all`` (see the README section "Training-free analyses"). Each analysis reads only the
:class:`~value_pl.backbones.base.BackboneOutput` and keeps running sums (bounded memory).
"""
from .common import Analysis, Unsupported
from .kmeans import kmeans2, nmi_per_sample

__all__ = ["Analysis", "Unsupported", "kmeans2", "nmi_per_sample", "ANALYSES", "analyze"]


def __getattr__(name):  # lazy: the runner pulls in the data and logging stack
    if name in ("ANALYSES", "analyze"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
