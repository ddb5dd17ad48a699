"""Throughput of the data pipeline against a plain `datasets.map` + concatenate-and-chunk baseline, same run.

    python benchmarks/data.py                 # ~4M characters of the stdlib's code, rows of 4096
    python benchmarks/data.py --chars 2e6 --threads 2

Both sides read the same files (copied from the standard library into a temporary tree, one directory
per package) and tokenize them with the same real tokenizer: a byte-level BPE trained here on stdlib
text with the `tokenizers` library (no download), wrapped in `PreTrainedTokenizerFast`. Every pass
ends with what a training loop holds: batches of torch tensors.

- raw tokenizer ceiling: `backend_tokenizer.encode_batch_fast` on the files' texts, nothing else: no
  cold pipeline that tokenizes with this tokenizer can beat it;
- baseline, cold: run_clm's recipe with `datasets` defaults: `load_dataset("text", sample_by="document")`
  -> `.map(tokenizer, batched=True)` -> `.map(group_texts)` (concatenate, cut rows of --seq-len) into a
  fresh cache directory, then the rows iterated as torch tensors (`with_format("torch").iter`); warm:
  the very same calls again, which `datasets` answers from its Arrow cache (fingerprints of the files
  and of the map functions); in memory: texts read into `Dataset.from_dict` and mapped without cache
  files, its leanest cold form;
- lcplug: `PackedLoader` over the `code` source (repositories in dependency order, streamed, tokenized in
  batches through the Rust backend, packed with document boundaries, position ids and cu_seqlens):
  without a token cache; cold with `cache_dir` (tokenizing and writing the cache); warm (a new loader
  on the same `cache_dir`, as a second epoch, a resumed run, another rank or `lcplug data preview` is:
  files whose identity the cache recorded are neither read nor scanned for imports);
  and with bytes (what the byte-level demo models read);
- demo training: tokens per second one optimizer step of the demo's byte-level Llama consumes (2 layers,
  128 wide, batch 16 x 256, AdamW), the rate the pipeline must outrun by 10x.

Tokens/s count the tokens that reach the model (padding excluded); the fastest of --repeats interleaved
runs counts, and the CPU seconds (all threads of the process, fewest of the runs) show the work done,
which a busy machine disturbs less than wall time. --threads sets torch's, the tokenizer's (rayon) and
Arrow's threads for every side alike (default 1: the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from itertools import chain
from pathlib import Path


def corpus(root: Path, chars: float) -> list[Path]:
    """Copy whole stdlib packages (sorted by name) into `root` until `chars` characters; the copied .py files."""
    from lcplug.eval.haystack import SKIPPED_DIRS, source_files, stdlib_source

    stdlib = stdlib_source()
    total = 0
    out: list[Path] = []
    for package in sorted(p for p in stdlib.iterdir() if p.is_dir() and p.name not in SKIPPED_DIRS):
        if package.name in ("test", "idlelib", "lib2to3") or total >= chars:
            continue  # tests and tools: keep the sample to library code
        for src in source_files(package, python_only=True):
            try:
                text = src.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            dst = root / package.name / src.relative_to(package)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text, encoding="utf-8")
            out.append(dst)
            total += len(text)
    return out


def group_texts(seq_len: int):
    """run_clm's `group_texts`: concatenate a batch of tokenized examples and cut it into rows of `seq_len`."""

    def group(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // seq_len * seq_len
        return {k: [v[i : i + seq_len] for i in range(0, total, seq_len)] for k, v in joined.items()}

    return group


def baseline(files: list[Path], tokenizer, seq_len: int, batch_size: int, cache: Path) -> tuple[int, float, float]:
    """run_clm with `datasets` defaults: `load_dataset("text")` -> `.map(tokenizer)` -> `.map(group_texts)`, then
    the rows as torch batches. Tokens iterated, seconds, CPU seconds; a second call on the same `cache` is warm."""
    import datasets

    start, cpu = time.perf_counter(), time.process_time()
    raw = datasets.load_dataset(
        "text", data_files=[str(p) for p in files], sample_by="document", split="train", cache_dir=str(cache)
    )
    ds = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    ds = ds.map(group_texts(seq_len), batched=True)
    return _iterate(ds, batch_size), time.perf_counter() - start, time.process_time() - cpu


def baseline_in_memory(files: list[Path], tokenizer, seq_len: int, batch_size: int) -> tuple[int, float, float]:
    """The leanest cold form of the same: texts read into `Dataset.from_dict`, mapped in memory without caching."""
    import datasets

    start, cpu = time.perf_counter(), time.process_time()
    ds = datasets.Dataset.from_dict({"text": [p.read_text(encoding="utf-8") for p in files]})
    ds = ds.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    ds = ds.map(group_texts(seq_len), batched=True)
    return _iterate(ds, batch_size), time.perf_counter() - start, time.process_time() - cpu


def _iterate(ds, batch_size: int) -> int:
    """Iterate a dataset of rows as a training loop would (torch tensors, `batch_size` rows); the tokens seen."""
    return sum(batch["input_ids"].numel() for batch in ds.with_format("torch").iter(batch_size=batch_size))


def ceiling(files: list[Path], tokenizer) -> tuple[int, float, float]:
    """The tokenizer alone on the files' texts (read beforehand): the most any cold pipeline can do with it."""
    texts = [p.read_text(encoding="utf-8") for p in files]
    start, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    return tokens, time.perf_counter() - start, time.process_time() - cpu


def pipeline(root: Path, tokenizer, seq_len: int, batch_size: int, cache: Path | None) -> tuple[int, float, float]:
    """One epoch of `PackedLoader` over the tree (with a token cache in `cache`): tokens that are not padding,
    and seconds."""
    from lcplug.data import PackedLoader

    config = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "repeat": False,
        "cache_dir": None if cache is None else str(cache),
        "sources": {"code": {"name": "code", "path": str(root), "extensions": ["py"]}},
    }
    start, cpu = time.perf_counter(), time.process_time()
    loader = PackedLoader(config, tokenizer=tokenizer)
    for _ in loader:
        pass
    return sum(loader.tokens.values()), time.perf_counter() - start, time.process_time() - cpu


def demo_training(steps: int) -> float:
    """Tokens per second one training step of the demo's byte-level Llama consumes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=260,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (16, 256))
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocations
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * ids.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=float, default=4e6, help="characters of stdlib code to process")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--threads", type=int, default=1, help="torch and tokenizer threads for every side")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; the fastest counts")
    parser.add_argument("--steps", type=int, default=5, help="demo training steps timed")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when the tokenizers' thread pool starts

    import pyarrow
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lcplug.data import train_bpe
    from lcplug.registry import get_registry

    torch.set_num_threads(args.threads)
    pyarrow.set_cpu_count(args.threads)
    pyarrow.set_io_thread_count(args.threads)
    get_registry()  # plugin discovery (imports transformers) is a one-time process cost, not the pipeline's
    root = Path(tempfile.mkdtemp(prefix="lcplug-bench-data-"))
    caches = Path(tempfile.mkdtemp(prefix="lcplug-bench-data-cache-"))
    try:
        files = corpus(root, args.chars)
        chars = sum(p.stat().st_size for p in files)
        trained = train_bpe((p.read_text(encoding="utf-8") for p in files[::4]), vocab_size=args.vocab)
        saved = trained.backend_tokenizer.to_str()

        def fresh():  # the same tokenizer with an empty BPE cache, loaded anew as a new process would
            tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(saved), bos_token="<s>", eos_token="</s>")
            tok.pad_token = tok.eos_token
            return tok

        print(
            f"corpus: {len(files)} files, {chars / 1e6:.2f} MB of stdlib code; BPE vocabulary {len(trained)}; "
            f"rows of {args.seq_len}, batches of {args.batch_size}; {args.threads} thread(s); "
            f"fastest of {args.repeats} interleaved runs"
        )
        import datasets

        datasets.disable_progress_bars()
        runs: dict[str, list[tuple[int, float, float]]] = {k: [] for k in LABELS}
        seq, size = args.seq_len, args.batch_size
        for i in range(args.repeats):
            runs["ceiling"].append(ceiling(files, fresh()))
            runs["base"].append(baseline(files, fresh(), seq, size, caches / f"datasets-{i}"))
            runs["base-warm"].append(baseline(files, fresh(), seq, size, caches / f"datasets-{i}"))
            runs["memory"].append(baseline_in_memory(files, fresh(), seq, size))
            runs["bpe"].append(pipeline(root, fresh(), seq, size, None))
            runs["bpe-cold"].append(pipeline(root, fresh(), seq, size, caches / f"lcplug-{i}"))
            runs["bpe-warm"].append(pipeline(root, fresh(), seq, size, caches / f"lcplug-{i}"))
            runs["bytes"].append(pipeline(root, "bytes", seq, size, None))
        demo = demo_training(args.steps)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(caches, ignore_errors=True)
    report(runs, demo)


LABELS = {
    "ceiling": "raw tokenizer: encode_batch_fast only (BPE)",
    "base": "datasets cold: load+map+group_texts+iterate (BPE)",
    "base-warm": "datasets warm: the same calls, Arrow cache (BPE)",
    "memory": "datasets in memory: from_dict+map+group (BPE)",
    "bpe": "lcplug PackedLoader, no cache (BPE)",
    "bpe-cold": "lcplug PackedLoader cold, writing cache (BPE)",
    "bpe-warm": "lcplug PackedLoader warm, token cache (BPE)",
    "bytes": "lcplug PackedLoader (bytes)",
}
PAIRS = [
    ("bpe", "base", "cold, no cache"),
    ("bpe-cold", "base", "cold, filling the cache"),
    ("bpe-warm", "base-warm", "warm"),
]
"""Like-for-like comparisons: an lcplug row against the baseline row that did the same work."""


def report(runs: dict[str, list[tuple[int, float, float]]], demo: float) -> None:
    """One table of every row, its ratio to the baseline cold and warm, and the like-for-like pairs against 2x."""
    best = {k: min(v, key=lambda r: r[1]) for k, v in runs.items()}
    rate = {k: tokens / seconds for k, (tokens, seconds, _) in best.items()}
    cpu = {k: min(r[2] for r in v) for k, v in runs.items()}
    print(
        f"\n{'pipeline':<52} {'tokens':>11} {'seconds':>8} {'CPU s':>7} {'tokens/s':>12} {'vs cold':>8} {'vs warm':>8}"
    )
    for key, label in LABELS.items():
        tokens, seconds, _ = best[key]
        print(
            f"{label:<52} {tokens:>11,} {seconds:>8.3f} {cpu[key]:>7.3f} {rate[key]:>12,.0f} "
            f"{rate[key] / rate['base']:>7.2f}x {rate[key] / rate['base-warm']:>7.2f}x"
        )
    print(f"{'demo training consumes (byte Llama 2x128, 16x256)':<52} {'':>11} {'':>8} {'':>7} {demo:>12,.0f}")
    print("\nlike for like against the datasets baseline (target >= 2x):")
    for ours, theirs, what in PAIRS:
        ratio = rate[ours] / rate[theirs]
        print(f"  {what:<24} {ratio:6.2f}x  {'meets' if ratio >= 2 else 'misses'} 2x")
    ceiling_ratio = rate["ceiling"] / rate["base"]
    print(f"  (a cold pass can be at most the raw tokenizer's {ceiling_ratio:.2f}x the cold baseline)")
    print(
        f"against demo training (target >= 10x): BPE no cache {rate['bpe'] / demo:.0f}x, "
        f"warm {rate['bpe-warm'] / demo:.0f}x, bytes {rate['bytes'] / demo:.0f}x"
    )


if __name__ == "__main__":
    main()
