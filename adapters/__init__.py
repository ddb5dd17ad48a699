"""Model-family adapters (import path `lcplug.adapters`): the generic one plus family quirks."""
