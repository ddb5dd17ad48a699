"""`lcplug data preview`: run a recipe's pipeline for a while and show the mixture it really produces.

The realised mixture can differ from the weights a recipe asks for (a source runs dry, upsampling
thins short documents, cut lengths split long ones), and only running the pipeline shows by how much:
tokens per domain against its target, documents and their mean length, what each source skipped,
padding, documents per row, throughput, and a histogram of document lengths per domain (as text and
as a PNG).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .pipeline import PackedLoader


def preview(loader: PackedLoader, tokens: int) -> dict[str, Any]:
    """Draw batches until `tokens` tokens (padding included) are made, or the stream ends; the report as a dict."""
    start = time.perf_counter()
    made = batches = rows = segments = 0
    shapes: set[tuple[int, int]] = set()
    while made < tokens:
        try:
            batch = next(loader)
        except StopIteration:
            break
        b, length = batch["input_ids"].shape
        shapes.add((b, length))
        made += b * length
        batches += 1
        rows += b
        segments += len(batch["cu_seqlens"]) - 1
    seconds = time.perf_counter() - start
    total = sum(loader.tokens.values()) or 1
    skipped = loader.skipped()
    domains = []
    buckets: set[int] = set()
    for domain, stream in zip(loader.domains, loader.streams):
        stats = stream.stats
        buckets |= set(stats.length_tokens)
        domains.append(
            {
                "domain": domain.label,
                "source": domain.source,
                "target": domain.weight,
                "realised": loader.tokens[domain.label] / total,
                "tokens": loader.tokens[domain.label],
                "documents": stats.docs,
                "tokens_per_document": stats.tokens / stats.docs if stats.docs else None,
                "skipped": skipped[domain.label],
                "length_tokens": {str(b): n for b, n in sorted(stats.length_tokens.items())},
                "length_documents": {str(b): n for b, n in sorted(stats.length_docs.items())},
            }
        )
    return {
        "tokens": made,
        "padding": loader.padding,
        "batches": batches,
        "rows": rows,
        "shapes": sorted(shapes),
        "documents_per_row": segments / rows if rows else 0.0,
        "seconds": round(seconds, 3),
        "tokens_per_second": made / seconds if seconds > 0 else None,
        "buckets": sorted(buckets),
        "domains": domains,
    }


def bucket_label(bucket: int) -> str:
    """Bucket b holds lengths in [2**b, 2**(b+1)): written `512-1K` (upper end excluded)."""
    return f"{_size(2**bucket)}-{_size(2 ** (bucket + 1))}"


def _size(n: int) -> str:
    for unit, shift in (("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def format_preview(report: dict[str, Any]) -> str:
    """The human report: the mixture table, then each domain's share of tokens per document-length bucket."""
    shapes = ", ".join(f"{b} x {n}" for b, n in report["shapes"]) or "none"
    rate = report["tokens_per_second"]
    lines = [
        f"realised mixture over {report['tokens']:,} tokens: {report['batches']} batches ({shapes}), "
        f"{report['padding'] / max(report['tokens'], 1):.1%} padding, {report['documents_per_row']:.2f} documents "
        f"per row" + (f", {rate:,.0f} tokens/s" if rate else "")
    ]
    table = [("domain", "source", "target", "realised", "tokens", "documents", "tokens/doc", "skipped")]
    for d in report["domains"]:
        mean = d["tokens_per_document"]
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(d["skipped"].items())) or "-"
        table.append(
            (
                d["domain"],
                d["source"],
                f"{d['target']:.1%}",
                f"{d['realised']:.1%}",
                f"{d['tokens']:,}",
                f"{d['documents']:,}",
                "-" if mean is None else f"{mean:,.0f}",
                skipped,
            )
        )
    lines += _grid(table)
    if report["buckets"]:
        lines.append("share of each domain's tokens by the length of the document they come from (tokens)")
        hist = [("length", *(d["domain"] for d in report["domains"]))]
        for b in report["buckets"]:
            row = [bucket_label(b)]
            for d in report["domains"]:
                whole = sum(d["length_tokens"].values())
                row.append(f"{d['length_tokens'].get(str(b), 0) / whole:.1%}" if whole else "-")
            hist.append(tuple(row))
        lines += _grid(hist)
    return "\n".join(lines)


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def write_histogram(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of tokens per document-length bucket, stacked by domain (needs matplotlib)."""
    from ..eval.report import _pyplot, _save

    plt = _pyplot()
    buckets = report["buckets"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(buckets) + 2), 4))
    bottom = [0] * len(buckets)
    for d in report["domains"]:
        heights = [d["length_tokens"].get(str(b), 0) for b in buckets]
        ax.bar(range(len(buckets)), heights, bottom=bottom, label=d["domain"])
        bottom = [x + h for x, h in zip(bottom, heights)]
    ax.set_xticks(range(len(buckets)), [bucket_label(b) for b in buckets], rotation=45, ha="right")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("tokens")
    ax.set_title(f"realised mixture: {report['tokens']:,} tokens by document length")
    if report["domains"]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(plt, fig, path)
