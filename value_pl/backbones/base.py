"""The one output object every backbone returns, the backbone base class, and the canonical names.

Canonical names
===============
Every activation a backbone exposes has a dotted name ``<what>.<stream>.<layer>[.<kind>]``:

``hidden.<stream>.<layer>``
    Hidden states ``(B, N_stream, D)``. Layer 0 is the embedding output; layer ``l >= 1`` is the
    output of the ``l``-th transformer layer of that stream.
``attn.<stream>.<layer>.self``
    Self-attention probabilities ``(B, H, N_q, N_k)`` computed *inside* layer ``l`` of the stream
    (queries and keys from the same stream).
``attn.cross.<x>.l2v`` / ``attn.cross.<x>.v2l``
    Two-stream cross attention of cross layer ``x`` (1-based): language queries over vision keys,
    and vision queries over language keys.

Streams:

* ``joint`` -- single-stream models (UNITER, VisualBERT, and BERT on text-only input). The joint
  sequence is ``[CLS] tokens [SEP] <pad>`` followed by the regions.
* ``lang`` / ``vis`` -- two-stream models (LXMERT). ``lang`` layers 1-9 are the language layers,
  10-14 the language half of the 5 cross layers; ``vis`` layers 1-5 are the r-layers and 6-10 the
  vision half of the cross layers (the paper's numbering of the visual stream, Fig. 4/10).
  ``attn.lang.10.self`` ... ``attn.lang.14.self`` and ``attn.vis.6.self`` ... ``attn.vis.10.self``
  are the self-attentions inside the cross layers.

Capture by request
==================
What a forward keeps is asked for with a :class:`~value_pl.backbones.capture.CaptureSpec` (names and query
rows); see :mod:`value_pl.backbones.capture`.

Probers and analyses read *only* this object: use :meth:`BackboneOutput.embed` and
:meth:`BackboneOutput.attention_between` instead of indexing tensors by hand.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn

from ..data.hashing import canonical_sha256, field_differences, one_sided_fields

TEXT = "text"
REGION = "region"


@dataclass
class StreamInfo:
    """Where each modality sits inside one stream's sequence."""

    length: int
    text_offset: int | None = None  # position of text token 0 ([CLS]) in this stream
    region_offset: int | None = None  # position of region 0 in this stream

    def offset(self, modality: str) -> int:
        off = self.text_offset if modality == TEXT else self.region_offset
        if off is None:
            raise KeyError(f"stream has no {modality} tokens")
        return off


@dataclass
class BackboneOutput:
    """Hidden states and attention maps of one frozen forward pass, under canonical names."""

    hidden: dict[str, Tensor]
    attn: dict[str, Tensor]
    streams: dict[str, StreamInfo]
    attn_streams: dict[str, tuple[str, str]]  # map name -> (query stream, key stream)
    text_mask: Tensor  # (B, T) 1 for real text tokens (incl. [CLS]/[SEP])
    region_mask: Tensor  # (B, R) 1 for real regions
    word_to_token: Tensor  # (B, W, 2) [start, end) text-token span of each input word, -1: pad or cut
    special_mask: Tensor  # (B, T) 1 for [CLS]/[SEP]
    rows: dict[str, Tensor] = field(default_factory=dict)  # stream -> (B, R) captured positions, -1 pad
    layer_names: dict[str, list[str]] = field(default_factory=dict)  # stream -> hidden names in order

    # ----------------------------------------------------------------- masks
    def modality_mask(self, stream: str) -> Tensor:
        """(B, N_stream) long: 0 text, 1 region, -1 padding."""
        info = self.streams[stream]
        B = self.text_mask.shape[0]
        out = torch.full((B, info.length), -1, dtype=torch.long, device=self.text_mask.device)
        if info.text_offset is not None:
            T = self.text_mask.shape[1]
            seg = out[:, info.text_offset : info.text_offset + T]
            seg[self.text_mask.bool()] = 0
        if info.region_offset is not None:
            R = self.region_mask.shape[1]
            seg = out[:, info.region_offset : info.region_offset + R]
            seg[self.region_mask.bool()] = 1
        return out

    def positions(self, stream: str, modality: str, idx: Tensor) -> Tensor:
        return idx + self.streams[stream].offset(modality)

    # ------------------------------------------------------------ embeddings
    def embed(self, name: str, b: Tensor, modality: str, span: Tensor) -> Tensor:
        """Mean hidden state over ``[start, end)`` spans of one modality.

        b: (P,) sample index; span: (P, 2) start/end within the modality. Returns (P, D).
        """
        stream = name.split(".")[1]
        h = self.hidden[name]
        pos, valid = _span_positions(span)
        pos = self.positions(stream, modality, pos)
        g = h[b[:, None], pos.clamp(min=0)]  # (P, S, D)
        w = valid.to(g.dtype)[..., None]
        return (g * w).sum(1) / w.sum(1).clamp(min=1.0)

    # ------------------------------------------------------------ attention
    def attention_between(
        self, name: str, b: Tensor, q_modality: str, q_span: Tensor, k_modality: str, k_span: Tensor
    ) -> Tensor:
        """Attention of map ``name`` from query span to key span, per head: (P, H).

        The value is the max over all (query token, key token) pairs of the two spans; for a phrase
        (several tokens) and a region (one token) this is the paper's "maximum attention weight among
        the tokens in that phrase" (VALUE, footnote 8).
        """
        q_stream, k_stream = self.attn_streams[name]
        a = self.attn[name]
        qpos, qvalid = _span_positions(q_span)
        kpos, kvalid = _span_positions(k_span)
        qpos = self.positions(q_stream, q_modality, qpos)
        kpos = self.positions(k_stream, k_modality, kpos)
        if q_stream in self.rows:
            slots = self.row_columns(q_stream)  # (B, N)
            qrow = slots[b[:, None], qpos.clamp(min=0)]
            if bool(((qrow < 0) & qvalid).any()):
                raise KeyError(f"{name}: a requested query position was not captured")
        else:
            qrow = qpos
        # (P, H, Sq, Nk)
        sel = a[b[:, None], :, qrow.clamp(min=0)]  # (P, Sq, H, Nk)
        sel = sel.permute(0, 2, 1, 3)
        sel = torch.gather(sel, 3, kpos.clamp(min=0)[:, None, None, :].expand(-1, sel.shape[1], sel.shape[2], -1))
        mask = (qvalid[:, None, :, None] & kvalid[:, None, None, :])
        sel = sel.masked_fill(~mask, float("-inf"))
        return sel.flatten(2).amax(-1)

    def num_heads(self, name: str) -> int:
        return self.attn[name].shape[1]

    def row_columns(self, stream: str) -> Tensor:
        """(B, N): the column of each position of ``stream`` among its captured attention rows, -1 where no row
        was captured (rows captured for several requests at once are sorted and merged: a request's own order,
        e.g. a collator's slots, no longer applies)."""
        return _slot_lookup(self.rows[stream], self.streams[stream].length)


def _span_positions(span: Tensor) -> tuple[Tensor, Tensor]:
    """(P, 2) [start, end) -> (P, S) positions and validity."""
    length = (span[:, 1] - span[:, 0]).clamp(min=0)
    S = max(int(length.max().item()) if length.numel() else 1, 1)
    ar = torch.arange(S, device=span.device)
    pos = span[:, :1] + ar[None]
    valid = ar[None] < length[:, None]
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def _slot_lookup(rows: Tensor, n: int) -> Tensor:
    B, R = rows.shape
    slots = torch.full((B, n + 1), -1, dtype=torch.long, device=rows.device)
    idx = torch.where(rows >= 0, rows, torch.full_like(rows, n))
    slots.scatter_(1, idx, torch.arange(R, device=rows.device).expand(B, R).contiguous())
    return slots[:, :n]


#: HF config fields that cannot change what a frozen backbone computes from a batch, left out of its config record
#: (everything else -- and every field a future transformers adds -- is in it)
CONFIG_FIELDS_IGNORED = frozenset({
    # bookkeeping: where the config was read from, which library wrote it, which head class it was saved with
    "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures",
    # the dtype the config asks for: the built weights' own dtype is recorded instead (``weights_dtype``)
    "dtype", "torch_dtype",
    # outputs and caches our own layer loop never asks the modules for
    "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "use_cache", "torchscript",
    "gradient_checkpointing",
    # dropout: a frozen backbone runs in eval mode for good (Backbone.freeze)
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
    # initialisation only: what it drew is in the weights' checksum
    "initializer_range", "special_visual_initialize",
    # task heads and pretraining losses that are not part of the encoder (never built here)
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "task_specific_params",
    "num_qa_labels", "num_object_labels", "num_attr_labels", "visual_loss_normalizer", "task_matched",
    "task_mask_lm", "task_obj_predict", "task_qa", "visual_obj_loss", "visual_attr_loss", "visual_feat_loss",
})


def model_config_record(config, **extra) -> dict:
    """The fields of an HF ``config`` that can change a frozen backbone's outputs (all of ``config.to_dict()`` but
    :data:`CONFIG_FIELDS_IGNORED` and other private ``_`` fields), plus ``attn_implementation`` (the attention
    kernels the layers run) and ``extra`` (settings kept outside the HF config, e.g. UNITER's ``img_dim``)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    out = {str(k): v for k, v in d.items() if k not in CONFIG_FIELDS_IGNORED and not str(k).startswith("_")}
    out["attn_implementation"] = getattr(config, "_attn_implementation", None)
    out.update(extra)
    return out


#: titles of the rows that are no single layer: the detector's features (``raw``), the geometry-only control
#: (``boxes``: the regions' boxes alone, :data:`~value_pl.data.collate.GEOMETRY`) and all layers' heads
ROW_TITLES = {"raw": "Original visual emb.", "boxes": "Box geometry only (control)", "all_heads": "All attention heads"}


def layer_index(name: str) -> int | None:
    """``"layer_07"`` -> 7; None for ``raw`` / ``all_heads`` / other names."""
    head, _, num = str(name).rpartition("_")
    return int(num) if head == "layer" and num.isdigit() else None


def layer_title(name: str) -> str:
    """Single-stream / text-only titles: ``Embeddings`` (``layer_00``; never "Layer 1"), ``Layer k``,
    ``Original visual emb.`` (``raw``, the detector's features), ``Box geometry only (control)`` (``boxes``),
    ``All attention heads``."""
    k = layer_index(name)
    if k is not None:
        return "Embeddings" if k == 0 else f"Layer {k}"
    return ROW_TITLES.get(name, name)


class Backbone(nn.Module):
    """Base class: a frozen encoder that maps a collated batch to a :class:`BackboneOutput`.

    Subclasses set ``kind`` ('single' or 'two'), ``box_mode`` and ``self.config`` (an HF config), implement
    :meth:`forward`, and describe how pair tasks read them in :meth:`pair_layout`.
    """

    kind = "single"
    family = "base"
    box_mode = "uniter7"
    text_only = False

    def __init__(self, tokenizer=None, max_text_len: int | None = None, max_regions: int = 100):
        super().__init__()
        self.identity: dict = {}
        self.config_record: dict = {}  # record_config(): the effective model config as built
        self._frozen = False  # freeze(): eval mode for good, no gradients (what probing wants)
        self.tokenizer = tokenizer
        self.max_text_len, self.max_regions = max_text_len, max_regions

    # ----------------------------------------------------------------- sizes
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    # ---------------------------------------------------------------- inputs
    def input_encoder(self):
        from ..data.collate import InputEncoder

        return InputEncoder(self.tokenizer, self.box_mode, self.text_limit, self.max_regions)

    @property
    def position_limit(self) -> int:
        """Text tokens (with [CLS]/[SEP]) the model has positions for. RoBERTa-style models (RoBERTa, XLM-R,
        CamemBERT, Data2Vec-text ...) number positions from ``padding_idx + 1``: a backbone with
        ``position_offset()`` (the text embeddings' own offset) reserves that many, others 2 for a roberta model type."""
        n = int(getattr(self.config, "max_position_embeddings", 512))
        offset = getattr(self, "position_offset", None)
        if callable(offset):
            n -= int(offset())
        elif "roberta" in str(getattr(self.config, "model_type", "")):
            n -= 2
        tok = getattr(self.tokenizer, "model_max_length", None)
        return min(n, int(tok)) if tok and tok < 100_000 else n

    @property
    def text_limit(self) -> int:
        """Tokens a text keeps: ``max_text_len`` when configured, else the whole position range."""
        return int(self.max_text_len) if self.max_text_len else self.position_limit

    def collator(self, task=None, relabel=None):
        from ..data.collate import Collator

        return Collator(self.input_encoder(), task, relabel, text_only=self.text_only)

    # -------------------------------------------------------------- identity
    def weights_checksum(self) -> str:
        h = hashlib.sha256()
        for name, p in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return dict(self.identity)

    def effective_config(self) -> dict:
        """What, besides the weights, decides this backbone's outputs: :func:`model_config_record` of its HF
        config, the dtype(s) its weights were built in, and (single-stream models that keep it outside the HF
        config) the region feature width. Recorded at build time by :meth:`record_config`."""
        extra = {"weights_dtype": sorted({str(p.dtype).replace("torch.", "") for p in self.parameters()})}
        if "img_dim" in vars(self):  # an attribute (UNITER), not a view of the HF config (LXMERT, VisualBERT)
            extra["img_dim"] = int(vars(self)["img_dim"])
        return model_config_record(self.config, **extra)

    def record_config(self) -> str:
        """Keep :meth:`effective_config` as built (``config_record``: later ``.to()`` calls or a precision
        plugin do not change how the backbone was configured) and return its hash (``config_sha256``)."""
        self.config_record = self.effective_config()
        return canonical_sha256(self.config_record)

    def config_differences(self, record: dict, where: str = "saved") -> tuple[list[str], list[str]]:
        """Against a saved :meth:`effective_config` ``record``: ``field=A (<where>) != B (now)`` for each field both
        have with different values, and the fields only one of them has (a transformers version that added or
        dropped a config field: said, not refused)."""
        mine = self.config_record or self.effective_config()
        mine = json.loads(json.dumps(mine, sort_keys=True, default=str))  # compared as a saved record reads back
        saved = json.loads(json.dumps(record, default=str))
        return field_differences(saved, mine, where, "now"), one_sided_fields(saved, mine)

    # ---------------------------------------------------------------- layout
    def hidden_names(self, stream: str) -> list[str]:
        raise NotImplementedError

    def pair_layout(self, pair_kind: str) -> "PairLayout":
        raise NotImplementedError

    def layer_title(self, task_kind: str, name: str) -> str:
        """What a probed layer (``layer_NN``, ``raw``, ``all_heads``) is, in the paper's numbering:
        ``layer_00`` is the embedding output, ``layer_k`` the output of the k-th layer ("Layer k" of the
        paper's Tables 3, 5, 8-11). Two-stream models say which stream/block (:class:`LxmertBackbone`)."""
        return layer_title(name)

    def freeze(self) -> "Backbone":
        """No gradients, and eval mode that ``train()`` does not undo (dropout off while probing, also inside a
        module that is put in train mode). The builders return frozen backbones."""
        self._frozen = True
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def unfreeze(self) -> "Backbone":
        """Trainable again (a backbone your own pretraining run trains, e.g. with
        :class:`~value_pl.callbacks.ProbeCallback`): parameters require grad, and ``train()`` / ``eval()`` work as
        for any module, so dropout is on in training."""
        self._frozen = False
        for p in self.parameters():
            p.requires_grad_(True)
        return self

    def train(self, mode: bool = True):  # a frozen backbone never leaves eval mode
        return super().train(bool(mode) and not getattr(self, "_frozen", False))


@dataclass
class LayerSpec:
    """One probed layer of a pair task.

    emb: (hidden name for side a, hidden name for side b); attn: list of (map a->b, map b->a).
    """

    name: str
    emb: tuple[str, str] | None = None
    attn: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PairLayout:
    layers: list[LayerSpec]

    def emb_layers(self) -> list[LayerSpec]:
        return [l for l in self.layers if l.emb is not None]

    def attn_layers(self) -> list[LayerSpec]:
        return [l for l in self.layers if l.attn]

    def hidden_needed(self, names: Iterable[str]) -> list[str]:
        out = []
        for l in self.layers:
            if l.name in names and l.emb is not None:
                out.extend(l.emb)
        return sorted(set(out))

    def attn_needed(self, names: Iterable[str]) -> list[str]:
        out = []
        for l in self.layers:
            if l.name in names:
                for a, b in l.attn:
                    out.extend([a, b])
        return sorted(set(out))


class SingleStreamBackbone(Backbone):
    """Shared layout of single-stream models (stream ``joint``: text, then regions)."""

    kind = "single"

    def hidden_names(self, stream: str = "joint") -> list[str]:
        return [f"hidden.joint.{l}" for l in range(self.num_layers + 1)]

    def attn_names(self) -> list[str]:
        return [f"attn.joint.{l}.self" for l in range(1, self.num_layers + 1)]

    def pair_layout(self, pair_kind: str) -> PairLayout:
        """Layers ``layer_00`` (embeddings) .. ``layer_L`` and ``all_heads`` (every head of every layer)."""
        if pair_kind not in ("phrase_region", "region_region"):
            raise ValueError(f"no pair layout {pair_kind!r} (phrase_region, region_region)")
        L = self.num_layers
        layers = [LayerSpec(f"layer_{l:02d}", emb=(f"hidden.joint.{l}",) * 2,
                            attn=[(f"attn.joint.{l}.self",) * 2] if l > 0 else []) for l in range(L + 1)]
        layers.append(LayerSpec("all_heads", attn=[(f"attn.joint.{l}.self",) * 2 for l in range(1, L + 1)]))
        return PairLayout(layers)

    def sentence_layers(self) -> list[str]:
        return self.hidden_names()
