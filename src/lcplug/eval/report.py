"""Results of several models side by side: JSON, a terminal table, PNG plots, a model-card section.

Every function takes a list of per-model results (what `lcplug.eval.evaluate` returns), so one table or
one figure compares a base model with its retrofits. Cells past a model's `max_position_embeddings`
are marked (`*` in tables, hatched in heatmaps, hollow markers in curves): such a number is measured,
not clipped, but it is outside what the model was built for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import LcplugError
from .runner import report

BEYOND = "*"
"""Marks a value measured beyond the model's max_position_embeddings."""


class PlotError(LcplugError, RuntimeError):
    """Plots were asked for but matplotlib is not installed."""


def retrieval_probes(results: Sequence[dict[str, Any]]) -> list[str]:
    """Names of the retrieval probes (those with a depth x length grid) any model ran, in run order."""
    names: dict[str, None] = {}
    for result in results:
        names.update((name, None) for name, probe in result["probes"].items() if "cells" in probe)
    return list(names)


def write_json(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `results.json`: the lcplug version and every model's full result (each trial included)."""
    path = Path(path)
    path.write_text(json.dumps(report(results), indent=2) + "\n")
    return path


# ---- terminal table -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    table = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in table]


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One block per probe: a row per (length, depth) cell or per length, a column per model."""
    labels = [r["model"] for r in results]
    lines: list[str] = []
    marked = False
    for name in retrieval_probes(results):
        lines.append(f"{name}: exact-match accuracy (per-digit accuracy)")
        rows = []
        keys = _keys(results, name, "cells", ("length", "depth"))
        for length, depth in keys:
            row = [str(length), f"{depth:.2f}"]
            for result in results:
                cell = _find(result, name, "cells", length=length, depth=depth)
                row.append(_retrieval_text(cell))
                marked |= bool(cell and cell["beyond_max_positions"])
            rows.append(row)
        for length in sorted({k[0] for k in keys}):
            row = [str(length), "mean"]
            for result in results:
                row.append(_retrieval_text(_find(result, name, "by_length", length=length)))
            rows.append(row)
        lines += _grid(["length", "depth", *labels], rows)
        lines.append("")
    if any("ppl" in r["probes"] for r in results):
        chunk = next(r["probes"]["ppl"]["settings"]["chunk"] for r in results if "ppl" in r["probes"])
        lines.append(f"ppl by context length (perplexity of the same last {chunk} tokens)")
        rows = []
        for (length,) in _keys(results, "ppl", "by_length", ("length",)):
            row = [str(length)]
            for result in results:
                cell = _find(result, "ppl", "by_length", length=length)
                row.append(_ppl_text(cell))
                marked |= bool(cell and cell["beyond_max_positions"])
            rows.append(row)
        lines += _grid(["length", *labels], rows)
        lines.append("")
        lines.append("ppl by token position (mean over samples of the longest length)")
        rows = []
        for start, end in _keys(results, "ppl", "by_position", ("start", "end")):
            row = [f"{start}-{end - 1}"]
            for result in results:
                cell = _find(result, "ppl", "by_position", start=start, end=end)
                row.append(_ppl_text(cell))
                marked |= bool(cell and cell["beyond_max_positions"])
            rows.append(row)
        lines += _grid(["positions", *labels], rows)
        lines.append("")
    if marked:
        limits = ", ".join(f"{r['model']}: {r['max_position_embeddings']}" for r in results)
        lines.append(f"{BEYOND} beyond max_position_embeddings ({limits}): measured, not clipped")
    return "\n".join(lines).rstrip()


def _keys(results: Sequence[dict[str, Any]], probe: str, table: str, fields: tuple[str, ...]) -> list[tuple]:
    keys = {tuple(row[f] for f in fields) for r in results if probe in r["probes"] for row in r["probes"][probe][table]}
    return sorted(keys)


def _find(result: dict[str, Any], probe: str, table: str, **where: Any) -> dict[str, Any] | None:
    rows = result["probes"].get(probe, {}).get(table, [])
    return next((row for row in rows if all(row[k] == v for k, v in where.items())), None)


def _retrieval_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    mark = BEYOND if cell["beyond_max_positions"] else ""
    if cell.get("accuracy") is None:
        return f"error{mark}"
    return f"{_fmt(cell['accuracy'])} ({_fmt(cell['digit_accuracy'])}){mark}"


def _ppl_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    mark = BEYOND if cell["beyond_max_positions"] else ""
    return ("error" if cell["ppl"] is None else _fmt(cell["ppl"], 3)) + mark


# ---- plots ----------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed), or a clear error."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("PNG plots need matplotlib; install it (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(results: Sequence[dict[str, Any]], probe: str, path: str | Path) -> Path:
    """Accuracy over depth (rows, 0 at the top) x length (columns), one panel per model, shared colour scale.

    Columns past a model's positions are hatched and their length label starred.
    """
    plt = _pyplot()
    shown = [r for r in results if probe in r["probes"]]
    fig, axes = plt.subplots(
        1, len(shown), figsize=(max(4.8, 1.2 + 2.8 * len(shown)), 3.8), squeeze=False, constrained_layout=True
    )
    image = None
    for ax, result in zip(axes[0], shown):
        data = result["probes"][probe]
        lengths = sorted({c["length"] for c in data["cells"]})
        depths = sorted({c["depth"] for c in data["cells"]})
        grid = [[math.nan] * len(lengths) for _ in depths]
        beyond = set()
        for c in data["cells"]:
            i, j = depths.index(c["depth"]), lengths.index(c["length"])
            grid[i][j] = math.nan if c["accuracy"] is None else c["accuracy"]
            if c["beyond_max_positions"]:
                beyond.add(j)
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                value = grid[i][j]
                ax.text(j, i, "err" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
        for j in beyond:
            ax.add_patch(plt.Rectangle((j - 0.5, -0.5), 1, len(depths), fill=False, hatch="//", edgecolor="0.3", lw=0))
        ax.set_xticks(range(len(lengths)), [f"{n}{BEYOND if j in beyond else ''}" for j, n in enumerate(lengths)])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(result["model"], fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy", shrink=0.9)
    fig.suptitle(f"{probe} retrieval accuracy\n(hatched, {BEYOND}: beyond max_position_embeddings)", fontsize=9)
    return _save(plt, fig, path)


def plot_ppl(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Perplexity versus context length (left) and versus token position (right), one line per model.

    Points past a model's positions are hollow; a dotted line marks each model's max_position_embeddings.
    """
    plt = _pyplot()
    from matplotlib import ticker

    shown = [r for r in results if "ppl" in r["probes"]]
    fig, (by_length, by_position) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for index, result in enumerate(shown):
        color = f"C{index}"
        data = result["probes"]["ppl"]
        rows = [r for r in data["by_length"] if r["ppl"] is not None]
        _curve(by_length, [r["length"] for r in rows], rows, color, result["model"])
        buckets = data["by_position"]
        _curve(by_position, [(b["start"] + b["end"] - 1) / 2 for b in buckets], buckets, color, result["model"])
        limit = result["max_position_embeddings"]
        if limit is not None:
            for ax in (by_length, by_position):
                ax.axvline(limit, color=color, ls=":", lw=1)
    lengths = sorted({row["length"] for r in shown for row in r["probes"]["ppl"]["by_length"]})
    by_length.set_xscale("log", base=2)
    by_length.set_xticks(lengths, [str(n) for n in lengths])
    by_length.xaxis.set_minor_locator(ticker.NullLocator())
    by_length.set(xlabel="context length (tokens)", ylabel="perplexity", title="ppl of the last chunk by length")
    by_position.set(xlabel="token position", ylabel="perplexity", title="ppl by position (longest length)")
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    for ax in (by_length, by_position):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.grid(alpha=0.3, which="both")
    by_length.legend(fontsize=8)
    return _save(plt, fig, path)


def _curve(ax: Any, xs: list[float], rows: list[dict[str, Any]], color: str, label: str) -> None:
    """A line with filled markers inside the model's positions and hollow ones beyond."""
    ys = [r["ppl"] for r in rows]
    ax.plot(xs, ys, color=color, label=label)
    for x, y, row in zip(xs, ys, rows):
        ax.plot([x], [y], "o", color=color, mfc="white" if row["beyond_max_positions"] else color, ms=5)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Sequence[dict[str, Any]], out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """results.json, heatmap_<probe>.png per retrieval probe and ppl.png into `out_dir` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results": write_json(results, out / "results.json")}
    if plots:
        for name in retrieval_probes(results):
            files[name] = plot_heatmap(results, name, out / f"heatmap_{name}.png")
        if any("ppl" in r["probes"] for r in results):
            files["ppl"] = plot_ppl(results, out / "ppl.png")
    return files


# ---- model card -----------------------------------------------------------------------------------


def model_card_section(
    results: dict[str, Any] | Sequence[dict[str, Any]],
    *,
    plots: dict[str, str] | None = None,
    history: Sequence[tuple[int, dict[str, float]]] = (),
) -> str:
    """Markdown for a model card: accuracy and perplexity by length per model, the plots, the training curve.

    `plots` maps a probe name (or "ppl") to an image path relative to the card; `history` is
    (step, metrics) pairs, e.g. `EvalCallback.history`, shown as one row per evaluation.
    """
    results = [results] if isinstance(results, dict) else list(results)
    labels = [r["model"] for r in results]
    lines = ["## Long-context evaluation", ""]
    first = results[0]
    settings = next(iter(first["probes"].values()))["settings"] if first["probes"] else {}
    lines.append(
        f"Measured with `lcplug eval` (lcplug {__version__}; seed {settings.get('seed', 0)}, "
        f"{settings.get('samples', '-')} samples per cell; haystack: `{first['haystack'] or 'none'}`). "
        f"Values marked {BEYOND} are beyond the model's `max_position_embeddings`."
    )
    lines.append("")
    for name in retrieval_probes(results):
        lines += [f"### {name}: exact-match accuracy by context length (mean over depths)", ""]
        lengths = [k[0] for k in _keys(results, name, "by_length", ("length",))]
        lines += _md_table(
            ["model", *map(str, lengths)],
            [
                [label, *(_retrieval_text(_find(r, name, "by_length", length=n)) for n in lengths)]
                for label, r in zip(labels, results)
            ],
        )
        if plots and name in plots:
            lines += ["", f"![{name} accuracy over depth x length]({plots[name]})"]
        lines.append("")
    if any("ppl" in r["probes"] for r in results):
        lines += ["### Perplexity by context length", ""]
        lengths = [k[0] for k in _keys(results, "ppl", "by_length", ("length",))]
        lines += _md_table(
            ["model", *map(str, lengths)],
            [
                [label, *(_ppl_text(_find(r, "ppl", "by_length", length=n)) for n in lengths)]
                for label, r in zip(labels, results)
            ],
        )
        if plots and "ppl" in plots:
            lines += ["", f"![perplexity by length and position]({plots['ppl']})"]
        lines.append("")
    if history:
        names = sorted({k for _, m in history for k in m})
        lines += ["### During training", ""]
        lines += _md_table(["step", *names], [[str(step), *(_fmt(m.get(k), 3) for k in names)] for step, m in history])
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
