"""Prober heads (VALUE Eq. 3 and 4, SentEval's classifier), the features that feed them, and the LightningModule."""
from .heads import AttentionProber, LayerEmbProber, SentenceProber

__all__ = ["AttentionProber", "LayerEmbProber", "SentenceProber"]
