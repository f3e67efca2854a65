"""The eval spine: run a pruned backbone on video benchmarks through lmms-eval and turn the records into tables.

``config`` composes ``configs/eval.yaml`` and builds the strategy and the backbone; ``runner`` is the Hydra runner
(one cell, its paired ``none`` baseline, records, tables); ``lmms_model`` is the lmms-eval plugin it hands the backbone
to (also reachable from the lmms-eval CLI); ``backbones`` is the family-independent ``Backbone`` and
``build_backbone``, and ``families/`` holds one glue module per backbone family; ``benchmarks``, ``records``,
``tables``, ``experiments``, ``stats``, ``plots`` and ``viz`` are the benchmark registry, the on-disk records and what
is generated from them.
"""
