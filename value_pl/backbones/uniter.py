"""UNITER (single-stream), as released in ChenRocks/UNITER, built from transformers' BERT layers.

Module tree = checkpoint keys: ``uniter.embeddings.*``, ``uniter.img_embeddings.{img_linear,
img_layer_norm, pos_linear, pos_layer_norm, LayerNorm, mask_embedding}.*``, ``uniter.encoder.layer.N.*``,
``uniter.pooler.*``.

* text: word + position + token type (0) embeddings, LayerNorm;
* image: LayerNorm(img_linear(feat)) + LayerNorm(pos_linear(box7)) + token_type_embeddings(1), LayerNorm;
* sequence ``[CLS] words [SEP]`` then the regions (stream ``joint``: text at 0, regions at ``T``);
* 7-d box: x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h.

Sources of weights (``configs/backbone/uniter.yaml``): ``checkpoint`` (``uniter-base.pt``), or ``path``
(an HF BERT directory whose encoder initialises the text side, e.g. ``minilm`` -- the embedded default),
or nothing / ``pretrained=false`` (random, seeded).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer, BertPooler

from .base import BackboneOutput, SingleStreamBackbone, StreamInfo
from .capture import CaptureSpec, rows_for_stream
from .common import (bert_stack, finish, hf_state, load_into, load_state, load_tokenizer, rename_gamma_beta,
                     resolve_path, seeded_init, sources, unwrap_checkpoint)

log = logging.getLogger(__name__)


class UniterTextEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        tt = torch.zeros_like(input_ids)
        e = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(tt)
        return self.dropout(self.LayerNorm(e))


class UniterImageEmbeddings(nn.Module):
    def __init__(self, c: BertConfig, img_dim: int):
        super().__init__()
        self.img_linear = nn.Linear(img_dim, c.hidden_size)
        self.img_layer_norm = nn.LayerNorm(c.hidden_size, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(c.hidden_size, eps=1e-12)
        self.pos_linear = nn.Linear(7, c.hidden_size)
        self.mask_embedding = nn.Embedding(2, img_dim, padding_idx=0)  # pretraining only
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, feats: Tensor, boxes: Tensor, type_embeddings: Tensor) -> Tensor:
        im = self.img_layer_norm(self.img_linear(feats))
        pos = self.pos_layer_norm(self.pos_linear(boxes))
        return self.dropout(self.LayerNorm(im + pos + type_embeddings))


class UniterEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c, layer_idx=i) for i in range(c.num_hidden_layers)])


class UniterModel(nn.Module):
    def __init__(self, c: BertConfig, img_dim: int):
        super().__init__()
        self.embeddings = UniterTextEmbeddings(c)
        self.img_embeddings = UniterImageEmbeddings(c, img_dim)
        self.encoder = UniterEncoder(c)
        self.pooler = BertPooler(c)


class UniterBackbone(SingleStreamBackbone):
    family = "uniter"
    box_mode = "uniter7"
    feature_field = "img_dim"
    box_input_field = "pos_linear in_features"
    image_weights: str | None = None  # the file the image embedding was loaded from (checks.py)

    def __init__(self, config: BertConfig, img_dim: int, tokenizer=None, max_text_len: int | None = None,
                 max_regions: int = 100):
        super().__init__(tokenizer, max_text_len, max_regions)
        config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.config = config
        self.img_dim = img_dim
        self.uniter = UniterModel(config, img_dim)

    # ------------------------------------------------------ input checks
    def text_embeddings(self) -> nn.Module:
        return self.uniter.embeddings

    def box_input_dim(self) -> int:
        return self.uniter.img_embeddings.pos_linear.in_features

    # ------------------------------------------------------------- forward
    def forward(self, batch: dict, capture: CaptureSpec | None = None) -> BackboneOutput:
        capture = capture or CaptureSpec()
        u = self.uniter
        ids, tmask = batch["input_ids"], batch["text_mask"]
        feats, boxes, rmask = batch["region_feats"], batch["region_boxes"], batch["region_mask"]
        B, T = ids.shape
        R = feats.shape[1]
        h = u.embeddings(ids)
        if R > 0:
            type_emb = u.embeddings.token_type_embeddings(torch.ones(B, R, dtype=torch.long, device=ids.device))
            img = u.img_embeddings(feats.to(h.dtype), boxes.to(h.dtype), type_emb)
            h = torch.cat([h, img], 1)
        mask = torch.cat([tmask, rmask], 1) if R > 0 else tmask
        info = StreamInfo(length=T + R, text_offset=0, region_offset=T if R > 0 else None)
        rows = rows_for_stream(capture.rows, info)
        hidden: dict[str, Tensor] = {}
        attn: dict[str, Tensor] = {}
        if capture.wants_hidden("hidden.joint.0"):
            hidden["hidden.joint.0"] = h
        bert_stack(u.encoder.layer, h, mask, "joint", 1, capture, rows, hidden, attn, self.num_heads, stop_early=True)
        return BackboneOutput(
            hidden=hidden, attn=attn, streams={"joint": info},
            attn_streams={n: ("joint", "joint") for n in attn},
            text_mask=tmask, region_mask=rmask, word_to_token=batch["word_to_token"],
            special_mask=batch["special_mask"], rows={"joint": rows} if rows is not None else {},
            layer_names={"joint": self.hidden_names()},
        )


# ------------------------------------------------------------------ builders
def _bert_config(path: str | None, config: str | None) -> BertConfig:
    if config:
        if not Path(config).exists():
            raise FileNotFoundError(f"backbone config {config} does not exist")
        d = json.loads(Path(config).read_text())
        return BertConfig(**{k: v for k, v in d.items() if not k.startswith("_")})
    if path:
        cfg = Path(path) / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{path}: no config.json (set backbone.config=JSON)")
        return BertConfig.from_pretrained(path, local_files_only=True)
    return BertConfig()  # bert-base sizes


def _hf_bert_state(path: str) -> dict[str, Tensor]:
    sd = hf_state(path)
    sd = rename_gamma_beta(sd)
    out = {}
    for k, v in sd.items():
        k2 = k[len("bert."):] if k.startswith("bert.") else k
        if k2.startswith(("embeddings.", "encoder.", "pooler.")):
            out["uniter." + k2] = v
    return out


def _uniter_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept DataParallel-saved files (``module.uniter.*``); other keys keep their names (ignored, reported)."""
    return {(k[len("module."):] if k.startswith("module.uniter.") else k): v for k, v in sd.items()}


def model_config(cfg, img_dim: int | None = None) -> BertConfig:
    """The HF config :func:`build_uniter` builds the encoder from (``backbone.config`` > ``path`` > BERT-base
    sizes), attention implementation included; reads no weights (``img_dim`` is not part of it)."""
    config = _bert_config(resolve_path(cfg.get("path")), resolve_path(cfg.get("config")))
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return config


def build_uniter(cfg, img_dim: int | None = None) -> UniterBackbone:
    src = sources(cfg, "uniter", "PATH (uniter-base.pt)")
    path, ckpt, pretrained = src.path, src.checkpoint, src.pretrained
    config = model_config(cfg)
    sd = None
    if pretrained and ckpt:  # a Lightning / wrapped model's file: its attribute prefix stripped
        sd = unwrap_checkpoint(load_state(ckpt), ("uniter.embeddings.word_embeddings.weight",), ckpt,
                               cfg.get("checkpoint_prefix"))
        sd = _uniter_keys(rename_gamma_beta(sd))
    ckpt_dim = sd.get("uniter.img_embeddings.img_linear.weight") if sd else None
    # the width: configured > the checkpoint's image embedding > the shards' > UNITER's 2048
    img_dim = int(cfg.get("img_dim") or (ckpt_dim.shape[1] if ckpt_dim is not None else None) or img_dim or 2048)
    tokenizer = load_tokenizer(src.tokenizer)
    m = UniterBackbone(config, img_dim, tokenizer, cfg.get("max_text_len"), int(cfg.get("max_regions", 100)))
    seed = int(cfg.get("seed", 0))
    seeded_init(m, config.initializer_range, seed)
    report = {}
    source = "random init (untrained twin)"
    if sd is not None:
        m.image_weights = ckpt
        report = load_into(m, sd, ckpt, ("uniter.embeddings.", "uniter.img_embeddings.", "uniter.encoder."),
                           optional=("uniter.img_embeddings.mask_embedding",))
        source = f"UNITER checkpoint {ckpt}"
    elif pretrained and path:
        report = load_into(m, _hf_bert_state(path), path, ("uniter.embeddings.", "uniter.encoder."))
        source = (f"text side from the pretrained BERT-family model at {path}; "
                  f"image embeddings randomly initialised (seed {seed})")
    sd = ckpt_dim = None  # copied into the model: the file's mapping goes now, not after the checksum
    return finish(m, cfg, src, seed, source, report, img_dim=img_dim, layers=config.num_hidden_layers)
