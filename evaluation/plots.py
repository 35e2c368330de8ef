"""Pictures of samples: a grid per sampler for images, a scatter over the data for dense runs.

Both write to a temporary name and move it into place, so a crash never leaves a
half-written PNG where a dashboard or a person looks.
"""

from pathlib import Path

import torch
from torch import Tensor


def save_grid(samples: dict[str, Tensor], path: Path, per_variant: int = 64) -> Path:
    """One PNG: an 8-column grid of the first ``per_variant`` images of each sampler, side by side."""
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    grids = [make_grid((x[:per_variant] + 1) / 2, nrow=8, padding=1, pad_value=1.0) for x in samples.values()]
    height = max(g.shape[1] for g in grids)
    grids = [torch.nn.functional.pad(g, (0, 4, 0, height - g.shape[1]), value=1.0) for g in grids]
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(torch.cat(grids, dim=2), tmp)
    tmp.replace(path)
    return path


def save_plot(samples: dict[str, Tensor], data: Tensor, path: Path, title: str) -> Path:
    """Scatter of samples over data for 2-D runs (first two coordinates otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
    lim = float(data[:, :2].abs().max()) * 1.2
    for ax, (name, pts) in zip(axes[0], samples.items()):
        pts = pts.cpu()
        ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgray", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="tab:blue", label="samples")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=f"{title} · {name}")
        ax.legend(loc="upper right", markerscale=4, fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
