"""Memories added to a model's residual stream: hashed n-gram tables (Engram) and where their rows live."""

from .engram import EngramMemory, EngramRuntime
from .hashing import NgramHash
from .tables import PLACEMENTS, HashedTables

__all__ = ["PLACEMENTS", "EngramMemory", "EngramRuntime", "HashedTables", "NgramHash"]
