"""VisualBERT (single-stream) through transformers' ``VisualBertModel``, with our own layer loop for capture.

* Module tree: ``self.visual_bert`` is a ``VisualBertModel``, so keys are ``visual_bert.*`` -- exactly the
  names in an HF ``VisualBertForPreTraining`` / ``...ForQuestionAnswering`` directory (e.g. the
  ``uclanlp/visualbert-*`` releases); a bare ``VisualBertModel`` directory (``embeddings.*``) loads too.
  Heads (``cls.*``, ``cls_head`` ...) are ignored and reported.
* Sequence (stream ``joint``): ``[CLS] tokens [SEP] <pad>`` (token type 0, positions 0..T-1) followed by the
  regions: ``visual_projection(feat) + visual_token_type_embeddings(1) + visual_position_embeddings(0)``,
  one LayerNorm over the whole sequence. Text at 0, regions at ``T``.
* Boxes: VisualBERT has **no box input**. The collator still encodes boxes (``xyxy4``) so that batches look
  the same for every backbone; ``forward`` ignores them.
* Region features must have ``visual_embedding_dim`` dimensions (2048 for the COCO releases, 512/1024 for
  others); for the untrained twin the dimension follows the data.
* ``bypass_transformer=True`` configurations (VCR releases) are not supported: the text-only encoder
  followed by an extra layer has no per-layer joint stream.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from transformers import VisualBertConfig, VisualBertModel

from .base import BackboneOutput, SingleStreamBackbone, StreamInfo
from .capture import CaptureSpec, rows_for_stream
from .common import (bert_stack, finish, hf_state, load_into, load_state, load_tokenizer, read_hf_config,
                     rename_gamma_beta, resolve_path, seeded_init, sources, unwrap_checkpoint)

log = logging.getLogger(__name__)


class VisualBertBackbone(SingleStreamBackbone):
    family = "visualbert"
    box_mode = "xyxy4"  # encoded by the collator, unused by the model
    feature_field = "visual_embedding_dim"
    image_weights: str | None = None  # the file/directory visual_projection was loaded from (checks.py)

    def __init__(self, config: VisualBertConfig, tokenizer=None, max_text_len: int | None = None, max_regions: int = 100):
        super().__init__(tokenizer, max_text_len, max_regions)
        if getattr(config, "bypass_transformer", False):
            raise ValueError("VisualBERT with bypass_transformer=True has no joint per-layer stream; not supported")
        self.config = config
        self.visual_bert = VisualBertModel(config)

    @property
    def img_dim(self) -> int:
        return self.config.visual_embedding_dim

    def text_embeddings(self):
        return self.visual_bert.embeddings

    def forward(self, batch: dict, capture: CaptureSpec | None = None) -> BackboneOutput:
        capture = capture or CaptureSpec()
        vb = self.visual_bert
        ids, tmask = batch["input_ids"], batch["text_mask"]
        feats, rmask = batch["region_feats"], batch["region_mask"]
        B, T = ids.shape
        R = feats.shape[1]
        if R > 0 and feats.shape[-1] != self.config.visual_embedding_dim:
            raise ValueError(f"VisualBERT expects {self.config.visual_embedding_dim}-d region features "
                             f"(visual_embedding_dim), got {feats.shape[-1]}")
        dtype = vb.embeddings.word_embeddings.weight.dtype
        vtype = torch.ones(B, R, dtype=torch.long, device=ids.device) if R > 0 else None
        h = vb.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids),
                          visual_embeds=feats.to(dtype) if R > 0 else None, visual_token_type_ids=vtype)
        mask = torch.cat([tmask, rmask], 1) if R > 0 else tmask
        info = StreamInfo(length=T + R, text_offset=0, region_offset=T if R > 0 else None)
        rows = rows_for_stream(capture.rows, info)
        hidden: dict[str, Tensor] = {}
        attn: dict[str, Tensor] = {}
        if capture.wants_hidden("hidden.joint.0"):
            hidden["hidden.joint.0"] = h
        bert_stack(vb.encoder.layer, h, mask, "joint", 1, capture, rows, hidden, attn, self.num_heads, stop_early=True)
        return BackboneOutput(
            hidden=hidden, attn=attn, streams={"joint": info}, attn_streams={n: ("joint", "joint") for n in attn},
            text_mask=tmask, region_mask=rmask, word_to_token=batch["word_to_token"],
            special_mask=batch["special_mask"], rows={"joint": rows} if rows is not None else {},
            layer_names={"joint": self.hidden_names()},
        )


def visualbert_config(path: str | None, config: str | None) -> VisualBertConfig:
    cfg = read_hf_config(VisualBertConfig, path, config, "VisualBERT")
    if cfg is not None:
        return cfg
    return VisualBertConfig(visual_embedding_dim=2048)


def map_visualbert_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in rename_gamma_beta(sd).items():
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "visual_bert." + k
        out[k] = v
    return out


def model_config(cfg, img_dim: int | None = None) -> VisualBertConfig:
    """The HF config :func:`build_visualbert` builds the model from: ``backbone.config`` > ``path`` > defaults,
    the feature width (``img_dim`` configured, else the weights', else the data's) and the attention
    implementation; reads no weights."""
    path, ckpt = resolve_path(cfg.get("path")), resolve_path(cfg.get("checkpoint"))
    config = visualbert_config(path, resolve_path(cfg.get("config")))
    want_dim = cfg.get("img_dim") or (None if (cfg.get("pretrained", True) and (path or ckpt)) else img_dim)
    if want_dim:
        config.visual_embedding_dim = int(want_dim)
    config._attn_implementation = "eager"
    return config


def build_visualbert(cfg, img_dim: int | None = None) -> VisualBertBackbone:
    src = sources(cfg, "visualbert", "FILE")
    path, ckpt, pretrained = src.path, src.checkpoint, src.pretrained
    config = model_config(cfg, img_dim)
    m = VisualBertBackbone(config, load_tokenizer(src.tokenizer), cfg.get("max_text_len"),
                           int(cfg.get("max_regions", 100)))
    seed = int(cfg.get("seed", 0))
    seeded_init(m, config.initializer_range, seed)
    report: dict = {}
    source = f"random init (untrained twin, seed {seed})"
    required = ("visual_bert.embeddings.", "visual_bert.encoder.")
    if pretrained and (ckpt or path):
        sd = (unwrap_checkpoint(load_state(ckpt), ("visual_bert.embeddings.word_embeddings.weight",
                                                    "embeddings.word_embeddings.weight"), ckpt,
                                cfg.get("checkpoint_prefix")) if ckpt else hf_state(path))
        report = load_into(m, map_visualbert_keys(sd), ckpt or path, required)
        del sd  # copied into the model: the file's mapping goes now, not after the checksum
        source = f"VisualBERT weights from {ckpt or path}"
        m.image_weights = ckpt or path
    return finish(m, cfg, src, seed, source, report, img_dim=config.visual_embedding_dim,
                  layers=config.num_hidden_layers)
