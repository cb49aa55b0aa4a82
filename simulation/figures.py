"""Saving a matplotlib figure the way every bench report does: tight, 120 dpi, closed after."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
