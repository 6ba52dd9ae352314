"""The model stage: architecture adapters, layer scores, pruning, sparse merging, the per-candidate actor."""
