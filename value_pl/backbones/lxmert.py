"""LXMERT (two-stream), built from transformers' ``LxmertModel`` submodules with our own layer loop.

Module tree
===========
``self.lxmert`` *is* a transformers ``LxmertModel``, so the state dict keys are
``lxmert.{embeddings,encoder,pooler}.*`` and an HF ``LxmertModel`` / ``LxmertForPreTraining`` directory
loads directly (bare ``embeddings.*`` keys or ``lxmert.*`` keys). The original ``model_LXRT.pth``
(airsplay/lxmert) uses the same module names behind a ``module.bert.`` prefix; it is mapped to
``lxmert.`` and its pretraining heads (``module.cls.*``, ``module.obj_predict_head.*``,
``module.answer_head.*``) are dropped and reported.

Forward
=======
We drive the loop ourselves -- text embeddings -> ``l_layers`` (9) language layers; ``visn_fc``
(visual embedding: ``(LN(visn_fc(feat)) + LN(box_fc(box))) / 2``) -> ``r_layers`` (5) r-layers;
``x_layers`` (5) cross layers -- so that every attention map can be captured. transformers only returns
the language->vision map of a cross layer; here the shared cross-attention module
(``x_layers[i].visual_attention.att``) is hooked and both of its calls (L->V first, then V->L) are
recorded, as are the two self-attentions inside each cross layer.

Layer numbering (canonical names, as in the VALUE paper with the default 9/5/5 sizes)
=====================================================================================
================================  =========================================================
``hidden.lang.0``                 text embedding output
``hidden.lang.1`` .. ``.9``       the 9 language layers (``attn.lang.1..9.self``)
``hidden.lang.10`` .. ``.14``     language output of cross layers 1-5 (``attn.lang.10..14.self``
                                  = the language self-attention inside cross layer 1-5)
``hidden.vis.0``                  visual embedding output (``visn_fc``)
``hidden.vis.1`` .. ``.5``        the 5 r-layers (``attn.vis.1..5.self``)
``hidden.vis.6`` .. ``.10``       vision output of cross layers 1-5 (``attn.vis.6..10.self``
                                  = the vision self-attention inside cross layer 1-5)
``attn.cross.1..5.l2v``           cross layer x: language queries over vision keys
``attn.cross.1..5.v2l``           cross layer x: vision queries over language keys
================================  =========================================================

The paper's visual stream (VRI/VRC, Fig. 4, Table 10) is layers 1-5 = r-layers and 6-10 = cross
layers, i.e. ``hidden.vis.1..10``; its cross-modal encoder (VCD/VCC, NMI) is the 5 cross layers
(``layer_01..05`` of the phrase-region layout); its linguistic probe uses the 9 language layers.

Inputs: tokenizer bert-base-uncased (``backbone.tokenizer=DIR``), region features of
``visual_feat_dim`` (2048) and 4-d boxes ``x1/W, y1/H, x2/W, y2/H`` (``visual_pos_dim`` = 4; box mode
``xyxy4``), 36 regions per image in the original work.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from transformers import LxmertConfig, LxmertModel

from .base import Backbone, BackboneOutput, LayerSpec, PairLayout, StreamInfo, layer_index, layer_title
from .capture import CaptureSpec, QKRecorder, RowSoftmax, additive_mask, rows_for_stream
from .common import (bert_stack, finish, hf_state, load_into, load_state, load_tokenizer, read_hf_config,
                     rename_gamma_beta, resolve_path, seeded_init, sources, unwrap_checkpoint)

log = logging.getLogger(__name__)

#: pretraining / task heads of the original and HF checkpoints (not part of the encoder)
HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.", "logit_fc.")


class LxmertBackbone(Backbone):
    kind = "two"
    family = "lxmert"
    box_mode = "xyxy4"
    feature_field = "visual_feat_dim"
    box_input_field = "visual_pos_dim"
    image_weights: str | None = None  # the file/directory the visual embedding was loaded from (checks.py)

    def __init__(self, config: LxmertConfig, tokenizer=None, max_text_len: int | None = None, max_regions: int = 36):
        super().__init__(tokenizer, max_text_len, max_regions)
        self.config = config
        self.lxmert = LxmertModel(config)

    # ---------------------------------------------------------------- sizes
    @property
    def img_dim(self) -> int:
        return self.config.visual_feat_dim

    def text_embeddings(self):
        return self.lxmert.embeddings

    def box_input_dim(self) -> int:
        return self.lxmert.encoder.visn_fc.box_fc.in_features

    @property
    def n_lang(self) -> int:
        return self.config.l_layers

    @property
    def n_r(self) -> int:
        return self.config.r_layers

    @property
    def n_x(self) -> int:
        return self.config.x_layers

    # --------------------------------------------------------------- layout
    def hidden_names(self, stream: str = "lang") -> list[str]:
        if stream == "lang":
            return [f"hidden.lang.{l}" for l in range(self.n_lang + self.n_x + 1)]
        if stream == "vis":
            return [f"hidden.vis.{l}" for l in range(self.n_r + self.n_x + 1)]
        raise KeyError(f"LXMERT has streams 'lang' and 'vis', not {stream!r}")

    def attn_names(self) -> list[str]:
        L, R, X = self.n_lang, self.n_r, self.n_x
        return ([f"attn.lang.{l}.self" for l in range(1, L + X + 1)]
                + [f"attn.vis.{l}.self" for l in range(1, R + X + 1)]
                + [f"attn.cross.{x}.{d}" for x in range(1, X + 1) for d in ("l2v", "v2l")])

    def pair_layout(self, pair_kind: str) -> PairLayout:
        L, R, X = self.n_lang, self.n_r, self.n_x
        if pair_kind == "phrase_region":
            layers = [LayerSpec(f"layer_{x:02d}", emb=(f"hidden.lang.{L + x}", f"hidden.vis.{R + x}"),
                                attn=[(f"attn.cross.{x}.l2v", f"attn.cross.{x}.v2l")]) for x in range(1, X + 1)]
            layers.append(LayerSpec("all_heads", attn=[(f"attn.cross.{x}.l2v", f"attn.cross.{x}.v2l")
                                                       for x in range(1, X + 1)]))
            return PairLayout(layers)
        if pair_kind == "region_region":
            V = R + X
            layers = [LayerSpec(f"layer_{l:02d}", emb=(f"hidden.vis.{l}",) * 2,
                                attn=[(f"attn.vis.{l}.self",) * 2] if l > 0 else []) for l in range(V + 1)]
            layers.append(LayerSpec("all_heads", attn=[(f"attn.vis.{l}.self",) * 2 for l in range(1, V + 1)]))
            return PairLayout(layers)
        raise ValueError(f"LXMERT has no pair layout {pair_kind!r} (phrase_region, region_region)")

    def layer_title(self, task_kind: str, name: str) -> str:
        """``Layer k`` as in the paper's Tables 3/8 (cross layers 1-5), 10 (visual stream 1-10) and 11
        (language layers 1-9), saying which block it is; cross layers also get Table 1's 0-based number."""
        k = layer_index(name)
        if k is None or k == 0:
            return {"region_region": "Visual embeddings"}.get(task_kind, "Embeddings") if k == 0 else layer_title(name)
        if task_kind == "phrase_region":
            return f"Layer {k}: cross layer {k - 1} of Table 1"
        if task_kind == "region_region":
            if k <= self.n_r:
                return f"Layer {k}: visual layer {k}"
            return f"Layer {k}: cross layer {k - self.n_r - 1} of Table 1"
        return f"Layer {k}: language layer {k}"

    def sentence_layers(self) -> list[str]:
        """The embedding output and the language layers (text only; the paper's linguistic probe)."""
        return [f"hidden.lang.{l}" for l in range(self.n_lang + 1)]

    # -------------------------------------------------------------- forward
    def _needs(self, capture: CaptureSpec) -> tuple[bool, bool]:
        """(run the visual r-layers, run the cross layers) -- skipped when nothing from them is wanted."""
        L, R, X = self.n_lang, self.n_r, self.n_x
        x_names = ([f"hidden.lang.{L + x}" for x in range(1, X + 1)] + [f"hidden.vis.{R + x}" for x in range(1, X + 1)])
        x_attn = ([f"attn.lang.{L + x}.self" for x in range(1, X + 1)]
                  + [f"attn.vis.{R + x}.self" for x in range(1, X + 1)]
                  + [f"attn.cross.{x}.{d}" for x in range(1, X + 1) for d in ("l2v", "v2l")])
        need_x = any(capture.wants_hidden(n) for n in x_names) or any(capture.wants_attn(n) for n in x_attn)
        r_names = [f"hidden.vis.{l}" for l in range(R + 1)]
        r_attn = [f"attn.vis.{l}.self" for l in range(1, R + 1)]
        need_r = need_x or any(capture.wants_hidden(n) for n in r_names) or any(capture.wants_attn(n) for n in r_attn)
        return need_r, need_x

    def forward(self, batch: dict, capture: CaptureSpec | None = None) -> BackboneOutput:
        capture = capture or CaptureSpec()
        lx = self.lxmert
        enc = lx.encoder
        ids, tmask = batch["input_ids"], batch["text_mask"]
        feats, boxes, rmask = batch["region_feats"], batch["region_boxes"], batch["region_mask"]
        B, T = ids.shape
        R = feats.shape[1]
        H = self.num_heads
        linfo = StreamInfo(length=T, text_offset=0)
        vinfo = StreamInfo(length=R, region_offset=0)
        lrows = rows_for_stream(capture.rows, linfo)
        vrows = rows_for_stream(capture.rows, vinfo)
        hidden: dict[str, Tensor] = {}
        attn: dict[str, Tensor] = {}
        streams_of: dict[str, tuple[str, str]] = {}
        need_r, need_x = self._needs(capture)

        lang = lx.embeddings(ids, token_type_ids=torch.zeros_like(ids))
        if capture.wants_hidden("hidden.lang.0"):
            hidden["hidden.lang.0"] = lang
        lang = bert_stack(enc.layer, lang, tmask, "lang", 1, capture, lrows, hidden, attn, H)

        if need_r:
            if feats.shape[-1] != self.config.visual_feat_dim:
                raise ValueError(f"LXMERT expects {self.config.visual_feat_dim}-d region features "
                                 f"(visual_feat_dim), got {feats.shape[-1]}")
            if boxes.shape[-1] != self.config.visual_pos_dim:
                raise ValueError(f"LXMERT expects {self.config.visual_pos_dim}-d boxes x1/W,y1/H,x2/W,y2/H "
                                 f"(box mode xyxy4), got {boxes.shape[-1]}")
            vis = enc.visn_fc(feats.to(lang.dtype), boxes.to(lang.dtype))
            if capture.wants_hidden("hidden.vis.0"):
                hidden["hidden.vis.0"] = vis
            vis = bert_stack(enc.r_layers, vis, rmask, "vis", 1, capture, vrows, hidden, attn, H)

        if need_x:
            lbias = additive_mask(tmask, lang.dtype)
            vbias = additive_mask(rmask, vis.dtype)
            L, Rn = self.n_lang, self.n_r
            soft: dict[tuple[str, str], RowSoftmax] = {}  # (query stream, key stream): shared by the x-layers

            def probs(q, k, qs: str, ks: str):
                if (qs, ks) not in soft:
                    soft[(qs, ks)] = RowSoftmax(lbias if ks == "lang" else vbias, lrows if qs == "lang" else vrows, H)
                return soft[(qs, ks)].probs(q, k)

            for i, xl in enumerate(enc.x_layers):
                x = i + 1
                n_cross, n_ls, n_vs = f"attn.cross.{x}", f"attn.lang.{L + x}.self", f"attn.vis.{Rn + x}.self"
                rec = QKRecorder({n_cross: xl.visual_attention.att, n_ls: xl.lang_self_att.self,
                                  n_vs: xl.visn_self_att.self})
                want_l2v, want_v2l = capture.wants_attn(n_cross + ".l2v"), capture.wants_attn(n_cross + ".v2l")
                rec.active = {n for n, w in ((n_cross, want_l2v or want_v2l), (n_ls, capture.wants_attn(n_ls)),
                                             (n_vs, capture.wants_attn(n_vs))) if w}
                with rec:
                    out = xl(lang, lbias[:, None, None, :], vis, vbias[:, None, None, :])
                lang, vis = out[0], out[1]
                # the shared cross module is called twice: [0] language->vision, [1] vision->language
                if want_l2v:
                    attn[n_cross + ".l2v"] = probs(rec.q[n_cross][0], rec.k[n_cross][0], "lang", "vis")
                    streams_of[n_cross + ".l2v"] = ("lang", "vis")
                if want_v2l:
                    attn[n_cross + ".v2l"] = probs(rec.q[n_cross][1], rec.k[n_cross][1], "vis", "lang")
                    streams_of[n_cross + ".v2l"] = ("vis", "lang")
                if n_ls in rec.active:
                    attn[n_ls] = probs(rec.q[n_ls][0], rec.k[n_ls][0], "lang", "lang")
                if n_vs in rec.active:
                    attn[n_vs] = probs(rec.q[n_vs][0], rec.k[n_vs][0], "vis", "vis")
                for n, h in ((f"hidden.lang.{L + x}", lang), (f"hidden.vis.{Rn + x}", vis)):
                    if capture.wants_hidden(n):
                        hidden[n] = h

        for n in attn:
            if n not in streams_of:
                s = n.split(".")[1]
                streams_of[n] = (s, s)
        rows = {}
        if lrows is not None:
            rows["lang"] = lrows
        if vrows is not None:
            rows["vis"] = vrows
        return BackboneOutput(
            hidden=hidden, attn=attn, streams={"lang": linfo, "vis": vinfo}, attn_streams=streams_of,
            text_mask=tmask, region_mask=rmask, word_to_token=batch["word_to_token"],
            special_mask=batch["special_mask"], rows=rows,
            layer_names={"lang": self.hidden_names("lang"), "vis": self.hidden_names("vis")},
        )


# ------------------------------------------------------------------ loading
def lxmert_config(path: str | None, config: str | None) -> LxmertConfig:
    """``config`` (JSON file, or a directory with config.json) > ``path``/config.json > LXMERT defaults."""
    cfg = read_hf_config(LxmertConfig, path, config, "LXMERT")
    if cfg is not None:
        return cfg
    return LxmertConfig()  # the released model: 9/5/5 layers, 768, 12 heads, 2048-d features, 4-d boxes


#: the word-embedding key of every layout :func:`map_lxmert_keys` reads (a wrapper's prefix is found by it)
LXMERT_ANCHORS = tuple(p + "embeddings.word_embeddings.weight" for p in ("module.bert.", "bert.", "lxmert.", ""))


def map_lxmert_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original (``module.bert.*``), HF ``LxmertModel`` (``embeddings.*``) or ``LxmertForPreTraining``
    (``lxmert.*``) names -> this module's names (``lxmert.*``). Heads keep their own names (then ignored)."""
    sd = rename_gamma_beta(sd)
    out = {}
    for k, v in sd.items():
        k2 = k
        if k2.startswith(("module.bert.", "bert.")):
            k2 = "lxmert." + k2.split("bert.", 1)[1]
        elif k2.startswith(("embeddings.", "encoder.", "pooler.")):
            k2 = "lxmert." + k2
        out[k2] = v  # anything else (module.cls.*, obj_predict_head.*, ...) keeps its name: ignored, reported
    return out


def model_config(cfg, img_dim: int | None = None) -> LxmertConfig:
    """The HF config :func:`build_lxmert` builds the model from: ``backbone.config`` > ``path`` > LXMERT's
    defaults, the feature width (``img_dim`` configured, else the weights', else the data's ``img_dim``) and the
    attention implementation; reads no weights."""
    path, ckpt = resolve_path(cfg.get("path")), resolve_path(cfg.get("checkpoint"))
    config = lxmert_config(path, resolve_path(cfg.get("config")))
    want_dim = cfg.get("img_dim") or (None if (cfg.get("pretrained", True) and (path or ckpt)) else img_dim)
    if want_dim:
        config.visual_feat_dim = int(want_dim)
    config._attn_implementation = "eager"  # LxmertAttention has a single implementation
    return config


def build_lxmert(cfg, img_dim: int | None = None) -> LxmertBackbone:
    src = sources(cfg, "lxmert", "model_LXRT.pth")
    path, ckpt, pretrained = src.path, src.checkpoint, src.pretrained
    config = model_config(cfg, img_dim)
    tokenizer = load_tokenizer(src.tokenizer)
    m = LxmertBackbone(config, tokenizer, cfg.get("max_text_len"), int(cfg.get("max_regions", 36)))
    seed = int(cfg.get("seed", 0))
    seeded_init(m, config.initializer_range, seed)
    report: dict = {}
    source = f"random init (untrained twin, seed {seed})"
    required = ("lxmert.embeddings.", "lxmert.encoder.")
    if pretrained and ckpt:
        sd = unwrap_checkpoint(load_state(ckpt), LXMERT_ANCHORS, ckpt, cfg.get("checkpoint_prefix"))
        report = load_into(m, map_lxmert_keys(sd), ckpt, required)
        del sd  # copied into the model: the file's mapping goes now, not after the checksum
        source = f"original LXMERT checkpoint {ckpt}"
        m.image_weights = ckpt
    elif pretrained and path:
        report = load_into(m, map_lxmert_keys(hf_state(path)), path, required)
        source = f"HF LXMERT directory {path}"
        m.image_weights = path
    if report.get("ignored"):
        log.info("LXMERT: ignored %d non-encoder key(s): %s", len(report["ignored"]), report["ignored"][:8])
    if img_dim and int(img_dim) != config.visual_feat_dim:
        log.warning("LXMERT expects %d-d region features but the data has %s-d", config.visual_feat_dim, img_dim)
    return finish(m, cfg, src, seed, source, report, img_dim=config.visual_feat_dim,
                  layers={"lang": config.l_layers, "r": config.r_layers, "x": config.x_layers})
