from .heads import AttentionProber, LayerEmbProber, SentenceProber

__all__ = ["AttentionProber", "LayerEmbProber", "SentenceProber"]
