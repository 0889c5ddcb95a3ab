"""Text-only BERT-family backbone (BERT, MiniLM, RoBERTa, ELECTRA, ... any local HF directory whose model
has ``encoder.layer[i].attention.self.{query,key}``), for the linguistic (SentEval) probes and as the
BERT-base baseline of the paper's Table 5.

* Stream ``joint`` holds only text: ``[CLS] tokens [SEP] <pad>`` (``region_offset`` is ``None``). The
  collator drops regions and ``forward`` ignores them; pair tasks (which need regions) are refused.
* ``hidden.joint.0`` is the embedding output, ``hidden.joint.l`` the ``l``-th layer, ``attn.joint.l.self``
  its self-attention.
* ``backbone.path=minilm`` is the MiniLM shipped with the package; ``backbone.pretrained=false`` gives the
  untrained twin (same config, seeded random init).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from .autocast_cache import cache_autocast_weights
from .base import BackboneOutput, SingleStreamBackbone, PairLayout, StreamInfo
from .capture import CaptureSpec, rows_for_stream
from .common import (bert_stack, load_into, load_state, load_tokenizer, rename_gamma_beta, resolve_path, seeded_init,
                     unwrap_checkpoint)

log = logging.getLogger(__name__)


class BertBackbone(SingleStreamBackbone):
    text_only = True
    family = "bert"
    box_mode = "xyxy4"  # unused: text only

    def __init__(self, model, tokenizer=None, max_text_len: int | None = None):
        super().__init__(tokenizer, max_text_len, max_regions=0)
        enc = getattr(model, "encoder", None)
        layers = getattr(enc, "layer", None)
        if layers is None or not all(hasattr(getattr(getattr(l, "attention", None), "self", None), "query")
                                     for l in layers):
            raise ValueError(f"{type(model).__name__} is not a BERT-style encoder (needs "
                             "encoder.layer[i].attention.self.query/key); use a BERT/MiniLM/RoBERTa/ELECTRA directory")
        self.model = model
        self.config = model.config

    def collator(self, task=None, relabel=None):
        if task is not None and task.kind in ("phrase_region", "region_region"):
            self.pair_layout(task.kind)  # raises
        return super().collator(task, relabel)

    def pair_layout(self, pair_kind: str) -> PairLayout:
        raise ValueError(f"backbone family 'bert' is text-only (no regions): it cannot run the {pair_kind} "
                         "tasks (vcd/vcc/vri/vrc); use it for sentence tasks, or pick uniter/lxmert/visualbert")

    def sentence_layers(self) -> list[str]:
        return self.hidden_names()

    def text_embeddings(self):
        return self.model.embeddings

    def position_offset(self) -> int:
        """RoBERTa-style embeddings number positions from ``padding_idx + 1``."""
        pad = getattr(self.model.embeddings, "padding_idx", None)
        return int(pad) + 1 if pad is not None else 0

    def forward(self, batch: dict, capture: CaptureSpec | None = None) -> BackboneOutput:
        capture = capture or CaptureSpec()
        ids, tmask = batch["input_ids"], batch["text_mask"]
        T = ids.shape[1]
        info = StreamInfo(length=T, text_offset=0, region_offset=None)
        rows = rows_for_stream(capture.rows, info)
        hidden: dict[str, Tensor] = {}
        attn: dict[str, Tensor] = {}
        h = self.model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        project = getattr(self.model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden_size
        if project is not None:
            h = project(h)
        if capture.wants_hidden("hidden.joint.0"):
            hidden["hidden.joint.0"] = h
        bert_stack(self.model.encoder.layer, h, tmask, "joint", 1, capture, rows, hidden, attn, self.num_heads, stop_early=True)
        rmask = batch.get("region_mask")
        if rmask is None:
            rmask = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=ids.device)
        return BackboneOutput(
            hidden=hidden, attn=attn, streams={"joint": info}, attn_streams={n: ("joint", "joint") for n in attn},
            text_mask=tmask, region_mask=rmask, word_to_token=batch["word_to_token"],
            special_mask=batch["special_mask"], rows={"joint": rows} if rows is not None else {},
            layer_names={"joint": self.hidden_names()},
        )


def hf_weights(path: str) -> dict[str, Tensor]:
    p = Path(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (p / name).exists():
            return rename_gamma_beta(load_state(str(p / name)))
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def map_base_keys(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """HF names -> this module's (``model.*``): ``bert.encoder...`` (a *ForPreTraining / *ForMaskedLM directory)
    or bare ``encoder...`` (a BertModel directory). Other keys (heads) keep their names: ignored, reported."""
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue  # a buffer older transformers saved; rebuilt here
        if prefix and k.startswith(prefix + "."):
            k = "model." + k[len(prefix) + 1:]
        elif k.startswith(("embeddings.", "embeddings_project.", "encoder.", "pooler.")):
            k = "model." + k
        out[k] = v
    return out


def model_config(cfg, img_dim: int | None = None):
    """The HF config :func:`build_bert` builds the model from (``backbone.config`` > ``path``), attention
    implementation included; reads no weights."""
    from transformers import AutoConfig

    path = resolve_path(cfg.get("path"))
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"backbone=bert needs backbone.path=DIR (a local HF BERT-family directory, or "
                                f"'minilm'); got {cfg.get('path')!r}")
    config = AutoConfig.from_pretrained(resolve_path(cfg.get("config")) or path, local_files_only=True)
    config._attn_implementation = "sdpa"  # our capture reads q/k projections; the layers may use sdpa
    return config


def build_bert(cfg, img_dim: int | None = None) -> BertBackbone:
    from transformers import AutoModel

    config = model_config(cfg)
    path = resolve_path(cfg.get("path"))
    cfg_file = resolve_path(cfg.get("config"))
    tok_dir = resolve_path(cfg.get("tokenizer")) or path
    model = AutoModel.from_config(config, attn_implementation="sdpa")
    m = BertBackbone(model, load_tokenizer(tok_dir), cfg.get("max_text_len"))
    seed = int(cfg.get("seed", 0))
    pretrained = bool(cfg.get("pretrained", True))
    seeded_init(m, getattr(config, "initializer_range", 0.02), seed)
    report: dict = {}
    source = f"random init (untrained twin of {path}, seed {seed})"
    if pretrained:
        ckpt = resolve_path(cfg.get("checkpoint"))
        if ckpt:  # a Lightning / wrapped model's file: its attribute prefix stripped
            anchors = tuple(p + "embeddings.word_embeddings.weight" for p in (model.base_model_prefix + ".", ""))
            sd = rename_gamma_beta(unwrap_checkpoint(load_state(ckpt), anchors, ckpt, cfg.get("checkpoint_prefix")))
        else:
            sd = hf_weights(path)
        sd = map_base_keys(sd, model.base_model_prefix)
        report = load_into(m, sd, ckpt or path, ("model.embeddings.", "model.embeddings_project.", "model.encoder."))
        del sd  # copied into the model: the file's mapping goes now, not after the checksum
        source = f"pretrained {config.model_type} from {ckpt or path}"
    m.freeze()
    cache_autocast_weights(m)  # bf16 copies of the frozen Linear weights made once, not per call
    m.load_report = report
    m.identity = {
        "family": "bert", "name": cfg.get("name", "bert"), "path": path,
        "checkpoint": resolve_path(cfg.get("checkpoint")),
        "config": cfg_file, "tokenizer": tok_dir, "pretrained": pretrained, "seed": seed, "source": source,
        "model_type": config.model_type, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "heads": config.num_attention_heads, "checksum": m.weights_checksum(), "config_sha256": m.record_config(),
        "ignored_keys": len(report.get("ignored", [])), "text_limit": m.text_limit,
    }
    return m
