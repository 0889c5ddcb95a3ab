"""PNG figures (matplotlib, Agg backend): per-head heatmaps, line plots, the t-SNE scatter."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmaps(path: Path, panels: dict[str, np.ndarray], title: str, vmax: float | None = None, ncols: int = 4) -> Path:
    """One heatmap per panel (layers on y, layer 1 on top; heads on x), one colour scale and colour bar.

    Rows are the attention layers 1..L (1 = the first Transformer layer, as in the paper's head names ``i-j``;
    the embeddings have no attention); for LXMERT they are the maps' own layers (cross layers 1-5 for
    coreference, visual layers 1-10 -- of which 6-10 are the cross layers -- for relations)."""
    n = len(panels)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    first = next(iter(panels.values()))
    L, H = first.shape
    if vmax is None:
        vmax = max(max(float(np.nanmax(m)) for m in panels.values()), 1e-6)
    pw, ph = 0.22 * H + 0.6, 0.22 * L + 0.7
    fig, axes = plt.subplots(nrows, ncols, figsize=(pw * ncols + 1.0, ph * nrows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    step = lambda k: max(1, k // 6)
    im = None
    for i, (ax, (name, m)) in enumerate(zip(axes.flat, panels.items())):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=8, pad=2)
        ax.set_xticks(range(0, H, step(H)))
        ax.set_xticklabels([str(h + 1) for h in range(0, H, step(H))], fontsize=6)
        ax.set_yticks(range(0, L, step(L)))
        ax.set_yticklabels([str(l + 1) for l in range(0, L, step(L))], fontsize=6)
        if i % ncols == 0:
            ax.set_ylabel("layer i (head i-j)", fontsize=7)
        if i >= n - ncols:
            ax.set_xlabel("head", fontsize=7)
    fig.subplots_adjust(left=0.8 / (pw * ncols + 1.0), right=1 - 1.0 / (pw * ncols + 1.0), bottom=0.45 / (ph * nrows + 0.6),
                        top=1 - 0.55 / (ph * nrows + 0.6), wspace=0.25, hspace=0.45)
    cax = fig.add_axes([1 - 0.8 / (pw * ncols + 1.0), 0.15, 0.15 / (pw * ncols + 1.0), 0.7])
    fig.colorbar(im, cax=cax).ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def line_plot(path: Path, xs, series: dict[str, list], xlabel: str, ylabel: str, title: str, ylim=None,
              xticklabels=None) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(xs))
    if xticklabels is not None:
        ax.set_xticklabels(list(xticklabels))
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def tsne_plot(path: Path, res: dict) -> Path:
    layers = res["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.0), squeeze=False)
    for ax, l in zip(axes[0], layers):
        xy, mod = np.array(l["xy"]), np.array(l["modality"])
        ax.scatter(*xy[mod == 1].T, c="gold", s=14, label="visual token", edgecolors="k", linewidths=0.3)
        ax.scatter(*xy[mod == 0].T, c="tab:blue", s=14, label="textual token", edgecolors="k", linewidths=0.3)
        ax.set_title(f"layer {l.get('table1', l['layer'])} (Table 1 numbering; NMI {l['nmi']:.2f})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"t-SNE of sample {res.get('key', res['sample'])} (Fig. 6)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
