"""Long-context probes: scoring sanity with fake models, real tiny models end to end, reports, CLI, callback."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lcplug
from lcplug.cli import main
from lcplug.eval import (
    ByteTokenizer,
    EvalCallback,
    Haystack,
    HaystackError,
    HFTokenizer,
    MultiKeyProbe,
    NeedleProbe,
    PasskeyProbe,
    PerplexityProbe,
    ProbeError,
    TokenizerError,
    build_probes,
    evaluate,
    format_table,
    metrics,
    model_card_section,
    score,
    write_report,
)
from lcplug.eval.haystack import source_files
from lcplug.testing import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
BYTES = ByteTokenizer()
RETRIEVAL = (PasskeyProbe, NeedleProbe, MultiKeyProbe)


@pytest.fixture(scope="module")
def haystack() -> Haystack:
    """The default source (the stdlib's own code), capped so reading it costs little."""
    return Haystack(max_chars=200_000)


# ---- fake models: the same generate / forward interface, so the same scoring code runs ----------------


def _answer_pattern(question: str) -> str:
    """Where the answer to the prompt's last line is written, as a regex (the probes' default templates)."""
    if "pass key" in question:
        return r"The pass key is (\d+)"
    if "magic number" in question:
        return r"The special magic number is (\d+)"
    name = re.search(r"value of key (\w+)\?", question).group(1)
    return rf"The value of key {name} is (\d+)"


class Reader:
    """An oracle: reads the needle out of the part of its prompt it can see and copies it.

    `visible=0.5` only sees the first half of its context (it still reads the question, which is how it
    knows what to look for): it must answer exactly the needles in that half.
    """

    def __init__(self, tokenizer, visible: float = 1.0):
        self.tokenizer, self.visible = tokenizer, visible

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kwargs):
        ids = input_ids[0].tolist()
        seen = self.tokenizer.decode(ids[: int(len(ids) * self.visible)])
        question = self.tokenizer.decode(ids).rsplit("\n", 1)[-1]
        found = re.search(_answer_pattern(question), seen)
        new = self.tokenizer.encode(f" {found.group(1)}." if found else " I do not know.")[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


class Guesser:
    """A random model: answers five seeded random digits, whatever the prompt."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kwargs):
        digits = "".join(str(int(d)) for d in torch.randint(10, (5,), generator=self.generator))
        return torch.cat([input_ids, torch.tensor([BYTES.encode(f" {digits}.")[:max_new_tokens]])], dim=1)


class Uniform:
    """Logits all equal: every token's NLL is exactly log(vocab)."""

    def __call__(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 256))


class Peeker:
    """Cheats by looking one token ahead: a correct next-token alignment gives perplexity 1, a shifted one e^60."""

    def forward(self, input_ids, logits_to_keep: int = 0):
        logits = torch.full((*input_ids.shape, 256), -30.0)
        logits[0, torch.arange(input_ids.shape[1] - 1), input_ids[0, 1:]] = 30.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)

    __call__ = forward


class Fragile(Reader):
    """An oracle with learned absolute positions: any input past 256 positions raises, as nn.Embedding does."""

    config = SimpleNamespace(max_position_embeddings=256)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kwargs):
        if input_ids.shape[1] + max_new_tokens > 256:
            raise IndexError("index out of range in self")
        return super().generate(input_ids, max_new_tokens=max_new_tokens)


# ---- scoring sanity -----------------------------------------------------------------------------------


def test_score_exact_and_per_digit():
    assert score(" 71432. Remember", "71432") == (True, 1.0)
    assert score(" 71400", "71432") == (False, 0.6)
    assert score(" 714329", "71432") == (False, 1.0)  # a longer number is not the key
    assert score(" none", "71432") == (False, 0.0)


@pytest.mark.parametrize("probe_cls", RETRIEVAL)
def test_oracle_retrieves_everything(probe_cls, haystack):
    probe = probe_cls(lengths=(256, 512), depths=(0, 0.3, 0.5, 1), samples=3)
    result = evaluate(Reader(BYTES), [probe], haystack=haystack)["probes"][probe.name]
    assert result["accuracy"] == 1.0 and result["digit_accuracy"] == 1.0
    assert all(c["accuracy"] == 1.0 and c["samples"] == 3 for c in result["cells"])
    assert len(result["trials"]) == 2 * 4 * 3


def test_progress_bars_go_to_stderr(capsys):
    evaluate(Reader(BYTES), [PasskeyProbe(lengths=(200,), depths=(0,), samples=2)], label="demo", progress=True)
    captured = capsys.readouterr()
    assert "demo passkey:" in captured.err and "0/2" in captured.err and not captured.out


def test_random_model_scores_chance(haystack):
    probe = PasskeyProbe(lengths=(200,), depths=(0, 0.25, 0.5, 0.75, 1), samples=60)
    result = evaluate(Guesser(seed=1), [probe])["probes"]["passkey"]
    assert result["accuracy"] <= 0.01  # a 5-digit number by chance: 1e-5
    assert 0.07 <= result["digit_accuracy"] <= 0.13  # 1500 digits at 1/10 each: 3 sigma is 0.023


@pytest.mark.parametrize("probe_cls", RETRIEVAL)
def test_half_context_model_fails_exactly_the_deep_needles(probe_cls, haystack):
    probe = probe_cls(lengths=(512, 768), depths=(0, 0.2, 0.8, 1), samples=3)
    result = evaluate(Reader(BYTES, visible=0.5), [probe], haystack=haystack)["probes"][probe.name]
    by_depth = {c["depth"]: c["accuracy"] for c in result["cells"] if c["length"] == 512}
    for cell in result["cells"]:
        assert cell["accuracy"] == (1.0 if cell["depth"] < 0.5 else 0.0), cell
    assert by_depth == {0.0: 1.0, 0.2: 1.0, 0.8: 0.0, 1.0: 0.0}


def test_perplexity_of_uniform_and_next_token_oracle(haystack):
    probe = PerplexityProbe(lengths=(64, 128, 256), samples=2, chunk=16, buckets=4)
    uniform = evaluate(Uniform(), [probe], haystack=haystack)["probes"]["ppl"]
    for row in uniform["by_length"]:
        assert row["ppl"] == pytest.approx(256.0) and row["tokens"] == 2 * 16
    assert [(b["start"], b["end"]) for b in uniform["by_position"]] == [(1, 64), (64, 128), (128, 192), (192, 256)]
    assert all(b["nll"] == pytest.approx(math.log(256)) for b in uniform["by_position"])
    peeker = evaluate(Peeker(), [probe], haystack=haystack)["probes"]["ppl"]
    assert all(row["ppl"] == pytest.approx(1.0) for row in peeker["by_length"] + peeker["by_position"])


# ---- prompts --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe(haystack) -> HFTokenizer:
    """A real transformers tokenizer (byte-level BPE, digits merged, a BOS prefix), trained offline in the test."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>"], initial_alphabet=alphabet, show_progress=False
    )
    corpus = [haystack.text[:20_000], " ".join(str(n) for n in range(10_000, 10_400)), PasskeyProbe.needle * 20]
    tk.train_from_iterator(corpus, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>"))


@pytest.mark.parametrize("probe_cls", RETRIEVAL)
@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_prompts_have_the_exact_length_and_differ_only_in_depth(probe_cls, tokenizer, haystack, request):
    tok = BYTES if tokenizer == "bytes" else request.getfixturevalue("bpe")
    probe = probe_cls(lengths=(300, 1000), depths=(0, 0.5, 1), samples=2)
    for length in probe.lengths:
        trials = [probe.make_trial(tok, haystack, length, depth, sample=1) for depth in probe.depths]
        assert all(len(t.prompt) == length for t in trials)
        assert all(t.prompt[: len(tok.prefix)] == tok.prefix for t in trials)
        assert len({t.key for t in trials}) == 1  # same key and filler at every depth of a row
        assert len({tuple(sorted(t.prompt)) for t in trials}) == 1
        assert trials[0].prompt == probe.make_trial(tok, haystack, length, 0, sample=1).prompt  # seeded
        assert trials[0].prompt != probe.make_trial(tok, haystack, length, 0, sample=0).prompt


def test_oracle_with_a_transformers_tokenizer(bpe, haystack):
    probes = build_probes("passkey,needle,multikey", lengths=(300, 600), depths=(0, 0.5, 1), samples=2)
    result = evaluate(Reader(bpe), probes, tokenizer=bpe.tokenizer, haystack=haystack)
    assert result["tokenizer"].startswith("HFTokenizer(") and bpe.prefix == [0]
    assert all(result["probes"][p.name]["accuracy"] == 1.0 for p in probes)


def test_needles_start_at_a_line_or_sentence(haystack):
    trial = NeedleProbe(lengths=(2000,), depths=(0.5,)).make_trial(BYTES, haystack, 2000, 0.5, sample=0)
    text = BYTES.decode(trial.prompt)
    before = text[: text.index("\nThe special magic number")]
    assert before.rstrip(" ").endswith((".", "\n"))


# ---- haystack and bad input ---------------------------------------------------------------------------


def test_default_haystack_is_the_stdlib_in_sorted_order(haystack):
    import sysconfig

    assert haystack.source == Path(sysconfig.get_paths()["stdlib"])
    files = source_files(haystack.source, python_only=True)
    relative = [p.relative_to(haystack.source).as_posix() for p in files]
    assert relative == sorted(relative) and "__future__.py" in relative and "os.py" in relative
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert len(haystack.text) == 200_000
    assert haystack.text.startswith(files[0].read_text().strip()[:100])
    assert haystack.text == Haystack(max_chars=200_000).text
    window = haystack.window(BYTES, 500, random.Random(3))
    assert len(window) == 500 and window == haystack.window(BYTES, 500, random.Random(3))


def test_short_haystack_wraps_around(tmp_path):
    (tmp_path / "essay.txt").write_text("Short essay.\n")
    assert BYTES.decode(Haystack(tmp_path).window(BYTES, 40, random.Random(0))).count("Short essay.") >= 2


@pytest.mark.parametrize("content", [None, "", b"\xff\xfe\x00binary"])
def test_empty_haystack_source_errors(tmp_path, content):
    if isinstance(content, str):
        (tmp_path / "empty.txt").write_text(content)
    elif content is not None:
        (tmp_path / "blob.bin").write_bytes(content)
    with pytest.raises(HaystackError, match=r"has no text") as info:
        evaluate(Reader(BYTES), build_probes("needle", lengths=(256,)), haystack=tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(HaystackError, match="does not exist"):
        Haystack(tmp_path / "missing").window(BYTES, 10, random.Random(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": "passkey,neddle"}, "unknown probe 'neddle'; did you mean 'needle'"),
        ({"names": "needle", "depths": (0, 1.5)}, r"depths \[0, 1.5\]; valid: one or more numbers in \[0, 1\]"),
        ({"names": "needle", "lengths": (0, 512)}, "valid: one or more integers >= 1"),
        ({"names": "ppl", "samples": 0}, "samples=0; valid: an integer >= 1"),
        ({"names": "multikey", "keys": 99}, r"keys=99; valid: an integer in \[1, 26\]"),
    ],
)
def test_bad_probe_settings(kwargs, message):
    with pytest.raises(ProbeError, match=message):
        build_probes(**kwargs)


def test_length_too_short_fails_before_the_model_runs():
    class Untouchable:
        def generate(self, *args, **kwargs):
            raise AssertionError("the model ran")

    with pytest.raises(
        ProbeError, match=r"passkey: length 100 is too short: .* take \d+ tokens; valid: lengths >= \d+"
    ):
        evaluate(Untouchable(), [PasskeyProbe(lengths=(100, 4000))])


def test_bytes_need_a_vocabulary_of_256():
    with pytest.raises(TokenizerError, match="vocabulary of 128 < 256"):
        evaluate(tiny_model("llama"), "passkey")


def test_beyond_max_positions_is_flagged_and_a_crash_there_is_recorded(haystack):
    probe = PasskeyProbe(lengths=(200, 400), depths=(0, 1), samples=2)
    result = evaluate(Fragile(BYTES), [probe], label="fragile")
    cells = result["probes"]["passkey"]["cells"]
    assert result["max_position_embeddings"] == 256
    assert [c["beyond_max_positions"] for c in cells] == [False, False, True, True]
    assert [c["accuracy"] for c in cells] == [1.0, 1.0, None, None]
    assert cells[2]["error"] == "index out of range in self" and cells[2]["samples"] == 0
    assert "error*" in format_table([result]) and "beyond max_position_embeddings (fragile: 256)" in format_table(
        [result]
    )

    class Broken(Fragile):
        def generate(self, *args, **kwargs):
            raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):  # within the model's positions, errors are not hidden
        evaluate(Broken(BYTES), [probe])


# ---- real tiny models end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_llama():
    return tiny_model("llama", vocab_size=256)


@pytest.fixture(scope="module")
def tiny_results(byte_llama, haystack):
    """A plain and a sliding-window model, every probe, one length past the 256 positions they support."""
    probes = build_probes("passkey,needle,multikey,ppl", lengths=(224, 320), depths=(0, 1), samples=1)
    plain = evaluate(byte_llama, probes, haystack=haystack, label="plain")
    patched = tiny_model("llama", vocab_size=256)
    lcplug.patch(patched, attention="sliding-window:window=32,sinks=4,block_size=16")
    sparse = evaluate(patched, build_probes("passkey,ppl", lengths=(224, 320), depths=(0, 1), samples=1),
                      haystack=haystack, label="sliding-window")  # fmt: skip
    return [plain, sparse]


def test_tiny_models_run_every_probe(tiny_results):
    plain, sparse = tiny_results
    assert list(plain["probes"]) == ["passkey", "needle", "multikey", "ppl"]
    assert plain["manifest"] is None and sparse["manifest"]["spec"]["attention"]["name"] == "sliding-window"
    for name in ("passkey", "needle", "multikey"):
        data = plain["probes"][name]
        assert [(c["length"], c["depth"]) for c in data["cells"]] == [(224, 0.0), (224, 1.0), (320, 0.0), (320, 1.0)]
        assert [c["beyond_max_positions"] for c in data["cells"]] == [False, False, True, True]
        assert 0.0 <= data["digit_accuracy"] <= 1.0
    for result in tiny_results:
        ppl = result["probes"]["ppl"]
        assert [r["beyond_max_positions"] for r in ppl["by_length"]] == [False, True]
        assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in ppl["by_length"] + ppl["by_position"])
        assert ppl["by_position"][-1]["beyond_max_positions"] and not ppl["by_position"][0]["beyond_max_positions"]
    assert set(metrics(plain)) >= {"eval/passkey/accuracy", "eval/needle/accuracy@224", "eval/ppl@320"}


def test_evaluate_is_deterministic(byte_llama, tiny_results, haystack):
    probes = build_probes("passkey,needle,multikey,ppl", lengths=(224, 320), depths=(0, 1), samples=1)
    again = evaluate(byte_llama, probes, haystack=haystack, label="plain")
    for name, data in again["probes"].items():
        first = tiny_results[0]["probes"][name]
        assert {k: v for k, v in data.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


def test_report_files_table_and_model_card(tiny_results, tmp_path):
    files = write_report(tiny_results, tmp_path)
    assert sorted(p.name for p in files.values()) == [
        "heatmap_multikey.png",
        "heatmap_needle.png",
        "heatmap_passkey.png",
        "ppl.png",
        "results.json",
    ]
    for path in files.values():
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    saved = json.loads(files["results"].read_text())
    assert [m["model"] for m in saved["models"]] == ["plain", "sliding-window"]
    table = format_table(tiny_results)
    assert "passkey: exact-match accuracy" in table and "plain" in table and "sliding-window" in table
    assert "*" in table and "beyond max_position_embeddings (plain: 256, sliding-window: 256)" in table
    card = model_card_section(tiny_results, plots={"passkey": "heatmap_passkey.png", "ppl": "ppl.png"})
    assert card.startswith("## Long-context evaluation")
    assert "| model | 224 | 320 |" in card and "![passkey accuracy over depth x length](heatmap_passkey.png)" in card


# ---- training callback and CLI -------------------------------------------------------------------------


def test_callback_fires_every_n_steps_and_logs(byte_llama):
    logged = []
    callback = EvalCallback([PasskeyProbe(lengths=(200,), depths=(0.5,), samples=1)], every_n_steps=2,
                            log_fn=lambda m, step: logged.append((step, m)))  # fmt: skip
    byte_llama.train()
    returned = [callback.on_step(step, byte_llama) for step in range(6)]
    assert byte_llama.training  # evaluated in eval mode, then put back
    byte_llama.eval()
    assert [step for step, _ in logged] == [2, 4] == [step for step, _ in callback.history]
    assert [r is not None for r in returned] == [False, False, True, False, True, False]
    assert set(logged[0][1]) == {"eval/passkey/accuracy", "eval/passkey/digit_accuracy", "eval/passkey/accuracy@200"}
    card = callback.model_card_section()
    assert "### During training" in card and "| 4 |" in card
    with pytest.raises(ProbeError, match="every_n_steps=0"):
        EvalCallback("passkey", every_n_steps=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-checkpoints")
    model = tiny_model("llama", vocab_size=256)
    model.save_pretrained(root / "plain")
    lcplug.patch(model, attention="sliding-window:window=32,sinks=4,block_size=16")
    lcplug.save_pretrained(model, root / "sliding")
    return root / "plain", root / "sliding"


def test_cli_eval_writes_results_and_plots(checkpoints, tmp_path, capsys):
    plain, sliding = checkpoints
    out = tmp_path / "out"
    argv = ["eval", str(plain), str(sliding), "--probes", "passkey,ppl", "--lengths", "224,320", "--depths", "0,1"]
    code = main([*argv, "--samples", "1", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "passkey: exact-match accuracy" in captured.out and str(sliding) in captured.out
    assert "ppl by context length" in captured.out and "beyond max_position_embeddings" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["heatmap_passkey.png", "ppl.png", "results.json"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"][1]["manifest"]["spec"]["attention"]["name"] == "sliding-window"
    assert (out / "ppl.png").read_bytes()[:8] == PNG


def test_cli_eval_bad_input_is_one_line(checkpoints, tmp_path, capsys):
    plain, _ = checkpoints
    for argv, message in [
        (["--haystack", str(tmp_path)], "has no text"),
        (["--probes", "passkey,ppl2"], "unknown probe 'ppl2'"),
        (["--lengths", "256,abc"], "expected comma-separated ints"),
        (["--lengths", "100", "--probes", "passkey"], "passkey: length 100 is too short"),
    ]:
        assert main(["eval", str(plain), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("lcplug: error: ") and message in err, err
    for missing in (tmp_path / "missing", "./missing"):
        assert main(["eval", str(missing)]) == 2
        assert "is not a checkpoint directory (nor a Hub repo id)" in capsys.readouterr().err


def test_cli_eval_json(checkpoints, capsys):
    argv = ["eval", str(checkpoints[0]), "--probes", "passkey", "--lengths", "200", "--depths", "0.5", "--samples", "1"]
    assert main([*argv, "--json", "--no-progress"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["lcplug_version"] == lcplug.__version__
    assert saved["models"][0]["probes"]["passkey"]["cells"][0]["length"] == 200
