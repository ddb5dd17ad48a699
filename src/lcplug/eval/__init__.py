"""Long-context evaluation: passkey, needle grid, multi-key retrieval, perplexity by length and position.

    from lcplug.eval import evaluate, build_probes, write_report
    result = evaluate(model, build_probes("passkey,needle,ppl", lengths=[1024, 4096]), tokenizer=tok)
    write_report([result], "eval-out/")      # results.json, heatmap_<probe>.png, ppl.png

The same probes run from `lcplug eval`, every N training steps (`EvalCallback`), and into the model card
(`model_card_section`). See docs/eval.md.
"""

from __future__ import annotations

from .callbacks import EvalCallback
from .haystack import Haystack, HaystackError
from .probes import (
    PROBES,
    MultiKeyProbe,
    NeedleProbe,
    PasskeyProbe,
    PerplexityProbe,
    Probe,
    ProbeError,
    RetrievalProbe,
    build_probes,
    greedy_answer,
    max_positions,
    score,
    token_nll,
)
from .report import format_table, model_card_section, plot_heatmap, plot_ppl, write_json, write_report
from .runner import EvalLoadError, evaluate, load_for_eval, metrics, report
from .tokens import ByteTokenizer, HFTokenizer, Tokenizer, TokenizerError, as_tokenizer, load_tokenizer

__all__ = [
    "PROBES",
    "ByteTokenizer",
    "EvalCallback",
    "EvalLoadError",
    "HFTokenizer",
    "Haystack",
    "HaystackError",
    "MultiKeyProbe",
    "NeedleProbe",
    "PasskeyProbe",
    "PerplexityProbe",
    "Probe",
    "ProbeError",
    "RetrievalProbe",
    "Tokenizer",
    "TokenizerError",
    "as_tokenizer",
    "build_probes",
    "evaluate",
    "format_table",
    "greedy_answer",
    "load_for_eval",
    "load_tokenizer",
    "max_positions",
    "metrics",
    "model_card_section",
    "plot_heatmap",
    "plot_ppl",
    "report",
    "score",
    "token_nll",
    "write_json",
    "write_report",
]
