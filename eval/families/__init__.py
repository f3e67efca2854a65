"""One module per backbone family: the glue between a model config and the family's adapter.

``eval/families/<family>.py`` holds the family's tokenizer choice, prompt builder, weight check with its download hint,
a loader per ``loader:`` value and its preprocessing, and ends with ``FAMILY = Family(...)``
(:class:`eval.families.contract.Family`). :mod:`eval.backbones` discovers every module here that defines ``FAMILY``;
there is no table to edit. Model surgery stays in ``prune/adapters/<family>.py``: ``prune/`` takes flat typed
arguments and reads no config or environment, while this glue reads the model config and the Hugging Face cache.
"""
