"""Flickr30k Entities -> shards for the visual-coreference tasks (VCD, VCC).

Inputs (``configs/dataset/flickr30k.yaml``): ``Sentences/<id>.txt``, ``Annotations/<id>.xml``, the
official split lists ``train.txt``/``val.txt``/``test.txt``, ``UNRELATED_CAPTIONS`` (optional) and the
detected region features (:mod:`value_pl.datasets.regions`; optionally features extracted for the
annotated boxes, ``annotated_features``).

One sample = one caption with its image's regions. Rules:

* **Markup**: ``[/EN#<chain>/<type>[/<type>...] w1 w2 ...]``; words are the space-separated tokens
  without markup, a phrase's ``span`` is ``[start, end)`` over them.
* **VCC label of a phrase** (``label``): its *first listed* type among the 8 coarse types
  (people, clothing, bodyparts, animals, vehicles, instruments, scene, other), so
  ``/bodyparts/people`` -> ``bodyparts``. ``notvisual`` phrases (chain id 0, each its own chain even
  though they share the id "0") are kept in ``phrases`` with label ``notvisual`` and get no pairs.
* **Boxes**: PASCAL-VOC 1-based inclusive pixel coordinates -> ``x1 = xmin - 1, y1 = ymin - 1,
  x2 = xmax, y2 = ymax``. An object's several ``<name>`` tags make one box serve several chains;
  ``nobndbox``/``scene`` objects have no box (their chains are known but unboxed).
* **Regions**: :func:`value_pl.datasets.regions.combine_regions` (IoU match to detections, or supplied
  annotated-box features, up to ``max_regions``).
* **Region names** (``regions.names``, what a region is; the control tasks' region identity): the
  coarse types of the chains the region carries, collected from all captions of the image (Flickr30k
  has no object names, and a phrase names the same region differently in each caption), e.g.
  ``["people"]`` or ``["bodyparts", "people"]``; ``["<unknown>"]`` for a detection that carries no chain.
* **Pairs**: for each visual phrase whose chain has regions: VCD positives ``(phrase, region of its
  chain, "coref")`` and the same number of negatives ``(phrase, region outside its chain,
  "not_coref")`` sampled without replacement (seeded by seed + sample key), first among the regions of
  other chains (annotated objects, as every positive is), then among detections that carry no chain
  (``vcd_negatives: annotated_first``; ``uniform`` samples all regions outside the chain alike, so that
  "is this an annotated object" predicts the label; ``manifest.json`` ``vcd_negatives.sources`` counts the
  negatives of each kind); VCC ``(phrase, region of its chain, label)`` for every positive (VCC has no
  negatives). A region that overlaps any box of
  the phrase's own chain at IoU >= ``iou_threshold`` (a near-duplicate detection of the gold object,
  normal for BUTD's overlapping boxes) is never a negative; each such (phrase, region) is counted in
  ``manifest.json`` ``excluded.vcd_negative_overlaps_chain``.

Bad records, skipped and counted in ``manifest.json`` (``strict=true`` raises instead, naming file and line):
``malformed_markup`` (caption), ``not_utf8`` (caption: a line that is not UTF-8), ``empty_caption`` (caption),
``unknown_chain`` (phrase whose chain id is not in the XML), ``malformed_xml`` (image), ``xml_without_boxes``
(image), ``missing_sentences``/``missing_annotation``/``empty_sentences`` (image), ``no_features`` (image),
``nan_features``/``corrupt_features`` (image), ``box_outside_image``/``box_zero_area`` (box). Outcomes that are
counted but never raise (real data has them): ``unrelated_caption`` (caption, the known list),
``annotated_box_unmatched`` (box without a region: normal with detector features), ``vcd_negatives_short``
(negatives missing because too few regions lie outside the chain). A feature dimension other than
``feature_dim`` always raises.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..data.schema import COREF_TYPES, SCHEMA_VERSION, region_names
from .common import (BuildError, CaptionOverlap, Issues, clean_box, close_readers, open_region_features, progress,
                     read_features, read_id_list, regions_manifest, sample_rng, text_lines)
from .regions import Combined, combine_regions
from .writer import ShardSetWriter

PHRASE_HEAD = re.compile(r"^\[/EN#(\d+)((?:/[A-Za-z_]+)+)$")
VISUAL_TYPES = set(COREF_TYPES)


class MarkupError(ValueError):
    pass


def parse_caption(line: str) -> tuple[list[str], list[dict]]:
    """One Sentences line -> (words, phrases). Raises :class:`MarkupError` on malformed markup."""
    words: list[str] = []
    phrases: list[dict] = []
    cur = None
    for tok in line.split():
        if tok.startswith("["):
            if cur is not None:
                raise MarkupError(f"phrase opened inside phrase at {tok!r}")
            m = PHRASE_HEAD.match(tok)
            if not m:
                raise MarkupError(f"bad phrase header {tok!r} (expected [/EN#<chain>/<type>...)")
            chain = str(int(m.group(1)))
            types = m.group(2).strip("/").split("/")
            for t in types:
                if t not in VISUAL_TYPES and t != "notvisual":
                    raise MarkupError(f"unknown phrase type {t!r} in {tok!r}")
            if chain == "0" and any(t != "notvisual" for t in types):
                raise MarkupError(f"chain id 0 is reserved for notvisual phrases ({tok!r})")
            cur = {"start": len(words), "chain": chain, "types": types}
            continue
        if tok.endswith("]") and cur is not None:
            w = tok[:-1]
            if not w:
                raise MarkupError("empty word before ']'")
            words.append(w)
            visual = [t for t in cur["types"] if t in VISUAL_TYPES]
            phrases.append({"span": [cur["start"], len(words)], "chain": cur["chain"], "types": cur["types"],
                            "label": visual[0] if visual else "notvisual"})
            cur = None
            continue
        if "]" in tok and cur is None:
            raise MarkupError(f"']' outside a phrase in {tok!r}")
        if tok.startswith("[/EN#") or "[/EN#" in tok:
            raise MarkupError(f"bad phrase header {tok!r}")
        words.append(tok)
    if cur is not None:
        raise MarkupError(f"phrase [/EN#{cur['chain']}/... is never closed")
    for p in phrases:
        if p["span"][1] <= p["span"][0]:
            raise MarkupError("empty phrase")
    return words, phrases


def parse_annotation(path: Path):
    """Annotations XML -> (width, height, boxes [(box 0-based px, [chain ids])], chains set, unboxed chains).

    Raises :class:`BuildError` (naming the file) on malformed XML.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise BuildError(f"{path}: malformed XML ({e})") from None
    size = root.find("size")
    try:
        W = float(size.findtext("width"))
        H = float(size.findtext("height"))
    except (AttributeError, TypeError, ValueError):
        raise BuildError(f"{path}: <size> lacks a numeric width/height") from None
    if W <= 0 or H <= 0:
        raise BuildError(f"{path}: image size {W}x{H} is not positive")
    boxes, chains, unboxed = [], set(), set()
    for k, obj in enumerate(root.findall("object")):
        texts = [(n.text or "").strip() for n in obj.findall("name")]
        other = [t for t in texts if t and not t.isdigit()]
        if other:  # never dropped silently: the object's box would lose a chain, or serve a wrong one
            raise BuildError(f"{path}: <object> #{k + 1} has a <name> that is not a chain id: {other[0]!r}")
        names = [str(int(t)) for t in texts if t]
        if not names:
            raise BuildError(f"{path}: <object> #{k + 1} has no numeric <name> (chain id)")
        chains.update(names)
        bb = obj.find("bndbox")
        if bb is None:
            unboxed.update(names)  # nobndbox / scene flags
            continue
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise BuildError(f"{path}: <object> #{k + 1} has a <bndbox> without numeric xmin/ymin/xmax/ymax") from None
        boxes.append(([xmin - 1.0, ymin - 1.0, xmax, ymax], names, k + 1))
    return W, H, boxes, chains, unboxed


def read_unrelated(path) -> set[tuple[str, int]]:
    """``UNRELATED_CAPTIONS``: ``<image id> <sentence number (1-based)>`` lines, ``#`` comments."""
    out = set()
    if path is None:
        return out
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = s.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise BuildError(f"{path}:{ln}: expected '<image id> <sentence number>', got {s!r}")
            out.add((parts[0], int(parts[1])))
    return out


#: ``vcd_negatives`` settings: negatives drawn first among other chains' regions, or uniformly among all regions
VCD_NEGATIVES = ("annotated_first", "uniform")


def caption_pairs(phrases: list[dict], comb: Combined, rng: np.random.Generator, issues: Issues, where: str,
                  iou_threshold: float = 0.5, negatives: str = "annotated_first", sources: dict | None = None):
    """VCD (balanced) and VCC pairs of one caption.

    A region that overlaps any annotated box of the phrase's own chain at IoU >= ``iou_threshold`` (a
    second detection of the gold object) is never a negative for that phrase; such regions are counted
    in the manifest (``excluded.vcd_negative_overlaps_chain``, one per phrase and region).

    ``negatives="annotated_first"``: negatives are sampled first among the regions of *other* chains (annotated
    objects, like every positive), then among the detections that carry no chain; ``"uniform"``: among all
    regions outside the chain alike -- then most negatives are bare detections and "is this region an annotated
    object" alone predicts the label (docs/datasets.md). ``sources`` (optional) counts the negatives taken from
    each (``annotated``, ``detected``).
    """
    if negatives not in VCD_NEGATIVES:
        raise BuildError(f"dataset.vcd_negatives: one of {', '.join(VCD_NEGATIVES)}, got {negatives!r}")
    vcd, vcc = [], []
    R = len(comb.boxes)
    for p, ph in enumerate(phrases):
        if ph["label"] == "notvisual":
            continue
        pos = [r for r in range(R) if ph["chain"] in comb.tags[r]]
        if not pos:
            continue
        gold = comb.overlapping(comb.gold_boxes(ph["chain"]), iou_threshold) - set(pos)
        issues.exclude("vcd_negative_overlaps_chain", len(gold))
        outside = [r for r in range(R) if ph["chain"] not in comb.tags[r] and r not in gold]
        k = min(len(pos), len(outside))
        if k < len(pos):
            issues.count("vcd_negatives_short", len(pos) - k)
        if negatives == "uniform":  # the rule of shards built before 2026-11-27, draw for draw
            neg = [int(x) for x in rng.choice(outside, size=k, replace=False)] if k else []
        else:
            neg = []
            for tier in ([r for r in outside if comb.tags[r]], [r for r in outside if not comb.tags[r]]):
                need = k - len(neg)
                if need <= 0:
                    break
                neg += tier if len(tier) <= need else [int(x) for x in rng.choice(tier, size=need, replace=False)]
        neg = sorted(neg)
        if sources is not None:
            n_ann = sum(1 for r in neg if comb.tags[r])
            sources["annotated"] = sources.get("annotated", 0) + n_ann
            sources["detected"] = sources.get("detected", 0) + len(neg) - n_ann
        for r in pos:
            vcd.append([p, r, "coref"])
            vcc.append([p, r, ph["label"]])
        for r in neg:
            vcd.append([p, r, "not_coref"])
    return vcd, vcc


def chain_types(lines: list[str]) -> dict[str, set[str]]:
    """Chain id -> the coarse types its phrases carry, over all captions of the image (malformed ones ignored:
    the caption pass reports them)."""
    out: dict[str, set[str]] = {}
    for line in lines:
        try:
            _, phrases = parse_caption(line)
        except MarkupError:
            continue
        for ph in phrases:
            if ph["chain"] != "0":
                out.setdefault(ph["chain"], set()).update(t for t in ph["types"] if t in VISUAL_TYPES)
    return out


def region_names_of(comb: Combined, types: dict[str, set[str]]) -> list[list[str]]:
    """``regions.names``: the coarse types of the chains a region carries (``<unknown>`` if none)."""
    return [region_names(t for c in tags for t in types.get(c, ())) for tags in comb.tags]


def _regions_for_image(iid, W, H, boxes, det_reader, sup_reader, cfg, issues, where):
    ann_boxes, ann_tags = [], []
    for box, names, k in boxes:
        b, why = clean_box(box, W, H)
        if b is None:
            issues.bad(why, f"{where} <object> #{k}", f"box {box} ({why.replace('_', ' ')}, image {W:g}x{H:g})")
            continue
        ann_boxes.append(b)
        ann_tags.append(names)
    det = read_features(det_reader, iid, W, H, issues, "detected")
    if det is None:
        return None
    sup = None
    if sup_reader is not None:
        sup = read_features(sup_reader, iid, W, H, issues, "annotated")
        if sup is None:
            return None
    comb = combine_regions(ann_boxes, ann_tags, det, iou_threshold=cfg["iou_threshold"],
                           max_regions=cfg["max_regions"], supplied=sup,
                           supplied_iou=cfg.get("supplied_iou", 0.9))
    unmatched = sum(1 for r in comb.ann_region if r is None)
    if unmatched:
        issues.count("annotated_box_unmatched", unmatched)
    return comb


def iter_split(image_ids, cfg, det_reader, sup_reader, unrelated, issues: Issues, seed: int, bar: bool, split: str,
               sources: dict | None = None):
    sent_dir, ann_dir = Path(cfg["sentences"]), Path(cfg["annotations"])
    for iid in progress(image_ids, bar, desc=f"flickr30k {split}", unit="img"):
        spath, apath = sent_dir / f"{iid}.txt", ann_dir / f"{iid}.xml"
        if not spath.exists():
            issues.bad("missing_sentences", str(spath), "no Sentences file for this image")
            continue
        if not spath.stat().st_size:  # (cut to nothing, e.g. by an interrupted copy: the image would give no sample)
            issues.bad("empty_sentences", str(spath), "the Sentences file holds no caption")
            continue
        if not apath.exists():
            issues.bad("missing_annotation", str(apath), "no Annotations file for this image")
            continue
        try:
            W, H, boxes, chains, unboxed = parse_annotation(apath)
        except BuildError as e:
            issues.bad("malformed_xml", str(apath), str(e).split(": ", 1)[1])
            continue
        if not boxes:
            issues.bad("xml_without_boxes", str(apath), "no <object> has a <bndbox>")
            continue
        comb = _regions_for_image(iid, W, H, boxes, det_reader, sup_reader, cfg, issues, str(apath))
        if comb is None:
            continue
        feats16 = comb.feats.astype(np.float16)
        lines = []
        for ln, line, problem in text_lines(spath):
            if problem:
                issues.bad("not_utf8", f"{spath}:{ln}", problem)
            lines.append(line)
        names = region_names_of(comb, chain_types([x for x in lines if x is not None]))
        for ci, line in enumerate(lines):
            where = f"{spath}:{ci + 1}"
            if line is None:  # counted above
                continue
            if (iid, ci + 1) in unrelated:
                issues.count("unrelated_caption")
                continue
            if not line.strip():
                issues.bad("empty_caption", where, "empty caption")
                continue
            try:
                words, phrases = parse_caption(line)
            except MarkupError as e:
                issues.bad("malformed_markup", where, str(e))
                continue
            if not words:
                issues.bad("empty_caption", where, "caption has no words")
                continue
            for ph in phrases:
                if ph["chain"] != "0" and ph["chain"] not in chains:
                    issues.bad("unknown_chain", where, f"chain id {ph['chain']} is not in {apath.name}")
                    ph["unknown_chain"] = True
            key = f"f30k_{iid}_{ci}"
            usable = [dict(ph, label="notvisual") if ph.pop("unknown_chain", False) else ph for ph in phrases]
            vcd, vcc = caption_pairs(usable, comb, sample_rng(seed, key), issues, where, cfg["iou_threshold"],
                                     cfg.get("vcd_negatives", "annotated_first"), sources)
            meta = {
                "schema": SCHEMA_VERSION,
                "image": {"id": str(iid), "width": W, "height": H},
                "words": words,
                "phrases": phrases,
                "regions": {"boxes": comb.boxes, "chains": comb.tags, "source": comb.source, "names": names},
                "pairs": {"vcd": vcd, "vcc": vcc},
                "provenance": {"dataset": "flickr30k_entities", "image_id": str(iid), "caption_index": ci,
                               "split": split, "unboxed_chains": sorted(unboxed - {t for r in comb.tags for t in r},
                                                                       key=int)},
            }
            yield key, meta, feats16


def build_flickr30k(cfg: dict, *, out, seed: int = 0, maxcount: int = 1000, maxsize: float = 256e6,
                    feature_dim: int | None = 2048, strict: bool = False, progress_bar: bool = True,
                    hash_inputs: bool = True) -> dict:
    split_files = cfg["splits"]
    ids = {s: read_id_list(p) for s, p in split_files.items()}
    seen: dict[str, str] = {}
    for s, lst in ids.items():
        for i in lst:
            if i in seen:
                raise BuildError(f"{split_files[s]}: image id {i} is also in split {seen[i]} ({split_files[seen[i]]})")
            seen[i] = s
    unrelated = read_unrelated(cfg.get("unrelated"))
    det, sup = open_region_features(cfg, feature_dim)
    w = ShardSetWriter(out, "flickr30k_entities", version=str(cfg.get("version", "1")), maxcount=maxcount,
                       maxsize=maxsize, feature_dim=feature_dim)
    issues = Issues(w, strict)
    try:
        if hash_inputs:
            for name in ("sentences", "annotations", "unrelated"):
                if cfg.get(name):
                    w.add_input(cfg[name])
            for p in split_files.values():
                w.add_input(p)
            for r in (det, sup):
                if r is not None:
                    for p in r.input_paths():
                        w.add_input(p)
        w.labels = {"vcd": ["coref", "not_coref"], "vcc": list(COREF_TYPES)}
        sources = {"annotated": 0, "detected": 0}
        negatives = cfg.get("vcd_negatives", "annotated_first")
        if negatives not in VCD_NEGATIVES:  # before any image is read
            raise BuildError(f"dataset.vcd_negatives: one of {', '.join(VCD_NEGATIVES)}, got {negatives!r}")
        overlap = CaptionOverlap()
        for split, lst in ids.items():
            w.write_split(split, overlap.wrap(split, iter_split(lst, cfg, det, sup, unrelated, issues, seed,
                                                                progress_bar, split, sources)))
        w.extra = {
            "seed": seed,
            "caption_overlap": overlap.report(),
            "vcd_negatives": {"rule": negatives, "sources": sources},
            "regions": regions_manifest(cfg, det, sup),
            "vcc_label_rule": "first listed coarse type of the phrase (notvisual phrases: no pairs)",
            "skipped_examples": issues.examples,
        }
        return w.close()
    except BaseException:
        w.abort()
        raise
    finally:
        close_readers(det, sup)

