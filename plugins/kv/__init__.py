"""First-party KV tier plugins: `device`, `host`, `disk`."""
