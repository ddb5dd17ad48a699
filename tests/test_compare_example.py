"""examples/compare/variants.py --quick end to end: retrofit, evaluate and measure, then the table and JSON.

Checks the structure, not the numbers (the quick budget trains two steps of the shipped base).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare" / "variants.py"


def test_quick_comparison_writes_table_json_and_plot(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("specs", None)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--variants", "full", "--samples", "1", "--out", str(tmp_path)])

    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "accuracy_vs_kv.png").stat().st_size > 0
    settings = results["settings"]
    assert settings["eval_lengths"] == [256] and settings["budget"]["steps"] == 2
    (row,) = results["variants"]
    assert "error" not in row, row
    assert row["variant"] == "full" and set(row["passkey"]) == {"256"}
    assert 0.0 <= row["passkey"]["256"] <= 1.0 and row["ppl"] > 1.0
    assert row["kv_bytes_per_token"] > 0 and row["kv_vs_dense"] == 1.0
    assert row["train_tokens"] == 2 * 2 * 256
    table = capsys.readouterr().out
    assert "| variant | passkey@256 | digits | ppl | KV B/token | vs dense | train s |" in table
    assert "| full | " in table
