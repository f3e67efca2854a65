"""One pruning method per module; the Hydra group ``configs/prune/`` is the registry."""
