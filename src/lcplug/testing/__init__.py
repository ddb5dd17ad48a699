"""Conformance kit for plugin authors: tiny models of every family and checks any plugin must pass."""

from .models import FAMILIES, tiny_config, tiny_model

__all__ = ["FAMILIES", "tiny_config", "tiny_model"]
