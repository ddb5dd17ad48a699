"""RoPE extensions."""
