"""Save a tiered cache to a directory and reopen it against the same model, to continue a long session.

A saved cache is a directory (written under a temporary name next to it and renamed into place, so a
failed save leaves nothing at the target):
- `index.json`: format and version, the model's fingerprint, the cache's tier and settings, and per layer
  its block size, length, step, which blocks were hot (with their last use), the K/V dtype, and the
  CRC-32 of its tensor file;
- `layerNNN.safetensors`: every block the layer holds (`k.<b>`, `v.<b>`; hot and spilled alike, spilled
  ones read back, i.e. dequantized, from the lower tier), the open tail (`tail.k`, `tail.v`) and a
  content-selecting layer's index keys (`index_keys`). Blocks a pattern layer dropped are not saved and
  stay dropped when reopened.

A cache only means something for the model that wrote it: keys are stored after the projection and RoPE.
The fingerprint records what decides them and `check_fingerprint` names every part that differs:
- config fields that shape K/V (head counts and sizes, RoPE settings, layer types) and the model dtype;
- the lcplug patch (the manifest's spec without its `kv` part, which the reopened cache may change);
- SHA-256 digests of a strided sample (at most `SAMPLE` elements) of the input embeddings and of every
  parameter of the first attention layer: another seed or another fine-tune changes them. A sample keeps
  this cheap for billion-parameter models, at the price of missing an edit confined to unsampled weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from .errors import KVCacheError
from .store import host_bytes

if TYPE_CHECKING:
    from .cache import TieredCache

FORMAT, VERSION = "lcplug-kv-cache", 1
INDEX = "index.json"
SAMPLE = 65536
"""Elements per weight tensor the fingerprint hashes (evenly strided)."""
KV_CONFIG_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "partial_rotary_factor",
    "rotary_pct",
    "sliding_window",
    "layer_types",
)
"""Config fields that decide what a layer's cached K/V are (absent ones record as None)."""


# ---- fingerprint ----------------------------------------------------------------------------------------


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """JSON-ready record of what decides `model`'s K/V: config fields, lcplug patch, weight samples."""
    from ..patching import choose_adapter, patch_state

    config = model.config.get_text_config()
    fields = {name: getattr(config, name, None) for name in KV_CONFIG_FIELDS}
    fields["dtype"] = str(model.dtype)
    state = patch_state(model)
    patch = {k: v for k, v in (state.manifest["spec"] if state else {}).items() if k != "kv"}
    modules = choose_adapter(model).attention_modules(model)
    first = min(modules)
    tensors = {"input embeddings": model.get_input_embeddings().weight}
    tensors.update({f"layer {first} attention {name}": p for name, p in modules[first].named_parameters()})
    weights = {label: _digest(t) for label, t in tensors.items()}
    return json.loads(json.dumps({"config": fields, "patch": patch, "weights": weights}, default=str))


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().flatten()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(host_bytes(flat[:: max(1, flat.numel() // SAMPLE)]))
    return h.hexdigest()


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words: config fields, patch parameters, then weight tensors."""
    out: list[str] = []
    for part, label in (("config", "config field"), ("patch", "lcplug patch")):
        _compare(label, (), saved[part], current[part], out)
    weights = saved["weights"].keys() | current["weights"].keys()
    changed = sorted(k for k in weights if saved["weights"].get(k) != current["weights"].get(k))
    if changed:
        out.append(f"weights ({', '.join(changed)})")
    return out


def _compare(label: str, path: tuple[str, ...], was: Any, now: Any, out: list[str]) -> None:
    """Append "label a.b (saved X, model Y)" for each differing leaf, descending into dicts both sides have."""
    if isinstance(was, dict) and isinstance(now, dict):
        for key in sorted(was.keys() | now.keys()):
            _compare(label, (*path, key), was.get(key), now.get(key), out)
    elif was != now:
        out.append(f"{label} {'.'.join(path)} (saved {_brief(was)}, model {_brief(now)})")


def _brief(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if value is not None else "none"


# ---- save -----------------------------------------------------------------------------------------------


def save(cache: TieredCache, model: nn.Module, path: str | os.PathLike) -> None:
    """Write `cache` (belonging to `model`) to the new directory `path`; see the module docstring."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KVCacheError(f"kv: cannot save the cache to {path}: it exists and is not an empty directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise KVCacheError(f"kv: cannot save the cache under {path.parent}: {exc.strerror or exc}") from exc
    try:
        layers = [
            _save_layer(layer.layer_idx, layer.block_size, layer.export_state(), staging) for layer in cache.layers
        ]
        index = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint(model),
            "tier": cache.tier,
            "settings": cache.settings,
            "layers": layers,
        }
        _write(staging / INDEX, json.dumps(index, indent=1).encode())
        try:
            os.rename(staging, path)
        except OSError as exc:
            raise KVCacheError(f"kv: cannot move the saved cache into {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_layer(idx: int, block_size: int, state: dict[str, Any], directory: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"idx": idx, "block_size": block_size, "length": state["length"]}
    if not state["length"]:
        return entry
    tensors = {"tail.k": state["tail"][0], "tail.v": state["tail"][1]}
    for b, (keys, values) in state["blocks"].items():
        tensors[f"k.{b}"], tensors[f"v.{b}"] = keys, values
    if state["index_keys"] is not None:
        tensors["index_keys"] = state["index_keys"]
    data = save_tensors({name: t.detach().to("cpu", copy=True) for name, t in tensors.items()})
    name = f"layer{idx:03d}.safetensors"
    _write(directory / name, data)
    entry.update(
        step=state["step"],
        hot={str(b): use for b, use in state["hot"].items()},
        blocks=sorted(state["blocks"]),
        dtype=str(state["tail"][0].dtype),
        file=name,
        crc32=zlib.crc32(data),
    )
    return entry


def _write(file: Path, data: bytes) -> None:
    try:
        with open(file, "xb") as f:
            f.write(data)
    except OSError as exc:
        raise KVCacheError(f"kv: cannot write {file}: {exc.strerror or exc} (disk full or unwritable?)") from exc


# ---- reopen ---------------------------------------------------------------------------------------------


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The index of the saved cache at `path`; a missing, unreadable or foreign one raises KVCacheError."""
    file = Path(path) / INDEX
    try:
        index = json.loads(file.read_text())
    except FileNotFoundError:
        raise KVCacheError(f"kv: {path} is not a saved cache: {INDEX} is missing") from None
    except (OSError, ValueError) as exc:
        raise KVCacheError(f"kv: cannot read {file}: {exc}") from exc
    if not isinstance(index, dict) or (index.get("format"), index.get("version")) != (FORMAT, VERSION):
        raise KVCacheError(f"kv: {file} is not a saved cache lcplug can read (valid: {FORMAT} version {VERSION})")
    return index


def check_fingerprint(index: dict[str, Any], model: nn.Module, path: str | os.PathLike) -> None:
    """Refuse a saved cache written for another model, naming everything that differs."""
    diffs = differences(index["fingerprint"], fingerprint(model))
    if diffs:
        raise KVCacheError(f"kv: the cache saved at {path} belongs to another model; differs: {'; '.join(diffs)}")


def restore(cache: TieredCache, model: nn.Module, index: dict[str, Any], path: str | os.PathLike) -> None:
    """Fill the fresh `cache` from the saved one at `path` (its fingerprint already checked)."""
    from ..patching import choose_adapter

    modules = choose_adapter(model).attention_modules(model)
    saved = {entry["idx"]: entry for entry in index["layers"]}
    for layer in cache.layers:
        entry = saved.get(layer.layer_idx)
        if entry is None:
            raise KVCacheError(f"kv: the cache saved at {path} has no layer {layer.layer_idx}")
        if entry["block_size"] != layer.block_size:
            raise KVCacheError(
                f"kv: layer {layer.layer_idx} was saved with blocks of {entry['block_size']} tokens but this cache "
                f"uses {layer.block_size}; open it with block_size={entry['block_size']} (the default)"
            )
        if entry["length"]:
            device = next(modules[layer.layer_idx].parameters()).device
            layer.import_state(_load_layer(Path(path), entry), device)


def _load_layer(directory: Path, entry: dict[str, Any]) -> dict[str, Any]:
    file = directory / entry["file"]
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise KVCacheError(f"kv: cannot read saved layer file {file}: {exc.strerror or exc}") from exc
    if zlib.crc32(data) != entry["crc32"]:
        raise KVCacheError(f"kv: saved layer file {file} is corrupted (checksum mismatch); refusing to use it")
    try:
        tensors = load_tensors(data)
    except SafetensorError as exc:
        raise KVCacheError(f"kv: saved layer file {file} is unreadable: {exc}") from exc
    names = {"tail.k", "tail.v"} | {f"{kv}.{b}" for b in entry["blocks"] for kv in "kv"}
    missing = sorted(names - tensors.keys())
    wrong = sorted(n for n in names & tensors.keys() if str(tensors[n].dtype) != entry["dtype"])
    if missing or wrong:
        raise KVCacheError(
            f"kv: saved layer file {file} does not match its index: "
            + (f"missing {', '.join(missing)}" if missing else f"{', '.join(wrong)} not {entry['dtype']}")
        )
    return {
        "length": entry["length"],
        "step": entry["step"],
        "tail": (tensors["tail.k"], tensors["tail.v"]),
        "blocks": {b: (tensors[f"k.{b}"], tensors[f"v.{b}"]) for b in entry["blocks"]},
        "hot": {int(b): use for b, use in entry["hot"].items()},
        "index_keys": tensors.get("index_keys"),
    }
