"""First-party context-parallel strategies (ring, ulysses, allgather, hybrid)."""
