"""PNG charts of sweep and memory results (matplotlib, imported only when plotting)."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from .cases import case_from_row


def matplotlib_missing() -> Optional[str]:
    """Why plots cannot be drawn here, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plots written"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, count: int, width: float = 5.0, height: float = 3.6):
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _save(plt, fig, path: str, title: str = "", suptitle: bool = True) -> str:
    if title and suptitle:
        fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _series(rows: Sequence[dict]) -> "OrderedDict":
    """series key -> backend -> [(len_q, tflops)] over ok rows."""
    series: "OrderedDict" = OrderedDict()
    for row in rows:
        if row["status"] != "ok":
            continue
        case = case_from_row(row)
        key = (case.series_key(), case.series_label())
        series.setdefault(key, OrderedDict()).setdefault(row["backend"], []).append((case.len_q, row["tflops"]))
    return series


def plot_throughput(rows: Sequence[dict], path: str, title: str = "") -> Optional[str]:
    """TFLOP/s against sequence length, one line per backend, one panel per series of cases."""
    series = OrderedDict((k, v) for k, v in _series(rows).items()
                         if len({n for points in v.values() for n, _ in points}) >= 2)
    if not series:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(series))
    for ax, ((_, label), backends) in zip(axes, series.items()):
        for backend, points in backends.items():
            points.sort()
            ax.plot([n for n, _ in points], [t for _, t in points], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(label, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)


def plot_speedup(rows: Sequence[dict], path: str, baseline: Optional[str], title: str = "") -> Optional[str]:
    """Horizontal bars: speed-up over ``baseline`` per case and backend."""
    cases: "OrderedDict" = OrderedDict()
    for row in rows:
        if row["status"] == "ok" and row.get("speedup") and row["backend"] != baseline:
            cases.setdefault(case_from_row(row).label(), OrderedDict())[row["backend"]] = row["speedup"]
    if not cases:
        return None
    backends: List[str] = []
    for values in cases.values():
        backends += [b for b in values if b not in backends]
    plt = _pyplot()
    height = max(2.5, 0.28 * len(cases) * max(1, len(backends)) + 1.2)
    fig, ax = plt.subplots(figsize=(10, height))
    bar = 0.8 / len(backends)
    labels = list(cases)
    for j, backend in enumerate(backends):
        ys = [i + j * bar for i in range(len(labels)) if backend in cases[labels[i]]]
        xs = [cases[label][backend] for label in labels if backend in cases[label]]
        ax.barh(ys, xs, height=bar, label=backend)
        for y, x in zip(ys, xs):
            ax.text(x, y, f" {x:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    values = [x for v in cases.values() for x in v.values()]
    if max(values) / min(values) > 20:  # one window case would flatten every other bar
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_yticks([i + 0.4 - bar / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"speed-up over {baseline} (higher is faster)")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path, title, suptitle=False)


def plot_memory(rows: Sequence[dict], fits: Sequence[dict], path: str, title: str = "") -> Optional[str]:
    """Extra memory against sequence length on log-log axes, with the fitted growth exponent."""
    panels: "OrderedDict" = OrderedDict()
    for row in rows:
        if row["status"] == "ok" and row["extra_bytes"] > 0:
            series = case_from_row(row).series_label()
            panels.setdefault(series, OrderedDict()).setdefault(row["backend"], []).append(
                (row["len_q"], row["extra_bytes"] / (1 << 20)))
    if not panels:
        return None
    slope: Dict[tuple, float] = {(f["backend"], f["series"]): f["exponent"] for f in fits
                                 if f.get("exponent") is not None}
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), width=6.0, height=4.2)
    for ax, (series, backends) in zip(axes, panels.items()):
        for backend, points in backends.items():
            points.sort()
            exponent = slope.get((backend, series))
            label = f"{backend} (~L^{exponent:.2f})" if exponent is not None else backend
            ax.plot([n for n, _ in points], [m for _, m in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (= S)")
        ax.set_ylabel("extra memory beyond outputs/grads (MiB)")
        ax.set_title(series, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path, title)
