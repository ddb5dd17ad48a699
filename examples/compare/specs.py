"""The variants compared, each as lcplug patch spec plus the train mode of its own retrofit stage.

Every variant reads raw keys over the same 128-token window (the sparse ones) so that what differs is
what each adds beyond it: summaries (ksa), pooled entries (csa, hca, nsa), another layer's K/V
(hysparse), a latent (mla), an n-gram memory (engram), gates choosing full layers (loza).
The window is far below the 1024-token retrofit length, so a needle at depth 0 is out of every raw window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

WINDOW = 128


@dataclass(frozen=True)
class Variant:
    """An attention plugin spec and how its first ("adapt") stage trains; the second ("heal") trains `all`.

    `adapt_train` is the variant's own retrofit group (`compress`, `gates`, `latent`, `memory`) or `all`
    where it has none; `adapt_losses` its losses; `heal_losses` what the second stage adds to `lm`.
    """

    attention: str | dict[str, Any]
    adapt_train: str = "all"
    adapt_losses: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    finalize: bool = False
    heal_losses: dict[str, float] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "full": Variant("full"),
    "sliding-window": Variant({"name": "sliding-window", "window": WINDOW, "sinks": 4}),
    # calibrate one gate per layer (full vs streaming), finalize: the lower-gated half becomes streaming
    "loza": Variant(
        {"name": "loza", "mode": "calibrate", "block": 32, "sink_blocks": 1, "local_blocks": WINDOW // 32},
        adapt_train="gates",
        finalize=True,
    ),
    "ksa": Variant({"name": "ksa", "chunk": 8, "window": WINDOW // 8}, "compress", {"distill": 1.0}),
    "csa": Variant(
        {"name": "csa", "window": WINDOW, "size": 8, "stride": 4, "topk": 32, "heads": 8, "dim": 32},
        "compress",
        {"distill": 1.0},
        heal_losses={"indexer_kl": 1.0},
    ),
    "hca": Variant({"name": "hca", "size": 32, "window": WINDOW}, "compress", {"distill": 1.0}),
    "nsa": Variant(
        {"name": "nsa", "size": 32, "stride": 16, "select_block": 64, "select_count": 4, "window": WINDOW},
        "gates",
        {"distill": 1.0},
    ),
    "hysparse": Variant(
        {"name": "hysparse", "period": 2, "topk": 2, "block_size": 64, "window": WINDOW, "sinks": 4}, "gates"
    ),
    "mla": Variant("mla", "latent"),
    "engram": Variant({"name": "engram", "memory_layers": [1]}, "memory"),
}

QUICK = ("full", "sliding-window")
"""What `--quick` compares: the dense reference and the simplest sparse variant."""
