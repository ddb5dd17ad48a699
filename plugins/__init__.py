"""First-party plugins (import path `lcplug.plugins`), one module per plugin, registered through entry points."""
