"""SentEval probing files -> shards, and derived SentEval-style tasks from any caption corpus.

**SentEval** (``configs/dataset/senteval.yaml``): ``data/probing/<file>.txt`` with lines
``tr|va|te <TAB> label <TAB> sentence`` (Moses-tokenised; words = the sentence split on spaces).
Splits tr/va/te -> train/val/test. One shard set per task under ``<out>/<task>``; each sentence is
one sample with no regions (features ``(0, feature_dim)``, image 1x1 placeholder) and
``sentence_labels: {task: label}``. Task names (file): sentlen (sentence_length), wordcontent
(word_content), treedepth (tree_depth), topconst (top_constituents), bshift (bigram_shift),
tense (past_present), subjnum (subj_number), objnum (obj_number), somo (odd_man_out),
coordinv (coordination_inversion); ``oddmanout`` (SentEval's own name for SOMO) reads somo's file into a
shard set and labels of its own name, which ``task=oddmanout`` reads.

Bad lines raise naming file and line (wrong number of tab fields, unknown split tag, empty label, not UTF-8);
an empty sentence is a counted skip ``empty_caption`` (``strict=true``: raises).

**Derived tasks** (``configs/dataset/senteval_derived.yaml``): NOT SentEval's data. From a caption
corpus (a text file with one caption a line, or a Flickr30k Entities ``Sentences/`` directory whose
markup is stripped), with seeded, documented rules:

* ``sentlen``: the number of words binned by ``sentlen_bins`` (edges, label = bin index);
  captions outside the bins are skipped (``sentlen_out_of_range``).
* ``bshift``: with probability 1/2 two adjacent words (neither the final punctuation) are swapped;
  labels ``I`` (inverted) / ``O`` (original), as in SentEval's bigram_shift.
* ``coordinv``: captions with a coordinating conjunction (and, but, or, yet, so, while) that has at
  least two words on each side; with probability 1/2 the two conjuncts swap places (the final
  punctuation stays last); labels ``I``/``O``. Captions without one: skip ``no_coordination``.
* ``bshift``/``coordinv``: the first word loses its sentence-initial capital (``A`` -> ``a``; all-capital
  words such as ``TV`` are kept) in BOTH classes. Otherwise an inverted caption would start with a
  lower-case word and carry the capitalised one inside (``a dog runs and A man sits .``), so a cased
  model could read the label off the casing alone.

Splits: each caption goes to train/val/test by a seeded hash with the fractions in ``splits``.
Duplicate captions are kept once (skip ``duplicate_caption``; for bshift/coordinv, captions that differ only in
the first word's initial capital are duplicates).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import BuildError, Issues, progress, sample_rng, stable_score, text_lines
from ..data.schema import SCHEMA_VERSION
from .writer import ShardSetWriter

TASK_FILES = {
    "sentlen": "sentence_length.txt",
    "wordcontent": "word_content.txt",
    "treedepth": "tree_depth.txt",
    "topconst": "top_constituents.txt",
    "bshift": "bigram_shift.txt",
    "tense": "past_present.txt",
    "subjnum": "subj_number.txt",
    "objnum": "obj_number.txt",
    "somo": "odd_man_out.txt",
    "coordinv": "coordination_inversion.txt",
}
TASK_ALIASES = {"oddmanout": "somo"}
SPLIT_TAGS = {"tr": "train", "va": "val", "te": "test"}
DERIVED_TASKS = ("sentlen", "bshift", "coordinv")
UNCAPITALISED_TASKS = ("bshift", "coordinv")  # derive() lower-cases the first word's initial capital
CONJUNCTIONS = ("and", "but", "or", "yet", "so", "while")
PUNCT = {".", "!", "?", ";", ","}


def text_sample(key: str, words: list[str], task: str, label: str, feature_dim: int, prov: dict):
    meta = {
        "schema": SCHEMA_VERSION,
        "image": {"id": "none", "width": 1, "height": 1},
        "words": words,
        "phrases": [],
        "regions": {"boxes": [], "chains": [], "source": [], "names": []},
        "pairs": {},
        "sentence_labels": {task: str(label)},
        "provenance": prov,
    }
    return key, meta, np.zeros((0, feature_dim), np.float16)


def parse_senteval(path, issues: Issues) -> dict[str, list[tuple[int, str, list[str]]]]:
    """-> {split: [(line number, label, words)]}."""
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for ln, line, problem in text_lines(path):
        if problem:
            raise BuildError(f"{path}:{ln}: {problem}")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise BuildError(f"{path}:{ln}: expected 3 tab-separated fields (split, label, sentence), "
                             f"got {len(parts)}")
        tag, label, sent = parts
        if tag not in SPLIT_TAGS:
            raise BuildError(f"{path}:{ln}: unknown split tag {tag!r} (expected tr, va or te)")
        if not label.strip():
            raise BuildError(f"{path}:{ln}: empty label")
        words = sent.split()
        if not words:
            issues.bad("empty_caption", f"{path}:{ln}", "empty sentence")
            continue
        out[SPLIT_TAGS[tag]].append((ln, label.strip(), words))
    return out


def _task_name(t: str) -> str:
    t = str(t).lower()
    if TASK_ALIASES.get(t, t) not in TASK_FILES:
        raise BuildError(f"unknown SentEval task {t!r} (use {', '.join([*TASK_FILES, *TASK_ALIASES])})")
    return t


def _task_file(task: str) -> str:
    """The SentEval file of ``task`` (an alias such as ``oddmanout`` reads its task's file)."""
    return TASK_FILES[TASK_ALIASES.get(task, task)]


def build_senteval(cfg: dict, *, out, seed: int = 0, maxcount: int = 1000, maxsize: float = 256e6,
                   feature_dim: int | None = 2048, strict: bool = False, progress_bar: bool = True,
                   hash_inputs: bool = True) -> list[dict]:
    tasks = cfg.get("tasks") or list(TASK_FILES)
    tasks = [_task_name(t) for t in tasks]
    d = Path(cfg["dir"])
    mans = []
    D = int(feature_dim or 2048)
    for task in tasks:
        path = d / _task_file(task)
        if not path.exists():
            raise BuildError(f"{path}: SentEval file for task {task} not found")
        w = ShardSetWriter(Path(out) / task, f"senteval_{task}", version=str(cfg.get("version", "1")),
                           maxcount=maxcount, maxsize=maxsize, feature_dim=D)
        issues = Issues(w, strict)
        try:
            if hash_inputs:
                w.add_input(path)
            data = parse_senteval(path, issues)
            labels = sorted({lab for lst in data.values() for _, lab, _ in lst}, key=_label_key)
            w.labels = {task: labels}
            for split, lst in data.items():
                it = (text_sample(f"se_{task}_{ln:08d}", words, task, lab, D,
                                  {"dataset": "senteval", "task": task, "file": _task_file(task), "line": ln})
                      for ln, lab, words in progress(lst, progress_bar, desc=f"senteval {task} {split}"))
                w.write_split(split, it)
            w.extra = {"task": task, "source": "SentEval probing data", "skipped_examples": issues.examples}
            mans.append(w.close())
        except BaseException:
            w.abort()
            raise
    return mans


def _label_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


# --------------------------------------------------------------------------------------- derived
def read_captions(path) -> list[tuple[str, list[str]]]:
    """[(where, words)] from a text file (one caption a line) or a Flickr30k ``Sentences/`` dir."""
    p = Path(path)
    out = []
    if p.is_dir():
        from .flickr30k import MarkupError, parse_caption

        for f in sorted(p.glob("*.txt")):
            for ln, line, problem in text_lines(f):
                if problem:
                    raise BuildError(f"{f}:{ln}: {problem}")
                try:
                    words, _ = parse_caption(line)
                except MarkupError as e:
                    raise BuildError(f"{f}:{ln}: {e}") from None
                out.append((f"{f.name}:{ln}", words))
    else:
        for ln, line, problem in text_lines(p):
            if problem:
                raise BuildError(f"{p}:{ln}: {problem}")
            out.append((f"{p.name}:{ln}", line.split()))
    return out


def uncapitalise_first(words: list[str]) -> list[str]:
    """``words`` with the first word's sentence-initial capital lower-cased (``A`` -> ``a``, ``Two`` -> ``two``);
    all-capital words of two or more letters (``TV``, ``USA``) are kept."""
    if not words or not words[0][:1].isupper() or (len(words[0]) > 1 and words[0].isupper()):
        return words
    return [words[0][:1].lower() + words[0][1:]] + list(words[1:])


def derive(task: str, words: list[str], rng: np.random.Generator, bins: list[int]):
    """(label, words) or (None, reason)."""
    if task == "sentlen":
        n = len(words)
        for i in range(len(bins) - 1):
            if bins[i] <= n < bins[i + 1]:
                return str(i), words
        return None, "sentlen_out_of_range"
    # both classes alike: the sentence-initial capital would otherwise mark the moved first word (module docstring)
    words = uncapitalise_first(words)
    body = words[:-1] if words and words[-1] in PUNCT else words
    tail = words[len(body):]
    if task == "bshift":
        if len(body) < 2:
            return None, "too_short"
        if rng.random() < 0.5:
            return "O", words
        cands = [i for i in range(len(body) - 1) if body[i] != body[i + 1]]
        if not cands:
            return "O", words
        i = int(rng.choice(cands))
        nb = body[:i] + [body[i + 1], body[i]] + body[i + 2:]
        return "I", nb + tail
    if task == "coordinv":
        idx = [i for i, t in enumerate(body) if t.lower() in CONJUNCTIONS and 2 <= i <= len(body) - 3]
        if not idx:
            return None, "no_coordination"
        i = idx[0]
        left, conj, right = body[:i], body[i], body[i + 1:]
        if left and left[-1] == ",":
            left = left[:-1]
        if rng.random() < 0.5:
            return "O", left + [conj] + right + tail
        return "I", right + [conj] + left + tail
    raise BuildError(f"unknown derived task {task!r} (use {', '.join(DERIVED_TASKS)})")


def build_senteval_derived(cfg: dict, *, out, seed: int = 0, maxcount: int = 1000, maxsize: float = 256e6,
                           feature_dim: int | None = 2048, strict: bool = False, progress_bar: bool = True,
                           hash_inputs: bool = True) -> list[dict]:
    tasks = list(cfg.get("tasks") or DERIVED_TASKS)
    bins = list(cfg.get("sentlen_bins") or [1, 8, 10, 12, 14, 17, 1000])
    fr = dict(cfg.get("splits") or {"train": 0.8, "val": 0.1, "test": 0.1})
    tot = sum(fr.values())
    caps = read_captions(cfg["captions"])
    D = int(feature_dim or 2048)
    mans = []
    for task in tasks:
        if task not in DERIVED_TASKS:
            raise BuildError(f"unknown derived task {task!r} (use {', '.join(DERIVED_TASKS)})")
        w = ShardSetWriter(Path(out) / task, f"derived_{task}", version=str(cfg.get("version", "1")),
                           maxcount=maxcount, maxsize=maxsize, feature_dim=D)
        issues = Issues(w, strict)
        try:
            if hash_inputs:
                w.add_input(cfg["captions"])
            per_split: dict[str, list] = {s: [] for s in fr}
            seen = set()
            for i, (where, words) in enumerate(caps):
                if not words:
                    issues.bad("empty_caption", where, "empty caption")
                    continue
                # "A man ..." and "a man ..." are one input once the first word is uncapitalised: one caption, one split
                t = tuple(uncapitalise_first(words) if task in UNCAPITALISED_TASKS else words)
                if t in seen:
                    issues.count("duplicate_caption")
                    continue
                seen.add(t)
                lab, new = derive(task, words, sample_rng(seed, task, i), bins)
                if lab is None:
                    issues.count(new)
                    continue
                u, acc, split = stable_score(seed, "split", " ".join(t)) / 2.0 ** 64, 0.0, list(fr)[-1]
                for s, f in fr.items():
                    acc += f / tot
                    if u < acc:
                        split = s
                        break
                per_split[split].append(text_sample(
                    f"dv_{task}_{i:08d}", new, task, lab, D,
                    {"dataset": "derived", "task": task, "source": where, "derived": True}))
            labels = sorted({s[1]["sentence_labels"][task] for lst in per_split.values() for s in lst},
                            key=_label_key)
            if task == "sentlen":
                labels = [str(i) for i in range(len(bins) - 1)]
            elif task in ("bshift", "coordinv"):
                labels = ["I", "O"]
            w.labels = {task: labels}
            for split, lst in per_split.items():
                w.write_split(split, progress(lst, progress_bar, desc=f"derived {task} {split}"))
            w.extra = {"task": task, "derived": True,
                       "note": "derived from a caption corpus by value-pl, not SentEval's own data",
                       "rules": {"sentlen_bins": bins, "conjunctions": list(CONJUNCTIONS),
                                 "first_word_uncapitalised": task in UNCAPITALISED_TASKS},
                       "skipped_examples": issues.examples}
            mans.append(w.close())
        except BaseException:
            w.abort()
            raise
    return mans
