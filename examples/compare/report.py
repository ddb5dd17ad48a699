"""The comparison's outputs: one terminal/markdown table, results.json and an accuracy-vs-KV-size plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def table(rows: list[dict[str, Any]], lengths: list[int]) -> str:
    """A markdown table: passkey exact-match accuracy per length, per-digit accuracy (all lengths),
    perplexity, KV bytes/token (and vs dense), train time."""
    head = ["variant", *(f"passkey@{n}" for n in lengths), "digits", "ppl", "KV B/token", "vs dense", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "error" in row:
            blanks = " | ".join(["-"] * (len(head) - 2))
            lines.append(f"| {row['variant']} | {blanks} | failed: {row['error']} |")
            continue
        cells = [
            row["variant"],
            *(f"{row['passkey'][str(n)]:.0%}" for n in lengths),
            f"{row['passkey_digits']:.0%}",
            f"{row['ppl']:.2f}",
            f"{row['kv_bytes_per_token']:,.0f}",
            f"{row['kv_vs_dense']:.3f}",
            f"{row['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json and accuracy_vs_kv.png (mean passkey accuracy over lengths vs KV size relative to dense)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["variants"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row in rows:
        accuracy = sum(row["passkey"].values()) / len(row["passkey"])
        ax.scatter(row["kv_vs_dense"], accuracy, s=36)
        ax.annotate(row["variant"], (row["kv_vs_dense"], accuracy), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("KV bytes per token held after a prefill, relative to dense")
    ax.set_ylabel("passkey exact-match accuracy (mean over lengths)")
    lengths = ", ".join(str(n) for n in results["settings"]["eval_lengths"])
    ax.set_title(f"Same retrofit budget ({results['settings']['budget']['steps']} steps); lengths {lengths}")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "accuracy_vs_kv.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
    return written
