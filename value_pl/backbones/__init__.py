"""Frozen backbones. ``build_backbone(cfg)`` picks one by ``cfg.family``.

Every backbone returns a :class:`~value_pl.backbones.base.BackboneOutput`; see ``base.py`` for the
canonical activation names.
"""
from __future__ import annotations

from importlib import import_module

from .base import Backbone, BackboneOutput, LayerSpec, PairLayout, StreamInfo, model_config_record
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


def configured_model_config(cfg, img_dim: int | None = None) -> dict | None:
    """The model config a backbone built from ``cfg`` would have (:func:`~value_pl.backbones.base.model_config_record`
    of the family's ``model_config(cfg, img_dim)``, plus the dtype the config asks its weights in), read without
    building the model or loading weights; None for a registered family whose module has no ``model_config``."""
    family = cfg.get("family")
    if family not in REGISTRY:
        raise ValueError(f"unknown backbone family {family!r}; known: {', '.join(sorted(REGISTRY))}")
    fn = getattr(import_module(REGISTRY[family].split(":")[0]), "model_config", None)
    if fn is None:
        return None
    config = fn(cfg, img_dim=img_dim)
    return model_config_record(config, dtype=str(getattr(config, "dtype", None) or "default"))


__all__ = ["Backbone", "BackboneOutput", "CaptureSpec", "LayerSpec", "PairLayout", "StreamInfo",
           "build_backbone", "configured_model_config", "register", "REGISTRY"]
