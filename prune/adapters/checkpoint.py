"""Checkpoint I/O shared by the converters of original (non-HF-layout) checkpoints.

Finding the snapshot folder (a local path, or a hub repo id fetched with ``snapshot_download``) and reading
safetensors shards is the same for every family; what differs is the download hint each error carries.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

__all__ = ["read_safetensors", "rename_keys", "resolve_dir", "short_keys"]

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def short_keys(keys: Sequence[str], limit: int = 20) -> str:
    """The first ``limit`` of ``keys`` sorted, for error messages."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def rename_keys(
    original: Mapping[str, Tensor],
    key_map: Sequence[tuple[str, str]],
    ignored: Sequence[str] = (),
    claim: Callable[[str, Tensor], bool] | None = None,
    normalise: Callable[[str], str] | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an original state dict with a rule table; the caller decides what an unmatched key means.

    Per key, in order: dropped if it matches an ``ignored`` pattern (``re.search``); taken by ``claim(key, tensor)``
    when it returns True (keys a family merges itself: LoRA pairs, split biases); else renamed by the first
    ``(pattern, replacement)`` of ``key_map`` that matches ``normalise(key)`` in full (``re.fullmatch`` +
    ``expand``).

    Returns:
        The renamed tensors (same objects) and the keys no rule matched.

    Raises:
        ValueError: two original keys map to one name.
    """
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in original.items():
        if any(re.search(p, key) for p in ignored) or (claim is not None and claim(key, tensor)):
            continue
        name = normalise(key) if normalise else key
        for pattern, replacement in key_map:
            if m := re.fullmatch(pattern, name):
                new_key = m.expand(replacement)
                if new_key in converted:
                    raise ValueError(f"two original keys map to {new_key!r} (second: {key!r})")
                converted[new_key] = tensor
                break
        else:
            unmapped.append(key)
    return converted, unmapped


def resolve_dir(path_or_repo: str | os.PathLike[str], revision: str | None, patterns: Sequence[str], hint) -> Path:
    """The local checkpoint folder: ``path_or_repo`` itself, or the hub snapshot of a repo id.

    Args:
        path_or_repo: a folder, or a hub repo id (``owner/name``).
        revision: hub revision for a repo id.
        patterns: ``allow_patterns`` of the download (only what the converter reads).
        hint: ``hint(repo=<the family's default>) -> str``, what to download; ends every error message (a repo id
            that cannot be fetched gets ``hint(repo_id)``).

    Raises:
        FileNotFoundError: a file instead of a folder, a missing folder, or a repo that cannot be fetched (offline,
            gated, unknown): all with the hint.
    """
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{text} is a file; pass the checkpoint directory. To get one, {hint()}")
    if REPO_ID.fullmatch(text) is None:
        raise FileNotFoundError(f"checkpoint directory {text} does not exist. To get it, {hint()}")
    import huggingface_hub  # looked up at call time so tests can stub snapshot_download

    try:
        return Path(huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=list(patterns)))
    except Exception as err:  # noqa: BLE001 - offline, gated, missing repo: all get the same actionable message
        raise FileNotFoundError(
            f"could not fetch {text} from the Hugging Face hub ({type(err).__name__}: {err}); {hint(text)}"
        ) from err


def read_safetensors(directory: Path, hint: str) -> dict[str, Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: no weights file, or a listed shard is absent (with ``hint``).
        ValueError: the index lists keys that no shard holds.
    """
    from safetensors.torch import load_file

    index, single = directory / "model.safetensors.index.json", directory / "model.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{directory} lacks shard(s) {absent} listed in {index.name}. To get them, {hint}")
        weights: dict[str, Tensor] = {}
        for shard in shards:
            weights.update(load_file(directory / shard))
        listed_only = set(weight_map) - set(weights)
        if listed_only:
            raise ValueError(f"{index.name} lists key(s) found in no shard: {short_keys(list(listed_only))}")
        return weights
    if single.is_file():
        return load_file(single)
    raise FileNotFoundError(
        f"{directory} has neither model.safetensors nor model.safetensors.index.json (.bin checkpoints are not "
        f"supported). To get the weights, {hint}"
    )
