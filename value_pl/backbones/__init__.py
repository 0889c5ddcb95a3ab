"""Frozen backbones. ``build_backbone(cfg)`` picks one by ``cfg.family``.

Every backbone returns a :class:`~value_pl.backbones.base.BackboneOutput`; see ``base.py`` for the
canonical activation names.
"""
from __future__ import annotations

from importlib import import_module

from .base import Backbone, BackboneOutput, LayerSpec, PairLayout, StreamInfo
from .capture import CaptureSpec

#: family -> "module:builder"
REGISTRY = {
    "uniter": "value_pl.backbones.uniter:build_uniter",
    "lxmert": "value_pl.backbones.lxmert:build_lxmert",
    "bert": "value_pl.backbones.bert:build_bert",
    "visualbert": "value_pl.backbones.visualbert:build_visualbert",
}


def register(family: str, target: str) -> None:
    REGISTRY[family] = target


def build_backbone(cfg, img_dim: int | None = None) -> Backbone:
    family = cfg.get("family")
    if family not in REGISTRY:
        raise ValueError(f"unknown backbone family {family!r}; known: {', '.join(sorted(REGISTRY))}")
    mod, fn = REGISTRY[family].split(":")
    return getattr(import_module(mod), fn)(cfg, img_dim=img_dim)


__all__ = ["Backbone", "BackboneOutput", "CaptureSpec", "LayerSpec", "PairLayout", "StreamInfo",
           "build_backbone", "register", "REGISTRY"]
