"""Long-context training data: document stream -> tokenize -> mix -> pack -> shard, streaming and resumable.

    from lcplug.data import PackedLoader
    loader = PackedLoader("recipe.yaml", dp_rank=0, dp_world=1)   # the recipe's `data:` section
    for batch in loader:                       # input_ids, labels, position_ids, doc_ids, cu_seqlens, max_seqlen
        model(**model_inputs(batch)).loss.backward()   # use_cache=False: else documents attend across
        state = loader.state_dict()            # save with the checkpoint; load_state_dict resumes exactly

Sources, synthetic builders and mixtures are `data` plugins (`lcplug plugins --kind data`); see docs/data.md.
"""

from __future__ import annotations

from .base import (
    BuilderPlugin,
    DataContext,
    DataError,
    Domain,
    MixturePlugin,
    Piece,
    Source,
    SourcePlugin,
    SyntheticSource,
    cycle,
    rng,
)
from .mixture import Mixer, normalise, parse_domains
from .packing import IGNORE_INDEX, Packer, Row, collate, context_parallel_slice, model_inputs
from .pipeline import PackedLoader, dp_coordinates
from .recipe import DataConfig
from .tokenize import TextTokenizer, TokenDoc, TokenStream, load_text_tokenizer, train_bpe

__all__ = [
    "IGNORE_INDEX",
    "BuilderPlugin",
    "DataConfig",
    "DataContext",
    "DataError",
    "Domain",
    "Mixer",
    "MixturePlugin",
    "PackedLoader",
    "Packer",
    "Piece",
    "Row",
    "Source",
    "SourcePlugin",
    "SyntheticSource",
    "TextTokenizer",
    "TokenDoc",
    "TokenStream",
    "collate",
    "context_parallel_slice",
    "cycle",
    "dp_coordinates",
    "load_text_tokenizer",
    "model_inputs",
    "normalise",
    "parse_domains",
    "rng",
    "train_bpe",
]
