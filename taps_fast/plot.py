"""Figures of TAPS results: the per-layer gate map across tasks (the TAPS paper's Figure 3) and the
accuracy / task-parameter trade-off of a sweep over λ.

matplotlib is optional: it is imported inside the plotting functions only (``import taps_fast``
never imports it), and drawn with the Agg canvas on a bare ``matplotlib.figure.Figure``, never
through pyplot, so the functions work headless, in threads, and leave pyplot's global state alone.
:func:`gate_matrix` is the data behind the gate map and needs no matplotlib.
"""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .training import Summary

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

log = logging.getLogger("taps_fast")

SummaryLike = Union[Summary, Mapping[str, Any]]
PathLike = Union[str, "os.PathLike[str]"]

# Gate map geometry in inches: 0.22 in per cell keeps 53 columns (ResNet-50's convs) at ~12 in;
# above MAX_LABELS columns only every k-th layer name is written, 6 pt names need ~0.1 in each.
CELL_IN = 0.22
MAX_WIDTH_IN = 18.0
MAX_LABELS = 40
DPI = 150


def _mpl():
    """(Figure, FigureCanvasAgg), or an ImportError that says how to get them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"taps_fast.plot needs matplotlib ({e}): pip install matplotlib (or taps_fast[plot])") from e
    return Figure, FigureCanvasAgg


def _new_figure(figsize: Tuple[float, float]) -> "Figure":
    Figure, FigureCanvasAgg = _mpl()
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: savefig renders with Agg, no pyplot
    return fig


def _save(fig: "Figure", path: Optional[PathLike]) -> None:
    """Write ``fig`` to ``path`` (parent folders created). The format follows the file's suffix
    (.png, .pdf, .svg, ...); a path without a suffix gets PNG."""
    if path is None:
        return
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fmt = None if os.path.splitext(path)[1] else "png"
    fig.savefig(path, dpi=DPI, format=fmt)
    log.info("taps_fast.plot: wrote %s", path)


def _as_dict(s: SummaryLike, where: str) -> Mapping[str, Any]:
    """A Summary or its to_dict() (e.g. read back from JSON) as the dict form."""
    if isinstance(s, Summary):
        return s.to_dict()
    if not isinstance(s, Mapping):
        raise ValueError(f"{where}: expected a taps_fast.Summary or its to_dict(), got {type(s).__name__}")
    for key in ("rows", "totals"):
        if key not in s:
            raise ValueError(f"{where}: missing key {key!r} (expected a taps_fast.Summary or its to_dict())")
    return s


def _row_is_open(row: Any, where: str) -> Tuple[str, bool]:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a dict with 'name', 'open', 'delta_kept', got {type(row).__name__}")
    for key in ("name", "open", "delta_kept"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
    # Open means the task changes the layer: gate open AND its delta kept (a dropped delta
    # computes with the base weight alone, whatever the score says).
    return str(row["name"]), bool(row["open"]) and bool(row["delta_kept"])


def gate_matrix(summaries: Mapping[str, SummaryLike]) -> Tuple[List[str], List[str], List[List[bool]]]:
    """The data behind :func:`plot_gate_map`: ``(task_names, layer_names, open_matrix)``.

    ``summaries`` maps task name -> :class:`taps_fast.Summary` or its ``to_dict()``. Tasks keep the
    mapping's order; layers are in model order, from the first task. ``open_matrix[t][l]`` is True
    where layer l is open for task t with its delta kept (an open gate whose delta was dropped
    computes with the base weight, so it counts as closed). Every task must list the same layers
    in the same order (one base), else ValueError naming the first task and layer that differ.
    """
    if not isinstance(summaries, Mapping) or not summaries:
        raise ValueError(f"gate_matrix: expected a non-empty mapping task name -> Summary, got "
                         f"{summaries!r:.80}")
    tasks = [str(t) for t in summaries]
    layers: List[str] = []
    matrix: List[List[bool]] = []
    for ti, (task, s) in enumerate(summaries.items()):
        rows = _as_dict(s, f"gate_matrix: task {task!r}")["rows"]
        named = [_row_is_open(r, f"gate_matrix: task {task!r}, row {i}") for i, r in enumerate(rows)]
        names = [n for n, _ in named]
        if ti == 0:
            if not names:
                raise ValueError(f"gate_matrix: task {task!r} has no gated layers")
            layers = names
        elif names != layers:
            i = next((i for i, (a, b) in enumerate(zip(names, layers)) if a != b), min(len(names), len(layers)))
            got = repr(names[i]) if i < len(names) else "nothing"
            want = repr(layers[i]) if i < len(layers) else "nothing"
            raise ValueError(f"gate_matrix: task {task!r} has layer {got} at position {i} where task "
                             f"{tasks[0]!r} has {want}: all tasks must come from the same base model "
                             f"({len(names)} vs {len(layers)} layers)")
        matrix.append([o for _, o in named])
    return tasks, layers, matrix


def _task_fraction(totals: Any, where: str) -> float:
    if not isinstance(totals, Mapping) or "task_fraction" not in totals:
        raise ValueError(f"{where}: missing key 'task_fraction' in the summary's totals")
    return float(totals["task_fraction"])


def plot_gate_map(summaries: Mapping[str, SummaryLike], path: Optional[PathLike] = None, *,
                  title: Optional[str] = None) -> "Figure":
    """The per-layer open/closed map across tasks (the TAPS paper's Figure 3).

    One row per task, one column per gated layer in model order; a filled cell where the task
    changes the layer (gate open and delta kept, see :func:`gate_matrix`), empty where the layer is
    the shared base. Row labels: ``task  p% open/layers`` with p = 100·task_fraction (the task's
    parameters over the base model's). With more than 40 layers every k-th name is written
    (k = ceil(layers / 40)). Saved to ``path`` if given (PNG unless its suffix says otherwise,
    150 dpi). Returns the matplotlib Figure.
    """
    tasks, layers, matrix = gate_matrix(summaries)
    fracs = [_task_fraction(_as_dict(s, f"plot_gate_map: task {t!r}")["totals"], f"plot_gate_map: task {t!r}")
             for t, s in summaries.items()]
    row_labels = [f"{t}  {100 * f:.2f}%  {sum(m)}/{len(m)}" for t, f, m in zip(tasks, fracs, matrix)]
    n_t, n_l = len(tasks), len(layers)
    cell = min(CELL_IN, MAX_WIDTH_IN / n_l)
    label_w = 0.065 * max(map(len, row_labels)) + 0.3  # ~0.065 in per 8 pt character
    name_h = 0.055 * max(map(len, layers)) + 0.6  # rotated 6 pt names below the map
    fig = _new_figure((max(5.5, label_w + n_l * cell + 0.4), max(1.5, n_t * max(cell, 0.25) + name_h + 0.6)))
    ax = fig.add_subplot()

    from matplotlib.colors import ListedColormap

    ax.imshow(matrix, cmap=ListedColormap(["white", "tab:blue"]), vmin=0, vmax=1, aspect="auto",
              interpolation="nearest")
    step = max(1, math.ceil(n_l / MAX_LABELS))
    ax.set_xticks(range(0, n_l, step), [layers[i] for i in range(0, n_l, step)], rotation=90, fontsize=6)
    ax.set_yticks(range(n_t), row_labels, fontsize=8)
    # Cell borders on the minor ticks, so empty (closed) cells stay visible.
    ax.set_xticks([i - 0.5 for i in range(n_l + 1)], minor=True)
    ax.set_yticks([i - 0.5 for i in range(n_t + 1)], minor=True)
    ax.grid(which="minor", color="0.75", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=2)
    ax.set_xlabel("gated layer: filled = task-specific (open), empty = shared base", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save(fig, path)
    return fig


def _check_point(p: Any, where: str, need_lam: bool) -> Dict[str, Any]:
    """Validate one sweep point or baseline; returns {"lam", "accuracy", "task_fraction", "task"}."""
    if not isinstance(p, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(p).__name__}")
    keys = (["lam"] if need_lam else []) + ["accuracy"]
    for key in keys:
        if key not in p:
            raise ValueError(f"{where}: missing key {key!r}")
    out: Dict[str, Any] = {"task": p.get("task")}
    if need_lam:
        lam = p["lam"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"{where}: key 'lam' must be a finite number >= 0, got {lam!r}")
        out["lam"] = float(lam)
    acc = p["accuracy"]
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
        raise ValueError(f"{where}: key 'accuracy' must be a number in [0, 1], got {acc!r}")
    out["accuracy"] = float(acc)
    if "task_fraction" in p:
        frac, key = p["task_fraction"], "task_fraction"
    elif "summary" in p:
        frac, key = _task_fraction(_as_dict(p["summary"], f"{where}, key 'summary'")["totals"],
                                   f"{where}, key 'summary'"), "summary"
    else:
        raise ValueError(f"{where}: missing key 'task_fraction' (or 'summary')")
    # > 0, not only >= 0: the x axis is logarithmic (a real task always counts its scores).
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not (math.isfinite(frac) and frac > 0):
        raise ValueError(f"{where}: key {key!r} gives task fraction {frac!r}; it must be a finite number > 0")
    out["task_fraction"] = float(frac)
    return out


def plot_lambda_sweep(points: Sequence[Mapping[str, Any]], path: Optional[PathLike] = None, *,
                      baselines: Optional[Mapping[str, Mapping[str, float]]] = None,
                      title: Optional[str] = None) -> "Figure":
    """Accuracy against task-specific parameters for a sweep over λ (the sparsity weight).

    ``points``: dicts with "lam", "accuracy" (in [0, 1]) and "task_fraction" (the task's
    parameters / the base model's, > 0) or "summary" (a Summary or its dict, whose totals give
    it), optionally "task" (one line per task). x = 100·task_fraction (% of the base model, log
    axis), y = 100·accuracy; each task's points are joined in increasing task fraction and
    annotated with their λ. ``baselines``: label -> {"accuracy", "task_fraction"} (e.g. "full
    fine-tuning", "head only"), drawn as distinct markers. Bad input raises ValueError naming the
    point index (or baseline label) and key. Saved to ``path`` if given. Returns the Figure.
    """
    if isinstance(points, (str, bytes, Mapping)) or not isinstance(points, Sequence) or not points:
        raise ValueError(f"plot_lambda_sweep: points must be a non-empty sequence of dicts, got {points!r:.80}")
    pts = [_check_point(p, f"plot_lambda_sweep: point {i}", True) for i, p in enumerate(points)]
    base = [(str(k), _check_point(v, f"plot_lambda_sweep: baseline {k!r}", False))
            for k, v in (baselines or {}).items()]
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for p in pts:
        groups.setdefault(p["task"], []).append(p)
    several = len(groups) > 1

    fig = _new_figure((6.4, 4.4))
    ax = fig.add_subplot()
    for gi, (task, ps) in enumerate(groups.items()):
        ps = sorted(ps, key=lambda p: (p["task_fraction"], p["lam"]))
        xs = [100 * p["task_fraction"] for p in ps]
        ys = [100 * p["accuracy"] for p in ps]
        label = (str(task) if task is not None else "(no task)") if several else (None if task is None else str(task))
        ax.plot(xs, ys, marker="o", color=f"C{gi % 10}", label=label)
        same: Dict[Tuple[float, float], List[str]] = {}  # runs ending at one point get one label
        for p, x, y in zip(ps, xs, ys):
            same.setdefault((x, y), []).append(f"{p['lam']:g}")
        for (x, y), lams in same.items():
            ax.annotate(f"λ={', '.join(lams)}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    markers = "*Ds^PXv<>"  # distinct from the sweep lines' "o"
    for bi, (label, b) in enumerate(base):
        ax.scatter([100 * b["task_fraction"]], [100 * b["accuracy"]], marker=markers[bi % len(markers)],
                   s=70, color=f"C{(len(groups) + bi) % 10}", edgecolors="black", linewidths=0.5,
                   zorder=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("task-specific parameters (% of the base model)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, which="both", color="0.9", linewidth=0.5)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig
