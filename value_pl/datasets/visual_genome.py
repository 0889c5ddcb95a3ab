"""Visual Genome -> shards for the visual-relation tasks (VRI, VRC), and the caption-mismatch variant.

Inputs (``configs/dataset/vg.yaml``): ``region_graphs.json`` (each dense caption -- a region with its
``phrase`` -- with the ``objects`` and ``relationships`` it mentions), ``image_data.json`` (image
sizes), optionally v1.4 ``objects.json`` (only to resolve ids through ``merged_object_ids``), and the
detected region features (:mod:`value_pl.datasets.regions`).

**Memory.** The JSON files are streamed (:func:`value_pl.datasets.common.iter_json_array`; readers in :mod:`value_pl.datasets.vg_graphs`), one image at
a time, in two passes over ``region_graphs.json``. Held in memory: ``image_data`` (~108k small
records), one compact record per candidate relation (pass 1; ~1.5M for full VG, ~0.3 GB), the selected
captions with their objects and, once per image, the gold boxes of all the image's relations (pass 2; bounded
by K x 15,000 relations, ~0.5-1 GB), and, only when
``objects`` is given, the v1.4 object boxes (~3.8M objects, ~1.5 GB). 4 GB of RAM is enough.

Rules (VALUE Sec. 3.4):

* Relations are tied to their caption through the region graph: ``subject_id``/``object_id`` are
  resolved among the region's own ``objects`` (v1.2 ids), then through those objects'
  ``merged_object_ids`` (v1.4 objects), then, if ``objects`` is given, among the image's v1.4
  objects and their ``merged_object_ids``. Unresolved ids: skip ``relation_unresolved``.
* Predicates are normalised: lower case, whitespace collapsed; then the optional alias table
  (``aliases: basic`` = :data:`BASIC_ALIASES`, or a mapping; default none, as in the paper, which
  keeps e.g. ``holds`` and ``holding`` apart). Identical (predicate, subject, object) triples within
  one caption count once, the subject and object compared by object id and by box (VG v1.2 holds duplicate
  objects: other ids, the same box; counted: ``excluded.relation_duplicate``), and so do relations whose boxes
  land on the same detected regions (``excluded.vrc_duplicate_region_pair``).
* The K most frequent predicates (``top_k``, default 32; ties by name) over all images of the splits (with
  ``split_files``, an image in no split file is skipped in pass 1, ``image_not_in_split``: it neither ranks
  predicates nor takes a place under the caps, so ``predicates[p].selected`` is what the shards hold, less
  the relations later counted as skips, e.g. ``relation_box_unmatched``, or as ``vrc_duplicate_region_pair``);
  per caption at most ``max_same_predicate_per_caption`` (5) relations of one predicate; per predicate at most
  ``max_pairs_per_predicate`` (15,000) relations. Both caps keep the relations with the lowest
  seeded hash score (deterministic, order-independent random sampling). The chance levels (uniform
  1/K and the majority class per split) are in the manifest (``chance``).
* One sample = one caption (words = the phrase tokenised) of one image with a selected relation.
  Annotated boxes = the caption's region-graph objects (VG ``x, y, w, h`` -> ``x1, y1, x2, y2``),
  combined with detected regions by :func:`value_pl.datasets.regions.combine_regions`.
  VRC pairs ``(subject region, object region, predicate)``; VRI positives the same region pairs
  ``"related"`` (once per region pair) and as many negatives ``"unrelated"``: ordered region pairs
  without any relation of the caption in either direction, sampled first among pairs of annotated
  regions, then among the rest (seeded by seed + sample key). A region pair that is, up to IoU >=
  ``iou_threshold`` with the gold boxes, a related pair (near-duplicate detections of a related
  subject and object) is never a negative (counted: ``excluded.vri_negative_overlaps_related``), nor is a
  pair of two boxes of one object: a detection at IoU >= ``iou_threshold`` with the other region, unless both are
  annotated objects (counted: ``excluded.vri_negative_same_object``). Nor is a pair that another caption of the
  same image relates: VG relations belong to one region graph, but a sample's regions hold objects and detections
  of the whole image. Every relation of the image (all its region graphs, any predicate, also those of captions
  with an empty phrase; resolved as above, to their gold boxes) is mapped to the sample's regions at IoU >=
  ``iou_threshold`` with its subject and object boxes, and those region pairs, in both directions, are never
  negatives (counted: ``excluded.vri_negative_related_in_image``).
  Phrases are empty (no VCD/VCC).
* ``regions.names`` (what a region is; the control tasks' identity): the names of the objects the
  region carries -- ``names[0]`` (v1.4/``objects.json``) or ``name`` (region graphs), lower case,
  whitespace collapsed -- and ``regions.synsets`` their synsets; ``["<unknown>"]`` for a detection
  that carries no object. So the VRI/VRC control type of a pair is e.g. ``rel:man|hat``.
* Splits: ``split_files`` (image-id lists) or the fractions in ``splits`` by a seeded hash of the
  image id.
* ``variant: mismatch``: identical regions and pairs, but each sample's words are a caption of
  another image of the same split: image groups are put in a seeded order and group ``g`` takes the
  captions of group ``g + 1`` (cyclically; caption ``j`` -> ``j mod n``). Provenance records the source.

Skips (``strict=true`` raises instead, naming file and record): ``image_not_in_split`` (image; counted, never
raised: the split files choose it), ``no_image_data`` (image),
``empty_caption`` (caption), ``relation_unresolved``, ``relation_self``, ``relation_empty_predicate``,
``box_outside_image``/``box_zero_area`` (per relation with such a box), ``object_box_outside_image``/
``object_box_zero_area`` (per object of a selected caption left out of its annotated regions),
``relation_box_unmatched``, ``relation_same_region`` (subject and object on one detected region),
``no_features``/``nan_features``/
``corrupt_features`` (image), ``vri_negatives_short``, ``mismatch_single_image``. Duplicate image ids
in ``region_graphs.json`` or ``image_data.json``, and duplicate region ids within an image, raise.
"""
from __future__ import annotations


import numpy as np

from ..data.schema import SCHEMA_VERSION, region_names
from .common import (BuildError, CaptionOverlap, Issues, clean_box, close_readers, iter_json_array,
                     open_region_features, progress, read_features, regions_manifest, sample_rng, stable_score)
from .regions import combine_regions, iou_matrix
from .vg_graphs import (_aliases, _obj_box, _resolve_relations, _Split, load_image_data, load_v14_objects,
                        object_name, object_synsets, tokenize)
from .writer import ShardSetWriter

def build_vg(cfg: dict, *, out, seed: int = 0, maxcount: int = 1000, maxsize: float = 256e6,
             feature_dim: int | None = 2048, strict: bool = False, progress_bar: bool = True,
             hash_inputs: bool = True) -> dict:
    rg_path = cfg["region_graphs"]
    variant = cfg.get("variant", "normal")
    if variant not in ("normal", "mismatch"):
        raise BuildError(f"dataset.variant: 'normal' or 'mismatch', got {variant!r}")
    aliases = _aliases(cfg)
    top_k = int(cfg.get("top_k", 32))
    cap_caption = int(cfg.get("max_same_predicate_per_caption", 5))
    cap_pred = int(cfg.get("max_pairs_per_predicate", 15000))
    sizes = load_image_data(cfg["image_data"])
    v14 = load_v14_objects(cfg["objects"]) if cfg.get("objects") else None
    split_of = _Split(cfg, seed)
    det, sup = open_region_features(cfg, feature_dim)
    w = ShardSetWriter(out, "visual_genome" + ("_mismatch" if variant == "mismatch" else ""),
                       version=str(cfg.get("version", "1.2")), maxcount=maxcount, maxsize=maxsize,
                       feature_dim=feature_dim)
    issues = Issues(w, strict)
    try:
        if hash_inputs:
            for name in ("region_graphs", "image_data", "objects"):
                if cfg.get(name):
                    w.add_input(cfg[name])
            for p in (cfg.get("split_files") or {}).values():
                w.add_input(p)
            for r in (det, sup):
                if r is not None:
                    for p in r.input_paths():
                        w.add_input(p)

        # ---- pass 1: predicate frequencies and candidate relations
        freq: dict[str, int] = {}
        cands: list[tuple[str, int, str, str, int]] = []  # (pred, score, image id, region id, rel index)
        seen_images: dict[str, int] = {}
        for ii, im in enumerate(progress(iter_json_array(rg_path), progress_bar, desc="vg pass 1", unit="img",
                                             total=len(sizes))):
            iid = str(im.get("image_id", im.get("id")))
            if iid in seen_images:
                raise BuildError(f"{rg_path}: record {ii}: duplicate image id {iid} (first at record {seen_images[iid]})")
            seen_images[iid] = ii
            if split_of(iid) is None:  # split_files that leave the image out: never written, so never selected
                issues.count("image_not_in_split")
                continue
            if iid not in sizes:
                issues.bad("no_image_data", f"{rg_path}: record {ii}", f"image {iid} is not in {cfg['image_data']}")
                continue
            W, H = sizes[iid]
            first_of: dict[str, int] = {}
            for rj, reg in enumerate(im.get("regions", [])):
                rid = str(reg.get("region_id", rj))
                if first_of.setdefault(rid, rj) != rj:  # one sample key per (image, region): ids must be unique
                    raise BuildError(f"{rg_path}: record {ii} (image {iid}): duplicate region id {rid} (regions "
                                     f"#{first_of[rid]} and #{rj})")
                where = f"{rg_path}: record {ii} (image {iid}) region {rid}"
                if not reg.get("relationships"):
                    continue
                if not tokenize(reg.get("phrase", "")):
                    issues.bad("empty_caption", where, "empty caption (phrase)")
                    continue
                for pred, _s, _o, k in _resolve_relations(reg, iid, v14, aliases, issues, where, W, H):
                    freq[pred] = freq.get(pred, 0) + 1
                    cands.append((pred, stable_score(seed, "rel", iid, rid, k), iid, rid, k))
        ranked = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))
        top = [p for p, _ in ranked[:top_k]]
        top_set = set(top)
        by_caption: dict[tuple, list] = {}
        for c in cands:
            if c[0] in top_set:
                by_caption.setdefault((c[2], c[3], c[0]), []).append(c)
        capped = []
        for lst in by_caption.values():
            capped += sorted(lst, key=lambda c: c[1])[:cap_caption]
        by_pred: dict[str, list] = {}
        for c in capped:
            by_pred.setdefault(c[0], []).append(c)
        selected: dict[tuple[str, str], set] = {}
        sel_count = {}
        for p, lst in by_pred.items():
            keep = sorted(lst, key=lambda c: c[1])[:cap_pred]
            sel_count[p] = len(keep)
            for c in keep:
                selected.setdefault((c[2], c[3]), set()).add(c[4])
        del cands, by_caption, capped, by_pred

        # ---- pass 2: the selected captions
        specs: dict[str, list] = {s: [] for s in split_of.names}
        for ii, im in enumerate(progress(iter_json_array(rg_path), progress_bar, desc="vg pass 2", unit="img",
                                             total=len(seen_images))):
            iid = str(im.get("image_id", im.get("id")))
            if iid not in sizes:
                continue
            split = split_of(iid)
            regs = [(str(reg.get("region_id", rj)), reg) for rj, reg in enumerate(im.get("regions", []))]
            if split is None or not any((iid, rid) in selected for rid, _ in regs):
                continue
            W, H = sizes[iid]
            mute = Issues(None, False)  # pass 1 counted these already
            image_rels = _image_relations(regs, iid, v14, aliases, W, H)
            for rid, reg in regs:
                if (iid, rid) not in selected:
                    continue
                where = f"{rg_path}: record {ii} (image {iid}) region {rid}"
                rels = _resolve_relations(reg, iid, v14, aliases, mute, where, W, H)
                chosen = [(p, str(s["object_id"]), str(o["object_id"])) for p, s, o, k in rels
                          if k in selected[(iid, rid)]]
                objs, names = {}, {}
                dropped = set()
                for o in list(reg.get("objects", [])) + [x for _, s, o2, _ in rels for x in (s, o2)]:
                    oid = str(o.get("object_id"))
                    if oid not in objs and oid not in dropped:
                        b, why = clean_box(_obj_box(o), W, H)
                        if b is not None:
                            objs[oid] = b
                            names[oid] = (object_name(o), object_synsets(o))
                        else:  # not an annotated region of the sample (its relations were counted in pass 1)
                            dropped.add(oid)
                            issues.bad(f"object_{why}", f"{where} object {oid}",
                                       f"box {_obj_box(o)} ({why.replace('_', ' ')}, image {W:g}x{H:g}): the object "
                                       f"is left out of the caption's annotated regions")
                related = {(str(s["object_id"]), str(o["object_id"])) for _, s, o, _ in rels}
                specs[split].append({"key": f"vg_{iid}_{rid}", "image": iid, "region": rid, "W": W, "H": H,
                                     "words": tokenize(reg.get("phrase", "")), "objects": objs, "names": names,
                                     "chosen": chosen, "related": related, "image_rels": image_rels,
                                     "where": where})
        for s in specs:
            specs[s].sort(key=lambda d: (_num(d["image"]), _num(d["region"])))
        if variant == "mismatch":
            for s, lst in specs.items():
                _mismatch(lst, seed, s, issues)

        w.labels = {"vri": ["related", "unrelated"], "vrc": list(top)}
        overlap = CaptionOverlap()
        for split, lst in specs.items():
            w.write_split(split, overlap.wrap(split, _samples(lst, det, sup, cfg, issues, seed, variant, progress_bar,
                                                              split)))
        chance = {"vrc": {"uniform": 1.0 / max(1, len(top)), "majority": {}},
                  "vri": {"uniform": 0.5, "majority": {}}}
        for split, info in w.splits.items():
            for t in ("vrc", "vri"):
                c = info["pairs"].get(t, {})
                chance[t]["majority"][split] = (max(c.values()) / sum(c.values())) if c else None
        w.extra = {
            "seed": seed,
            "variant": variant,
            "caption_overlap": overlap.report(),
            "predicates": {p: {"frequency": freq[p], "selected": sel_count.get(p, 0)} for p in top},
            "num_predicates_seen": len(freq),
            "chance": chance,
            "caps": {"top_k": top_k, "max_pairs_per_predicate": cap_pred,
                     "max_same_predicate_per_caption": cap_caption},
            "aliases": cfg.get("aliases") if not isinstance(cfg.get("aliases"), dict) else "custom",
            "regions": regions_manifest(cfg, det, sup),
            "skipped_examples": issues.examples,
        }
        return w.close()
    except BaseException:
        w.abort()
        raise
    finally:
        close_readers(det, sup)


def _image_relations(regs: list[tuple[str, dict]], iid: str, v14: dict | None, aliases, W: float,
                     H: float) -> tuple[np.ndarray, np.ndarray]:
    """Every relation of one image -- of all its region graphs, whatever the predicate (top-K or not) and the
    phrase (empty or not) -- as gold boxes: ``(boxes (M, 4), pairs (N, 2))``, ``pairs[i]`` the (subject, object)
    rows of ``boxes``; distinct boxes and box pairs only. Relations that do not resolve or have a bad box are left
    out (pass 1 counted them for the captions it reads)."""
    mute = Issues(None, False)
    index: dict[tuple, int] = {}
    pairs: set[tuple[int, int]] = set()
    for _rid, reg in regs:
        if not reg.get("relationships"):
            continue
        for _p, s, o, _k in _resolve_relations(reg, iid, v14, aliases, mute, "", W, H):
            ends = [index.setdefault(tuple(clean_box(_obj_box(obj), W, H)[0]), len(index)) for obj in (s, o)]
            pairs.add((ends[0], ends[1]))
    boxes = np.asarray(list(index), np.float64).reshape(-1, 4)
    return boxes, np.asarray(sorted(pairs), np.int64).reshape(-1, 2)


def _num(s: str):
    return (0, int(s), "") if str(s).isdigit() else (1, 0, str(s))


def _mismatch(lst: list[dict], seed: int, split: str, issues: Issues) -> None:
    groups: dict[str, list[dict]] = {}
    for d in lst:
        groups.setdefault(d["image"], []).append(d)
    if len(groups) < 2:
        if lst:
            issues.bad("mismatch_single_image", f"split {split}", "fewer than 2 images: no caption of another image",
                       n=len(lst))
        lst.clear()
        return
    order = sorted(groups, key=_num)
    perm = sample_rng(seed, "mismatch", split).permutation(len(order))
    order = [order[i] for i in perm]
    for g, iid in enumerate(order):
        donor = groups[order[(g + 1) % len(order)]]
        for j, d in enumerate(groups[iid]):
            src = donor[j % len(donor)]
            d["mismatch_from"] = src["key"]
            d["mismatch_words"] = src["words"]


def _image_related(comb, image_rels: tuple[np.ndarray, np.ndarray], thr: float) -> set[tuple[int, int]]:
    """Ordered region pairs (both directions) that are, up to IoU >= ``thr`` with the gold boxes, a relation of the
    image (:func:`_image_relations`)."""
    boxes, pairs = image_rels
    if not len(pairs) or not comb.boxes:
        return set()
    near = iou_matrix(np.asarray(comb.boxes, np.float64), boxes) >= thr  # (R, M)
    regions = [np.nonzero(near[:, j])[0] for j in range(len(boxes))]
    out = set()
    for i, j in pairs:
        for a in regions[i]:
            for b in regions[j]:
                if a != b:
                    out |= {(int(a), int(b)), (int(b), int(a))}
    return out


def _samples(specs, det, sup, cfg, issues: Issues, seed, variant, bar, split):
    cache_id, cache = None, None
    for d in progress(specs, bar, desc=f"vg {split}", unit="caption"):
        iid, W, H = d["image"], d["W"], d["H"]
        if iid != cache_id:
            cache_id = iid
            cache = [read_features(det, iid, W, H, issues, "detected")]
            cache.append(read_features(sup, iid, W, H, issues, "annotated") if sup is not None else None)
        dr, sr = cache
        if dr is None or (sup is not None and sr is None):
            continue
        oids = list(d["objects"])
        comb = combine_regions([d["objects"][o] for o in oids], [[o] for o in oids], dr,
                               iou_threshold=cfg["iou_threshold"], max_regions=cfg["max_regions"], supplied=sr,
                               supplied_iou=cfg.get("supplied_iou", 0.9))
        reg_of = {o: comb.ann_region[i] for i, o in enumerate(oids)}
        vrc, pos = [], []
        for pred, s, o in d["chosen"]:
            rs, ro = reg_of.get(s), reg_of.get(o)
            if rs is None or ro is None:
                issues.bad("relation_box_unmatched", d["where"], f"{pred}({s}, {o}): a box has no feature region")
                continue
            if rs == ro:
                issues.bad("relation_same_region", d["where"], f"{pred}({s}, {o}): both boxes on region {rs}")
                continue
            if [rs, ro, pred] in vrc:  # two relations of near-duplicate boxes on the same detected regions
                issues.exclude("vrc_duplicate_region_pair")
                continue
            vrc.append([rs, ro, pred])
            if (rs, ro) not in pos:
                pos.append((rs, ro))
        if not vrc:
            continue
        rel_regions = set()
        for s, o in d["related"]:
            rs, ro = reg_of.get(s), reg_of.get(o)
            if rs is not None and ro is not None:
                rel_regions |= {(rs, ro), (ro, rs)}
        # a pair of near-duplicates (IoU >= iou_threshold) of a related pair's gold boxes is that related pair
        near = {o: comb.overlapping([b], cfg["iou_threshold"]) | ({reg_of[o]} if reg_of.get(o) is not None else set())
                for o, b in d["objects"].items()}
        as_related = {(a, b) for s, o in d["related"] for a in near.get(s, ()) for b in near.get(o, ()) if a != b}
        as_related |= {(b, a) for a, b in as_related}
        excluded = as_related - rel_regions
        issues.exclude("vri_negative_overlaps_related", len(excluded))
        not_neg = rel_regions | excluded
        # a relation of another caption of the image (VG relations belong to one region graph, a sample's regions
        # are all the image's detections): the regions at IoU >= iou_threshold with its gold boxes are related too
        in_image = _image_related(comb, d["image_rels"], cfg["iou_threshold"]) - not_neg
        issues.exclude("vri_negative_related_in_image", len(in_image))
        not_neg |= in_image
        R = len(comb.boxes)
        ann = {r for r in range(R) if comb.source[r] == "annotated"}
        # two boxes of one object (a detection at IoU >= iou_threshold with another region, not two annotated
        # objects): "unrelated" would be learnable from the near-identical features alone
        if R > 1:
            iou = iou_matrix(np.asarray(comb.boxes, np.float64), np.asarray(comb.boxes, np.float64))
            same = {(int(a), int(b)) for a, b in zip(*np.nonzero(iou >= cfg["iou_threshold"]))
                    if a != b and not (a in ann and b in ann)} - not_neg
            issues.exclude("vri_negative_same_object", len(same))
            not_neg |= same
        tier1 = [(a, b) for a in range(R) for b in range(R) if a != b and (a, b) not in not_neg
                 and a in ann and b in ann]
        tier2 = [(a, b) for a in range(R) for b in range(R) if a != b and (a, b) not in not_neg
                 and not (a in ann and b in ann)]
        rng = sample_rng(seed, d["key"])
        k = len(pos)
        neg = []
        for tier in (tier1, tier2):
            need = k - len(neg)
            if need <= 0:
                break
            if len(tier) <= need:
                neg += tier
            else:
                neg += [tier[i] for i in sorted(rng.choice(len(tier), size=need, replace=False))]
        if len(neg) < k:
            issues.count("vri_negatives_short", k - len(neg))
        vri = [[a, b, "related"] for a, b in pos] + [[a, b, "unrelated"] for a, b in neg]
        words = d.get("mismatch_words", d["words"]) if variant == "mismatch" else d["words"]
        prov = {"dataset": "visual_genome", "image_id": iid, "region_id": d["region"], "split": split}
        if variant == "mismatch":
            prov.update(variant="mismatch", caption_from=d["mismatch_from"])
        meta = {
            "schema": SCHEMA_VERSION,
            "image": {"id": iid, "width": W, "height": H},
            "words": words,
            "phrases": [],
            "regions": {"boxes": comb.boxes, "chains": comb.tags, "source": comb.source,
                        "names": [region_names(d["names"][o][0] for o in tags) for tags in comb.tags],
                        "synsets": [sorted({x for o in tags for x in d["names"][o][1]}) for tags in comb.tags]},
            "pairs": {"vri": vri, "vrc": vrc},
            "provenance": prov,
        }
        yield d["key"], meta, comb.feats.astype(np.float16)

