"""`hf`: a Hugging Face `datasets` dataset (saved to disk, a local builder, or the Hub), map-style or streaming."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcplug.data.base import DataContext, DataError, Piece, Source, SourcePlugin, permutation
from lcplug.hookspecs import hookimpl
from lcplug.params import Params, param

READ_ROWS = 256
"""Rows fetched from a map-style dataset per read."""


@dataclass(frozen=True)
class HFParams(Params):
    path: str = param(help="a `save_to_disk` directory, a builder (json, parquet, ...) or a Hub dataset name")
    name: str | None = param(None, "the dataset configuration")
    split: str = param("train", "the split")
    data_files: list[str] = param([], "files for a builder such as json or parquet")
    field: str = param("text", "the column holding the text")
    group_field: str | None = param(None, "a column naming each record's group (for megadocs)")
    streaming: bool = param(False, "stream (an IterableDataset: bounded memory, read in order) instead of map-style")
    shuffle: bool = param(True, "map-style: row order seeded per epoch (streams are read in their order)")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("the hf data source needs the datasets package: pip install datasets") from None
    return datasets


class HFSource(Source):
    """Rows of a dataset as documents.

    Map-style: a seeded permutation of row indices per epoch; rank r reads positions r, r + world, ...
    and the state is the position. Streaming: `split_dataset_by_node` gives each rank its examples and
    the dataset's own `state_dict` is the position (a shuffle buffer could not resume exactly, so streams
    are read in order). Rows whose text column is missing or not a string are skipped and counted.
    """

    def __init__(self, name: str, params: HFParams, **kwargs: Any):
        super().__init__(name, **kwargs)
        self.params = params
        self.dataset = self._load()
        columns = getattr(self.dataset, "column_names", None)
        if columns is not None and params.field not in columns:
            raise DataError(f"data source {name!r}: dataset has no column {params.field!r}; columns: {columns}")

    def _load(self) -> Any:
        datasets = _datasets()
        p = self.params
        where = f"data source {self.name!r}"
        local = Path(p.path)
        try:
            if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if p.split not in ds:
                        raise DataError(f"{where}: no split {p.split!r} in {str(local)!r}; splits: {list(ds)}")
                    ds = ds[p.split]
                return ds.to_iterable_dataset() if p.streaming else ds
            kwargs = {"data_files": list(p.data_files)} if p.data_files else {}
            return datasets.load_dataset(p.path, p.name, split=p.split, streaming=p.streaming, **kwargs)
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types for a missing or unreadable dataset
            raise DataError(f"{where}: cannot load dataset {p.path!r}: {str(exc).splitlines()[0]}") from exc

    def _piece(self, row: dict[str, Any], where: str) -> Piece | None:
        text = row.get(self.params.field)
        if not isinstance(text, str):
            self.skip(f"no text column {self.params.field!r}", where)
            return None
        if not text:
            return None
        group = row.get(self.params.group_field) if self.params.group_field else None
        return Piece(text=text, group="" if group is None else str(group))

    def _pieces(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        if self.params.streaming:
            yield from self._stream(position)
            return
        n = len(self.dataset)
        order = permutation(n, self.seed, self.name, "rows", self.epoch) if self.params.shuffle else None
        pos = int(position.get("pos", self.rank))
        while pos < n:
            positions = list(range(pos, min(n, pos + READ_ROWS * self.world), self.world))
            rows = [int(order[q]) if order is not None else q for q in positions]
            batch = self.dataset[rows]
            columns = list(batch)
            for q, i, values in zip(positions, rows, zip(*(batch[c] for c in columns))):
                piece = self._piece(dict(zip(columns, values)), f"row {i}")
                if piece is not None:
                    yield piece, {"pos": q + self.world}
            pos = positions[-1] + self.world

    def _stream(self, position: dict[str, Any]) -> Iterator[tuple[Piece, dict[str, Any]]]:
        from datasets.distributed import split_dataset_by_node

        ds = (
            split_dataset_by_node(self.dataset, rank=self.rank, world_size=self.world)
            if self.world > 1
            else self.dataset
        )
        ds.set_epoch(self.epoch)
        if position.get("stream") is not None:
            ds.load_state_dict(position["stream"])
        for i, row in enumerate(ds):
            piece = self._piece(row, f"example {i}")
            if piece is not None:
                yield piece, {"stream": ds.state_dict()}


class HF(SourcePlugin):
    """A Hugging Face `datasets` dataset: a `save_to_disk` directory, a builder with local files, or the Hub.

    Map-style datasets are read in a seeded order per epoch; `streaming` reads an IterableDataset in
    order with bounded memory, resuming through its own `state_dict`. Needs the `datasets` package
    (imported only when this source is used).
    """

    name = "hf"
    Params = HFParams

    def build_source(self, ctx: DataContext, name: str) -> Source:
        return HFSource(name, self.params, seed=ctx.seed, rank=ctx.rank, world=ctx.world)


@hookimpl
def lcplug_register(register):
    register(HF)
