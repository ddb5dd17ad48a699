"""Data sources, synthetic builders and mixtures (the policies the `lcplug.data` pipeline runs)."""
