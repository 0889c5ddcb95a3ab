"""Before the first batch: do the shards and the backbone's own parts fit together?

:func:`check_inputs` compares, for any backbone,

* feature width: the shards' ``feature_dim`` (manifest) vs the width the image embedding takes;
* box format: the box encoding the collator will produce (``box_mode``) vs the width of the box input;
* vocabulary: the tokenizer's size vs the rows of the word embedding;
* letter case: a tokenizer that lowercases over a cased vocabulary (a bert-base-cased ``vocab.txt`` in a directory
  without its ``tokenizer_config.json``: transformers then defaults to ``do_lower_case=True``), or one that keeps
  case over an uncased vocabulary (capitalised words become ``[UNK]``);
* text length: ``max_text_len`` vs the position embeddings;
* word-by-word tokenisation: the collator's pieces of a probe sentence (each word tokenised on its own, cached)
  vs the tokenizer's pieces of the whole sentence -- a tokenizer whose pieces cross spaces (or depend on the
  neighbouring words) cannot give each word its own token span,

and raises :class:`InputMismatchError` with one sentence per problem, naming both sides and the override
that fixes it -- instead of an index error or a failed matmul deep inside the first forward pass.

:func:`check_saved_backbone` compares the backbone a prober checkpoint was trained on (its weights' checksum and
effective model config) with the one built to evaluate or resume it.

Backbones describe themselves through small hooks (all optional, so that adapters of other models pass):
``feature_field`` (the config name of the feature width), ``img_dim``, ``image_weights`` (the file the
image embedding was loaded from, if any), ``box_input_dim()`` / ``box_input_field``, ``text_embeddings()``
(the module holding ``word_embeddings`` and ``position_embeddings``) and ``position_offset()``.
"""
from __future__ import annotations

import logging

from ..data.collate import BOX_DIMS, InputEncoder

log = logging.getLogger(__name__)


class InputMismatchError(ValueError):
    """The shards, the tokenizer or the config do not fit the backbone."""


def _who(bb) -> str:
    ident = bb.describe() if hasattr(bb, "describe") else {}
    name = ident.get("name") or type(bb).__name__
    fam = getattr(bb, "family", None)
    return f"backbone {name} ({fam})" if fam and fam != name else f"backbone {name}"


def feature_problem(bb, manifest: dict, root) -> str | None:
    field = getattr(bb, "feature_field", None)
    want = getattr(bb, "img_dim", None)
    have = manifest.get("feature_dim")
    if not field or getattr(bb, "text_only", False) or want is None or have is None or int(want) == int(have):
        return None
    want, have = int(want), int(have)
    shards = f"the shards at {root}" if root is not None else "the shards"
    head = (f"{_who(bb)} expects {want}-d region features ({field}={want}) but {shards} have {have}-d features "
            f"(manifest.json feature_dim={have})")
    weights = getattr(bb, "image_weights", None)
    if weights:
        return (f"{head}: rebuild the shards with feature_dim={want} (the image embedding comes from {weights}, "
                f"so backbone.img_dim cannot change it).")
    return f"{head}: set backbone.img_dim={have} (or null to follow the shards), or rebuild the shards with feature_dim={want}."


def box_problem(bb) -> str | None:
    fn = getattr(bb, "box_input_dim", None)
    need = fn() if callable(fn) else None
    mode = getattr(bb, "box_mode", None)
    if need is None or getattr(bb, "text_only", False) or mode not in BOX_DIMS or BOX_DIMS[mode] == int(need):
        return None
    fits = [m for m, d in BOX_DIMS.items() if d == int(need)]
    fix = (f"set backbone.box_mode={fits[0]}" if fits else
           f"no box mode encodes {need}-d boxes ({', '.join(f'{m}: {d}-d' for m, d in BOX_DIMS.items())}); "
           f"use a model config whose box input takes {BOX_DIMS[mode]}")
    field = getattr(bb, "box_input_field", "box input")
    return (f"{_who(bb)} takes {need}-d boxes ({field}={need}) but its box mode {mode} encodes "
            f"{BOX_DIMS[mode]}-d boxes: {fix}.")


def _embeddings(bb):
    fn = getattr(bb, "text_embeddings", None)
    return fn() if callable(fn) else None


def vocab_problem(bb) -> str | None:
    emb = _embeddings(bb)
    words = getattr(emb, "word_embeddings", None)
    tok = getattr(bb, "tokenizer", None)
    if words is None or tok is None:
        return None
    n_tok, rows = len(tok), int(words.num_embeddings)
    if n_tok <= rows:
        return None
    where = (bb.describe().get("tokenizer") if hasattr(bb, "describe") else None) or getattr(tok, "name_or_path", "")
    return (f"the tokenizer at {where} has {n_tok} tokens but {_who(bb)} has {rows} word embeddings "
            f"(vocab_size={rows}): set backbone.tokenizer=DIR to the tokenizer the model was trained with.")


def _case_sample(vocab: dict, pick, n: int = 20) -> list[str]:
    words = sorted((t for t in vocab if t.isascii() and t.isalpha() and len(t) > 1 and pick(t)), key=vocab.get)
    return words[:n]


def case_problem(bb) -> str | None:
    """The tokenizer's letter case vs its vocabulary's, checked on up to 20 whole-word tokens (every one must fail)."""
    tok = getattr(bb, "tokenizer", None)
    get_vocab = getattr(tok, "get_vocab", None)
    if not callable(get_vocab):
        return None
    vocab = get_vocab()
    unk = getattr(tok, "unk_token_id", None)

    def ids(word: str) -> list[int]:
        return tok.convert_tokens_to_ids(tok.tokenize(word))

    where = (bb.describe().get("tokenizer") if hasattr(bb, "describe") else None) or getattr(tok, "name_or_path", "")
    cased = _case_sample(vocab, lambda t: t[0].isupper() and t[1:].islower() and t.lower() in vocab)
    if cased:  # "The" and "the" are different tokens: the vocabulary is cased
        if all(ids(w) != [vocab[w]] and ids(w.lower()) == [vocab[w.lower()]] for w in cased):
            return (f"the tokenizer at {where} lowercases its input but its vocabulary is cased (e.g. {cased[0]!r} and "
                    f"{cased[0].lower()!r} are different tokens), so {_who(bb)} would see every word lowercased: add "
                    f"the model's tokenizer_config.json (do_lower_case: false) to that directory, or set "
                    f"backbone.tokenizer=DIR to the tokenizer the model was trained with (UNITER: bert-base-cased).")
        return None
    lower = _case_sample(vocab, str.islower)
    if lower and unk is not None and all(unk in ids(w.capitalize()) for w in lower):
        return (f"the tokenizer at {where} keeps letter case but its vocabulary is uncased (no capitalised words), so "
                f"{_who(bb)} would see capitalised words as {tok.unk_token} (e.g. {lower[0].capitalize()!r}): set "
                f"backbone.tokenizer=DIR to the tokenizer the model was trained with (do_lower_case: true).")
    return None


def position_problem(bb) -> str | None:
    emb = _embeddings(bb)
    pos = getattr(emb, "position_embeddings", None)
    want = getattr(bb, "max_text_len", None)
    if pos is None or want is None:
        return None
    off = bb.position_offset() if callable(getattr(bb, "position_offset", None)) else 0
    rows = int(pos.num_embeddings)
    usable = rows - off
    if int(want) <= usable:
        return None
    extra = f", {off} reserved for padding" if off else ""
    return (f"backbone.max_text_len={int(want)} but {_who(bb)} has {usable} text positions "
            f"(max_position_embeddings={rows}{extra}): set backbone.max_text_len={usable} or less.")


#: Moses-tokenised, mixed case, punctuation, a clitic, digits, accents, CJK and an emoji
PROBE_WORDS = ("A man in a red T-shirt , who was n't there , rides 2 bikes past the Café in Zürich 東京 😀 .").split()


def tokenisation_problem(bb) -> str | None:
    """The collator's word-by-word ids of :data:`PROBE_WORDS` vs the tokenizer's ids of the whole sentence."""
    tok = getattr(bb, "tokenizer", None)
    if tok is None or not callable(tok):
        return None
    enc = InputEncoder(tok, max_text_len=100_000)
    got = enc.encode_text([list(PROBE_WORDS)])["input_ids"][0].tolist()
    want = list(tok(" ".join(PROBE_WORDS), verbose=False)["input_ids"])
    if got == want:
        return None
    where = (bb.describe().get("tokenizer") if hasattr(bb, "describe") else None) or getattr(tok, "name_or_path", "")
    show = getattr(tok, "convert_ids_to_tokens", None) or (lambda ids: ids)
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))

    def part(ids):  # from just before the first difference
        return " ".join(map(str, show(ids[max(i - 2, 0):i + 6])))
    return (f"the tokenizer at {where} ({type(tok).__name__}) does not tokenise a sentence as its words one by one: "
            f"the sentence {' '.join(PROBE_WORDS)!r} gives ... {part(want)!r} ... but word by word ... {part(got)!r} ..., "
            f"so {_who(bb)} cannot give each word its own token span: use a tokenizer whose pieces never cross a "
            f"space (WordPiece, byte-level BPE, SentencePiece with its pre-tokenizer splitting at spaces).")


def input_problems(bb, manifest: dict | None, root=None, regions: bool = True) -> list[str]:
    out = [vocab_problem(bb), case_problem(bb), position_problem(bb), tokenisation_problem(bb)]
    if regions:
        out = [feature_problem(bb, manifest or {}, root), box_problem(bb)] + out
    return [p for p in out if p]


def check_inputs(bb, manifest: dict | None, root=None, regions: bool = True) -> None:
    """Raise :class:`InputMismatchError` if the shards (``manifest``, read from ``root``) and the backbone do not
    fit; ``regions=False`` (sentence tasks) skips the feature-width and box checks."""
    problems = input_problems(bb, manifest, root, regions)
    if problems:
        raise InputMismatchError(" ".join(problems))


def check_saved_backbone(bb, identity: dict, config: dict | None, what: str = "prober checkpoint") -> None:
    """Refuse to load heads trained on another backbone: another weights checksum, or the same weights under
    another model config (:meth:`~value_pl.backbones.base.Backbone.config_differences`, naming the fields).
    Fields only one side records (another transformers version) and checkpoints written before the config was
    recorded are said, not refused."""
    mine = bb.describe() if hasattr(bb, "describe") else {}
    if identity.get("checksum") and mine.get("checksum") and identity["checksum"] != mine["checksum"]:
        why = ""
        if identity.get("img_dim") and mine.get("img_dim") and identity["img_dim"] != mine["img_dim"]:
            why = (f": its image embedding took {identity['img_dim']}-d region features, the shards read now have "
                   f"{mine['img_dim']}-d (a random image embedding follows the shards' width); evaluate on the "
                   f"shards it was trained on (data=... data.root=..., as in training)")
        raise ValueError(f"{what} was trained on backbone {identity.get('name')} with checksum "
                         f"{identity['checksum']}, but the backbone built now has checksum {mine['checksum']}{why}")
    if config and hasattr(bb, "config_differences"):
        diff, odd = bb.config_differences(config, "checkpoint")
        if diff:  # same weights, another computation: the heads were fitted to other features
            raise ValueError(f"{what} was trained on backbone {identity.get('name')} configured otherwise than the "
                             f"backbone built now: " + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                             + " (set the backbone config it was trained with)")
        if odd:
            log.warning("%s: backbone config field(s) %s recorded on one side only (another transformers "
                        "version?): not compared", what, odd[:8])
    elif mine.get("config_sha256"):
        log.warning("%s predates the backbone config record: its backbone's model config (layer_norm_eps, "
                    "attention, ...) cannot be checked against the one built now", what)
