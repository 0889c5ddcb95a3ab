"""[CLS] modality importance (VALUE Eq. 1, Sec. 3.2, Figs. 2 and 3a) and image-to-text heads (Eq. 2, Fig. 3b).

Both need a single stream in which a token can attend to text and image at once; a two-stream model
has no such attention (its [CLS] self-attends to text only, its cross-attention to the image only, and
its image-to-text attention exists by design), so they raise :class:`~.common.Unsupported` there.
"""
from __future__ import annotations

import numpy as np
import torch

from ..backbones.base import REGION, TEXT
from ..backbones.capture import CaptureSpec
from .common import Analysis, Figure, Unsupported, captured_positions, head_maps, head_name
from .fusion import _missing_md

WHY_TWO_STREAM = {
    "modality": ("modality importance (Eq. 1) needs a single-stream backbone: in a two-stream model the [CLS] "
                 "token never attends to text and image at the same time (language self-attention sees only "
                 "text, cross-attention only regions), so its attention mass cannot be split between the "
                 "modalities (VALUE Sec. 3.2)"),
    "i2t": ("image-to-text heads (Eq. 2) need a single-stream backbone: in a two-stream model every "
            "vision->language cross-attention head attends only to text by design (VALUE Sec. 3.3.1)"),
}


def joint_maps(backbone, analysis: str) -> list[str]:
    if getattr(backbone, "kind", "single") != "single":
        raise Unsupported(WHY_TWO_STREAM[analysis])
    return [a for a, _ in head_maps(backbone, "phrase_region")]


def token_sets(out, include_special: bool = False):
    """(B, N) bool masks over the joint stream: text tokens ([CLS]/[SEP] excluded unless asked) and regions."""
    mm = out.modality_mask("joint")
    special = torch.zeros_like(mm, dtype=torch.bool)
    off = out.streams["joint"].text_offset
    T = out.special_mask.shape[1]
    special[:, off : off + T] = out.special_mask.bool()
    text = (mm == 0) if include_special else ((mm == 0) & ~special)
    return text, mm == 1


class ModalityImportance(Analysis):
    name = "modality"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.maps = joint_maps(backbone, "modality")
        self.H = backbone.num_heads
        self.sum_t = np.zeros((len(self.maps), self.H))
        self.sum_v = np.zeros((len(self.maps), self.H))

    def capture(self, batch):
        B = batch["input_ids"].shape[0]
        return CaptureSpec(hidden=[], attn=list(self.maps), rows={TEXT: torch.zeros(B, 1, dtype=torch.long)})

    def update(self, out, batch):
        text, img = token_sets(out)
        ok = img.any(1) & text.any(1)
        self.count("modality: sample without regions", int((~img.any(1)).sum()))
        self.count("modality: sample without non-special text", int((img.any(1) & ~text.any(1)).sum()))
        if not bool(ok.any()):
            return
        pos = captured_positions(out, self.maps[0])  # (B, R) stream position of every captured row
        cls = (pos == out.streams["joint"].text_offset).long().argmax(1)  # slot of [CLS] (text token 0)
        bi = torch.arange(pos.shape[0], device=pos.device)
        row = torch.stack([out.attn[n][bi, :, cls, :] for n in self.maps], 1)  # (B, L, H, N) [CLS] row
        It = (row * text[:, None, None, :]).sum(-1)[ok]
        Iv = (row * img[:, None, None, :]).sum(-1)[ok]
        self.sum_t += It.double().sum(0).cpu().numpy()
        self.sum_v += Iv.double().sum(0).cpu().numpy()
        self.samples += int(ok.sum())

    def result(self):
        n = max(self.samples, 1)
        t, v = self.sum_t / n, self.sum_v / n
        return {"analysis": "modality", "samples": self.samples,
                "definition": "Eq. 1: [CLS] attention mass on text tokens ([CLS]/[SEP] excluded) / on regions, "
                              "per head, mean over samples",
                "heads": {"text": t.tolist(), "image": v.tolist()},
                "layers": [{"layer": i + 1, "text": float(t[i].mean()), "image": float(v[i].mean())}
                           for i in range(len(self.maps))],
                "overall": {"text_sum": float(t.sum()), "image_sum": float(v.sum()),
                            "text_mean": float(t.mean()), "image_mean": float(v.mean())},
                "missing": dict(self.missing)}

    def markdown(self, res):
        o = res["overall"]
        lines = ["## Modality importance of [CLS] (Eq. 1, Figs. 2 and 3a)", "",
                 f"{res['samples']} samples; [CLS]/[SEP] excluded from the text mass.", "",
                 "| Layer | text MI | image MI |", "|---:|---:|---:|"]
        lines += [f"| {r['layer']} | {r['text']:.3f} | {r['image']:.3f} |" for r in res["layers"]]
        nh = len(res["heads"]["text"]) * len(res["heads"]["text"][0])
        lines += [f"| overall (sum over {nh} heads) | {o['text_sum']:.2f} | {o['image_sum']:.2f} |",
                  f"| overall (mean per head) | {o['text_mean']:.3f} | {o['image_mean']:.3f} |", "",
                  "![modality importance per head](modality_heads.png) ![per layer](modality_layers.png)"]
        return "\n".join(lines) + "\n" + _missing_md(res)

    def figures(self, res, rdir):
        from .figures import heatmaps, line_plot

        t, v = np.array(res["heads"]["text"]), np.array(res["heads"]["image"])
        vmax = float(max(t.max(), v.max(), 1e-6))
        heatmaps(rdir / "modality_heads.png", {"textual MI": t, "visual MI": v}, "Modality importance per head (Fig. 2)",
                 vmax=vmax)
        xs = [r["layer"] for r in res["layers"]]
        line_plot(rdir / "modality_layers.png", xs, {"text": [r["text"] for r in res["layers"]],
                                                     "image": [r["image"] for r in res["layers"]]},
                  "layer", "mean MI of the layer's heads", "Layer-level modality importance (Fig. 3a)")
        return [Figure("modality_heads", "MI per head (Fig. 2)"), Figure("modality_layers", "MI per layer (Fig. 3a)")]

    def wandb_payload(self, res):
        rows = [[r["layer"], r["text"], r["image"]] for r in res["layers"]]
        return {"tables": {"modality/layers": (["layer", "text", "image"], rows)},
                "lines": {"modality/layers": ([r[0] for r in rows], {"text": [r[1] for r in rows],
                                                                    "image": [r[2] for r in rows]}, "layer")}}


class ImageToText(Analysis):
    name = "i2t"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.maps = joint_maps(backbone, "i2t")
        self.H = backbone.num_heads
        c = cfg.get("i2t", {}) or {}
        self.threshold = float(c.get("threshold", 0.5))
        self.include_special = bool(c.get("include_special", False))
        self.hits = np.zeros((len(self.maps), self.H))

    def capture(self, batch):
        rm = batch["region_mask"]
        R = rm.shape[1]
        rows = torch.where(rm.bool(), torch.arange(R, device=rm.device).expand_as(rm), torch.full_like(rm, -1))
        return CaptureSpec(hidden=[], attn=list(self.maps), rows={REGION: rows.long()})

    def update(self, out, batch):
        text, _ = token_sets(out, self.include_special)
        pos = captured_positions(out, self.maps[0])  # (B, R) captured query rows (may include text rows)
        mm = out.modality_mask("joint")
        rvalid = (pos >= 0) & (torch.gather(mm, 1, pos.clamp(min=0)) == 1)  # rows that are real regions
        has_r = out.region_mask.bool().any(1)
        self.count("i2t: sample without regions", int((~has_r).sum()))
        if not bool(has_r.any()):
            return
        a = torch.stack([out.attn[n] for n in self.maps], 1)  # (B, L, H, R, N) region query rows
        mass = (a * text[:, None, None, None, :]).sum(-1)  # (B, L, H, R)
        hit = ((mass > self.threshold) & rvalid[:, None, None, :]).any(-1)  # Eq. 2: some region
        self.hits += hit[has_r].double().sum(0).cpu().numpy()
        self.samples += int(has_r.sum())

    def result(self):
        p = self.hits / max(self.samples, 1)
        share = float((p > 0.5).mean()) if self.samples else float("nan")
        return {"analysis": "i2t", "samples": self.samples, "threshold": self.threshold,
                "include_special": self.include_special,
                "definition": "Eq. 2: fraction of samples in which some region sends > threshold of its attention "
                              "to the text tokens" + ("" if self.include_special else " ([CLS]/[SEP] excluded)"),
                "heads": p.tolist(), "share_above_0.5": share, "max": float(p.max()), "min": float(p.min()),
                "argmax": head_name(*np.unravel_index(int(p.argmax()), p.shape)),
                "missing": dict(self.missing)}

    def markdown(self, res):
        p = np.array(res["heads"])
        lines = ["## Image-to-text heads (Eq. 2, Fig. 3b)", "",
                 f"{res['samples']} samples; probability that a head is an image-to-text head (some region sends "
                 f"> {res['threshold']} of its attention to text).", "",
                 "| heads | P > 0.5 (share) | max P (head) | min P |", "|---:|---:|---:|---:|",
                 f"| {p.size} | {100 * res['share_above_0.5']:.1f}% | {res['max']:.2f} ({res['argmax']}) | {res['min']:.2f} |",
                 "", "| Layer | " + " | ".join(f"h{h + 1}" for h in range(p.shape[1])) + " |",
                 "|---:|" + "---:|" * p.shape[1]]
        lines += [f"| {l + 1} | " + " | ".join(f"{x:.2f}" for x in p[l]) + " |" for l in range(p.shape[0])]
        lines += ["", "![image-to-text heads](i2t_heads.png)"]
        return "\n".join(lines) + "\n" + _missing_md(res)

    def figures(self, res, rdir):
        from .figures import heatmaps

        heatmaps(rdir / "i2t_heads.png", {"P(image-to-text head)": np.array(res["heads"])},
                 "Image-to-text heads (Fig. 3b)", vmax=1.0)
        return [Figure("i2t_heads", "image-to-text probability per head (Fig. 3b)")]

    def wandb_payload(self, res):
        p = res["heads"]
        return {"tables": {"i2t/heads": (["layer", "head", "p"], [[l + 1, h + 1, p[l][h]] for l in range(len(p))
                                                                   for h in range(len(p[0]))])}}
