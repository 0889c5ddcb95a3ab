"""Reading Visual Genome region graphs: image sizes, v1.4 objects, caption tokens, predicates, split assignment,
and the resolution of a caption's relations to its objects (ids, merged ids, boxes)."""
from __future__ import annotations

import re

from ..data.schema import normalise_name
from .common import BuildError, Issues, clean_box, iter_json_array, read_id_list, stable_score

#: ``aliases: basic``: a small, documented merge of verb forms (not used by default).
BASIC_ALIASES = {
    "wears": "wearing", "is wearing": "wearing", "wear": "wearing",
    "holds": "holding", "is holding": "holding", "hold": "holding",
    "has": "has", "have": "has", "has a": "has", "with": "with",
    "is on": "on", "on top of": "on", "sitting on": "sitting on", "is in": "in", "inside": "in",
    "is behind": "behind", "is near": "near", "next to": "next to", "beside": "next to",
    "riding": "riding", "rides": "riding", "riding on": "riding",
    "eats": "eating", "is eating": "eating", "plays": "playing", "is playing": "playing",
    "covers": "covering", "covered in": "covering", "covered by": "covered by",
}

TOKEN = re.compile(r"[\w'\-]+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return TOKEN.findall(text or "")


def normalise_predicate(p: str, aliases: dict | None = None) -> str:
    s = " ".join(str(p or "").lower().split())
    if aliases:
        s = aliases.get(s, s)
    return s


def _aliases(cfg) -> dict | None:
    a = cfg.get("aliases")
    if not a:
        return None
    if a == "basic":
        return dict(BASIC_ALIASES)
    if isinstance(a, dict):
        return {normalise_predicate(k): normalise_predicate(v) for k, v in a.items()}
    raise BuildError(f"dataset.aliases: use null, 'basic' or a mapping, got {a!r}")


def _obj_box(o: dict) -> list[float]:
    x, y = float(o.get("x", 0)), float(o.get("y", 0))
    return [x, y, x + float(o.get("w", 0)), y + float(o.get("h", 0))]


def object_name(o: dict) -> str:
    """An object's name as a region identity: ``names[0]`` (v1.2+/v1.4 ``objects.json``) or ``name`` (region
    graphs), normalised (lower case, whitespace collapsed); ``""`` when it has none."""
    names = o.get("names")
    if isinstance(names, list) and names:
        return normalise_name(names[0])
    return normalise_name(o.get("name") or (names if isinstance(names, str) else ""))


def object_synsets(o: dict) -> list[str]:
    syn = o.get("synsets") or []
    return [str(x) for x in (syn if isinstance(syn, list) else [syn]) if x]


def load_image_data(path) -> dict[str, tuple[float, float]]:
    out: dict[str, tuple[float, float]] = {}
    for k, im in enumerate(iter_json_array(path)):
        iid = str(im.get("image_id", im.get("id")))
        if iid in out:
            raise BuildError(f"{path}: record {k}: duplicate image id {iid}")
        try:
            out[iid] = (float(im["width"]), float(im["height"]))
        except (KeyError, TypeError, ValueError):
            raise BuildError(f"{path}: record {k}: image {iid} lacks a numeric width/height") from None
    return out


def load_v14_objects(path) -> dict[str, dict[str, dict]]:
    """v1.4 ``objects.json`` -> image id -> {object id (and each merged id): object}."""
    out: dict[str, dict[str, dict]] = {}
    for im in iter_json_array(path):
        d = out.setdefault(str(im.get("image_id", im.get("id"))), {})
        for o in im.get("objects", []):
            slim = {k: o[k] for k in ("object_id", "x", "y", "w", "h", "name", "names", "synsets") if k in o}
            for i in [o.get("object_id")] + list(o.get("merged_object_ids", []) or []):
                if i is not None:
                    d.setdefault(str(i), slim)
    return out


def _id_map(objects: list[dict]) -> dict[str, dict]:
    m: dict[str, dict] = {}
    for o in objects:
        if "object_id" in o:
            m[str(o["object_id"])] = o
    for o in objects:
        for i in o.get("merged_object_ids", []) or []:
            m.setdefault(str(i), o)
    return m


class _Split:
    def __init__(self, cfg, seed):
        self.seed = seed
        self.files = None
        if cfg.get("split_files"):
            self.files = {}
            for s, p in cfg["split_files"].items():
                for i in read_id_list(p):
                    if i in self.files:
                        raise BuildError(f"{p}: image id {i} is also in split {self.files[i]}")
                    self.files[i] = s
            self.names = list(cfg["split_files"])
        else:
            fr = dict(cfg.get("splits") or {"train": 0.8, "val": 0.1, "test": 0.1})
            tot = sum(fr.values())
            if tot <= 0:
                raise BuildError("dataset.splits: fractions must sum to a positive number")
            self.names = list(fr)
            acc, self.cuts = 0.0, []
            for s, f in fr.items():
                acc += f / tot
                self.cuts.append((acc, s))

    def __call__(self, iid: str) -> str | None:
        if self.files is not None:
            return self.files.get(iid)
        u = stable_score(self.seed, "split", iid) / 2.0 ** 64
        for c, s in self.cuts:
            if u < c:
                return s
        return self.cuts[-1][1]


def _resolve_relations(region: dict, iid: str, v14: dict | None, aliases, issues: Issues, where: str, W, H):
    """Valid, resolved, de-duplicated relations of one caption: [(pred, s_obj, o_obj, rel_index)]. A relation whose
    predicate, subject and object (by id, or by box) repeat an earlier one of the caption is left out (counted:
    ``excluded.relation_duplicate``)."""
    idmap = _id_map(region.get("objects", []))
    extra = v14.get(iid, {}) if v14 is not None else {}
    out, seen = [], set()
    for k, r in enumerate(region.get("relationships", [])):
        w = f"{where} relationship #{k} (id {r.get('relationship_id', '?')})"
        pred = normalise_predicate(r.get("predicate"), aliases)
        if not pred:
            issues.bad("relation_empty_predicate", w, "empty predicate")
            continue
        s_id, o_id = str(r.get("subject_id")), str(r.get("object_id"))
        s, o = idmap.get(s_id) or extra.get(s_id), idmap.get(o_id) or extra.get(o_id)
        if s is None or o is None:
            missing = [i for i, x in ((s_id, s), (o_id, o)) if x is None]
            issues.bad("relation_unresolved", w, f"object id(s) {', '.join(missing)} do not resolve in the "
                                                 f"region graph{' or objects.json' if v14 is not None else ''}")
            continue
        if s is o or str(s.get("object_id")) == str(o.get("object_id")):
            issues.bad("relation_self", w, "subject and object are the same object")
            continue
        boxes = []
        for role, obj in (("subject", s), ("object", o)):
            b, why = clean_box(_obj_box(obj), W, H)
            if b is None:
                issues.bad(why, w, f"{role} box {_obj_box(obj)} ({why.replace('_', ' ')}, image {W:g}x{H:g})")
                break
            boxes.append(tuple(float(x) for x in b))
        if len(boxes) < 2:
            continue
        # one relation once: the same ids, or the same boxes (v1.2 holds duplicate objects: other ids, one box;
        # v1.4 merged them), would be the same region pair with the same label twice
        t, tb = (pred, str(s.get("object_id")), str(o.get("object_id"))), (pred, *boxes)
        if t in seen or tb in seen:
            issues.exclude("relation_duplicate")
            continue
        seen |= {t, tb}
        out.append((pred, s, o, k))
    return out
