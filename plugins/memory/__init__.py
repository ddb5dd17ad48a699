"""First-party memory plugins: additions to the residual stream (registered under the attention kind)."""
