"""Backbone adapters: one file per model family; model surgery lives here, never in prune/strategies."""
