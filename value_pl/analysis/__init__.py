"""Training-free analyses of a frozen backbone (VALUE Table 1, Figs. 2, 3, 6-10, Tables 2, 4, 7).

``python -m value_pl.analyze analysis=all`` (see docs/analyses.md); the driver is :mod:`value_pl.driver.analyze`. Each analysis reads only the
:class:`~value_pl.backbones.base.BackboneOutput` and keeps running sums (bounded memory).
"""
from .common import Analysis, Unsupported
from .fusion import TSNE, Fusion
from .kmeans import kmeans2, nmi_per_sample
from .maxattn import Coref, Relation
from .modality import ImageToText, ModalityImportance

ANALYSES = {"fusion": Fusion, "modality": ModalityImportance, "i2t": ImageToText, "coref": Coref,
            "relation": Relation, "tsne": TSNE}
#: which analyses the collator's missing-pair counts belong to
MISSING_PREFIX = {"coref": "coref", "relation": "relation"}

__all__ = ["Analysis", "Unsupported", "kmeans2", "nmi_per_sample", "ANALYSES", "MISSING_PREFIX"]
