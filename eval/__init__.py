"""lmms-eval plugin and Hydra runner (the eval spine lands with its own issue)."""
