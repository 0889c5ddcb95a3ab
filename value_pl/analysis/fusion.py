"""Multimodal fusion degree (VALUE Sec. 3.1, Table 1, Appendix B) and its t-SNE picture (Fig. 6).

For every sample and layer, k-means (k=2) over the sample's token representations and the NMI between
the two clusters and the modality labels (text / region), averaged over samples. Lower NMI = more
fused. Tokens: every real text token *including* [CLS] and [SEP] (they are text-modality tokens of
the input sequence; ``fusion.include_special=false`` leaves them out) and every real region; padding never
takes part. Single-stream: the embeddings
(layer 0) and every layer; two-stream: the cross layers, both streams' tokens together.

Numbering: ``layer`` in ``results`` is our index (0 = embedding output, k = the k-th layer, as in
``layers=[k]`` and results.json); ``table1`` is the paper's Table 1 column, which counts from 0 at the
first Transformer layer (UNITER 0-11, LXMERT cross layers 0-4): ``table1 = layer - 1``, ``emb.`` for the
embeddings. Tables, plots and t-SNE titles use the Table 1 numbering and say so.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..backbones.capture import CaptureSpec
from .common import Analysis, Figure, fusion_layers, table1_label
from .kmeans import kmeans2, nmi_per_sample, row_seed


def _labels(out, stream: str, special: bool):
    lab = out.modality_mask(stream)
    info = out.streams[stream]
    if not special and info.text_offset is not None:  # [CLS]/[SEP] leave the clustering
        T = out.special_mask.shape[1]
        seg = lab[:, info.text_offset : info.text_offset + T]
        seg[out.special_mask.bool() & (seg == 0)] = -1
    return lab


def layer_tokens(out, ha: str, hb: str, special: bool = True):
    """(B, N, D) tokens and (B, N) modality labels (0 text, 1 region, -1 pad) of one layer; ``special=False``
    labels [CLS]/[SEP] -1 too (out of the clustering)."""
    sa, sb = ha.split(".")[1], hb.split(".")[1]
    if ha == hb:
        return out.hidden[ha].float(), _labels(out, sa, special)
    return (torch.cat([out.hidden[ha].float(), out.hidden[hb].float()], 1),
            torch.cat([_labels(out, sa, special), _labels(out, sb, special)], 1))


class Fusion(Analysis):
    name = "fusion"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.layers = fusion_layers(backbone)
        self.sum = np.zeros(len(self.layers))
        self.sq = np.zeros(len(self.layers))
        self.n = 0
        km = cfg.get("kmeans", {}) or {}
        self.n_init, self.max_iter = int(km.get("n_init", 10)), int(km.get("max_iter", 100))
        self.seed = int(cfg.get("seed", 0))
        self.special = bool((cfg.get("fusion", {}) or {}).get("include_special", True))

    def capture(self, batch):
        return CaptureSpec(hidden=sorted({h for _, a, b in self.layers for h in (a, b)}), attn=[])

    def update(self, out, batch):
        xs, labs = [], []
        for _, ha, hb in self.layers:
            x, lab = layer_tokens(out, ha, hb, self.special)
            xs.append(x)
            labs.append(lab)
        lab = labs[0]
        has_t, has_v = (lab == 0).any(1), (lab == 1).any(1)
        self.count("fusion: sample without regions", int((~has_v).sum()))
        self.count("fusion: sample without text", int((has_v & ~has_t).sum()))
        keep = (has_t & has_v)
        if not bool(keep.any()):
            return
        K = len(self.layers)
        x = torch.cat([t[keep] for t in xs], 0)  # (K*Bk, N, D): all layers of all kept samples at once
        lab = torch.cat([l[keep] for l in labs], 0)
        mask = lab >= 0
        names = batch.get("keys") or [f"#{batch.get('_offset', 0) + i}" for i in range(len(keep))]
        keys = [k for k, kept in zip(names, keep.tolist()) if kept]
        seeds = [row_seed(self.seed, key, l) for l, _, _ in self.layers for key in keys]  # a sample's own restarts
        pred, _ = kmeans2(x, mask, n_init=self.n_init, max_iter=self.max_iter, seed=self.seed, row_seeds=seeds)
        nmi = nmi_per_sample(pred, lab, mask).reshape(K, -1)  # (K, Bk)
        self.sum += nmi.sum(1)
        self.sq += (nmi ** 2).sum(1)
        self.n += nmi.shape[1]
        self.samples += nmi.shape[1]

    def result(self):
        n = max(self.n, 1)
        mean = self.sum / n
        std = np.sqrt(np.maximum(self.sq / n - mean ** 2, 0.0))
        rows = [{"layer": int(l), "table1": table1_label(l), "hidden": [a] if a == b else [a, b],
                 "nmi": float(mean[i]) if self.n else math.nan,
                 "std": float(std[i]) if self.n else math.nan} for i, (l, a, b) in enumerate(self.layers)]
        return {"analysis": "fusion", "kind": self.backbone.kind, "samples": self.n, "layers": rows,
                "tokens": ("all real text tokens incl. [CLS]/[SEP]" if self.special else
                           "the real text tokens without [CLS]/[SEP] (fusion.include_special=false)")
                + ", all real regions; padding excluded",
                "kmeans": {"k": 2, "n_init": self.n_init, "max_iter": self.max_iter, "seed": self.seed},
                "missing": dict(self.missing)}

    def markdown(self, res):
        layers = res["layers"]
        kind = "single-stream" if res["kind"] == "single" else "two-stream (cross layers)"
        best = min((r["nmi"] for r in layers if r["nmi"] == r["nmi"]), default=None)
        cell = lambda r: (f"**{r['nmi']:.2f}**" if best is not None and abs(r["nmi"] - best) < 5e-3 else f"{r['nmi']:.2f}")
        lines = ["## Multimodal fusion degree (NMI, Table 1)", "",
                 f"k-means (k=2) per sample and layer vs. the modality labels; mean NMI over {res['samples']} "
                 f"samples; lower = more fused. {kind}.", "",
                 "| Layer (Table 1) | " + " | ".join(table1_label(r["layer"]) for r in layers) + " |",
                 "|---|" + "---:|" * len(layers),
                 "| NMI | " + " | ".join(cell(r) for r in layers) + " |",
                 "| std | " + " | ".join(f"{r['std']:.2f}" for r in layers) + " |",
                 "| = layer (results.json) | " + " | ".join(str(r["layer"]) for r in layers) + " |", "",
                 "Layer numbers as in the paper's Table 1: 0 is the first Transformer layer (two-stream: the first "
                 "cross layer), i.e. Layer 1 of Tables 3-11 and `layers=[1]`; emb. = the embedding output."]
        return "\n".join(lines) + "\n" + _missing_md(res)

    def figures(self, res, rdir):
        from .figures import line_plot

        xs = [r["layer"] for r in res["layers"]]
        line_plot(rdir / "fusion_nmi.png", xs, {"NMI": [r["nmi"] for r in res["layers"]]},
                  "layer (Table 1 numbering; emb. = embeddings)", "NMI",
                  "Multimodal fusion degree (lower = more fused)", ylim=(0, 1.02),
                  xticklabels=[table1_label(x) for x in xs])
        return [Figure("fusion_nmi", "NMI per layer (Table 1)")]

    def wandb_payload(self, res):
        return {"tables": {"fusion/table": (["layer", "table1", "nmi", "std"],
                                            [[r["layer"], table1_label(r["layer"]), r["nmi"], r["std"]]
                                             for r in res["layers"]])},
                # x in the paper's Table 1 numbering, as fusion.md and fusion_nmi.png: layer k -> k - 1 (-1 = emb.)
                "lines": {"fusion/nmi": ([int(r["layer"]) - 1 for r in res["layers"]],
                                         {"nmi": [r["nmi"] for r in res["layers"]]},
                                         "layer (Table 1 numbering; -1 = embeddings)")}}


class TSNE(Analysis):
    """Fig. 6: t-SNE of one sample's tokens at the first and the last fused layer."""

    name = "tsne"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        layers = fusion_layers(backbone)
        non_emb = [l for l in layers if l[0] > 0] or layers
        pick = cfg.get("tsne_layers") or [non_emb[0][0], non_emb[-1][0]]
        by = {l[0]: l for l in layers}
        unknown = [p for p in pick if int(p) not in by]
        if unknown:
            raise ValueError(f"tsne_layers={list(pick)}: {unknown} are not image-text layers of this backbone; "
                             f"it has {sorted(by)} (0 = the embeddings)")
        self.layers = [by[int(p)] for p in pick]
        self.target = int(cfg.get("tsne_sample", 0))
        self.seed = int(cfg.get("seed", 0))
        km = cfg.get("kmeans", {}) or {}  # the fusion table's k-means, so the NMI in the title is that sample's
        self.n_init, self.max_iter = int(km.get("n_init", 10)), int(km.get("max_iter", 100))
        self.special = bool((cfg.get("fusion", {}) or {}).get("include_special", True))
        self.points = None

    def capture(self, batch):
        off = batch["_offset"]
        if self.points is not None or not (off <= self.target < off + len(batch["keys"])):
            return None
        return CaptureSpec(hidden=sorted({h for _, a, b in self.layers for h in (a, b)}), attn=[])

    def update(self, out, batch):
        from sklearn.manifold import TSNE as SKTSNE

        i = self.target - batch["_offset"]
        self.points = {"key": batch["keys"][i], "layers": []}
        if not bool((out.region_mask[i] > 0).any()):
            self.count(f"tsne: sample {self.target} has no regions (a text-only plot; choose another tsne_sample)")
        for l, ha, hb in self.layers:
            x, lab = layer_tokens(out, ha, hb, self.special)
            m = lab[i] >= 0
            xi, li = x[i][m].cpu().numpy().astype(np.float64), lab[i][m].cpu().numpy()
            perp = float(min(30.0, max(2.0, (len(xi) - 1) / 3.0)))
            y = SKTSNE(n_components=2, perplexity=perp, init="pca", random_state=self.seed,
                         method="exact" if len(xi) < 500 else "barnes_hut").fit_transform(xi)
            pred, _ = kmeans2(x[i : i + 1], m[None], n_init=self.n_init, max_iter=self.max_iter, seed=self.seed,
                              row_seeds=[row_seed(self.seed, batch["keys"][i], l)])
            nmi = float(nmi_per_sample(pred, lab[i : i + 1], m[None])[0])
            self.points["layers"].append({"layer": int(l), "table1": table1_label(l), "xy": y.tolist(),
                                          "modality": li.tolist(), "nmi": nmi})
        self.samples = 1

    def result(self):
        if self.points is None:
            self.count(f"tsne: sample {self.target} not reached (fewer samples)")
            return {"analysis": "tsne", "sample": self.target, "layers": [], "missing": dict(self.missing)}
        return {"analysis": "tsne", "sample": self.target, "key": self.points["key"], "layers": self.points["layers"],
                "missing": dict(self.missing)}

    def markdown(self, res):
        lines = ["## t-SNE of one image-text pair (Fig. 6)", ""]
        if not res["layers"]:
            return "\n".join(lines + ["(no sample)"]) + "\n" + _missing_md(res)
        lines.append(f"sample `{res['key']}` (index {res['sample']}): " + ", ".join(
            f"layer {table1_label(l['layer'])} (Table 1 numbering): NMI {l['nmi']:.2f}" for l in res["layers"])
            + "; ![tsne](tsne.png)")
        return "\n".join(lines) + "\n"

    def figures(self, res, rdir):
        if not res["layers"]:
            return []
        from .figures import tsne_plot

        tsne_plot(rdir / "tsne.png", res)
        return [Figure("tsne", "t-SNE of the first and last layer (Fig. 6)")]


def _missing_md(res) -> str:
    miss = res.get("missing") or {}
    if not miss:
        return ""
    return "\nNot counted: " + "; ".join(f"{k}: {v}" for k, v in sorted(miss.items())) + "\n"
