"""`lcplug data preview`: the realised mixture as a table, JSON and a PNG histogram; bad recipes are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lcplug.cli import main


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    (tmp_path / "notes.jsonl").write_text(
        "".join(json.dumps({"text": f"note {i} " * (3 + i)}) + "\n" for i in range(50))
    )
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    data = {
        "model": "ignored by the data section",
        "data": {
            "seed": 0,
            "seq_len": 256,
            "batch_size": 4,
            "sources": {
                "notes": {"name": "text", "paths": [str(tmp_path / "notes.jsonl"), str(tmp_path / "bad.txt")]},
                "keys": {"name": "needles", "lengths": [200]},
            },
            "mixture": "notes@0.7,keys@0.3",
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preview_prints_the_mixture_and_writes_a_histogram(recipe, capsys):
    png = recipe.parent / "lengths.png"
    recipe.write_text(recipe.read_text().replace("notes@0.7,keys@0.3", "notes@70,keys@30"))
    with pytest.warns(UserWarning, match="sum to 100"):
        code = main(["data", "preview", str(recipe), "--tokens", "20000", "--png", str(png)])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("realised mixture over 20,480 tokens: 20 batches (4 x 256)")
    notes = next(line for line in lines if line.startswith("notes "))
    assert "70.0%" in notes and "1 undecodable" in notes
    assert any(line.startswith("keys ") and "30.0%" in line for line in lines)
    assert any(line.startswith("128-256 ") for line in lines)  # the needle samples' length bucket
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in err


def test_preview_json(recipe, capsys, tmp_path):
    code = main(["data", "preview", str(recipe), "--tokens", "4000", "--json", "--png", str(tmp_path / "h.png")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    shares = {d["domain"]: d["realised"] for d in report["domains"]}
    assert shares["notes"] == pytest.approx(0.7, abs=0.05) and report["tokens"] >= 4000


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["data"]["sources"]["notes"].update(name="txt"), "unknown data plugin 'txt'; did you mean 'text'"),
        (
            lambda d: d["data"]["sources"]["notes"].update(paths=["/no/such/file"]),
            "path '/no/such/file' does not exist",
        ),
        (lambda d: d["data"].update(mixture="notes@-1"), "valid: a finite number >= 0"),
        (lambda d: d["data"].update(seqlen=5), "unknown data key 'seqlen'"),
    ],
)
def test_bad_recipes_are_one_line_errors(recipe, capsys, edit, message):
    data = yaml.safe_load(recipe.read_text())
    edit(data)
    recipe.write_text(yaml.safe_dump(data))
    code = main(["data", "preview", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lcplug: error: ") and message in err[0]


def test_missing_recipe(capsys, tmp_path):
    assert main(["data", "preview", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
