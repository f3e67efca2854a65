"""Option checks at compose time: every bad value stops the run with one line, before any model or data loads.

:func:`validate` checks a composed ``configs/eval.yaml``; :func:`precheck` composes command-line overrides (each
combination of a ``--multirun`` sweep) and validates them, turning Hydra's composition errors into the same one-line
form. ``scripts/run_eval.py`` prints ``vidprune: error: <message>`` and exits 2 for either.

A message names the key, the value given and what is accepted, e.g.
``option threads='two': expected an integer >= 1, or null (torch's default)``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "NAME_PATTERN",
    "OptionError",
    "build_strategy",
    "check_knob_overrides",
    "check_name",
    "precheck",
    "switch",
    "validate",
]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
"""Names that become folders (model, benchmark, strategy): one plain path component, no ``..``."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPES = ("float32", "float16", "bfloat16")
ATTN = ("eager", "sdpa", "flash_attention_2")
LOGGERS = ("none", "wandb")
MODES = ("online", "offline")
MAX_SWEEP_COMBINATIONS = 256  # precheck composes at most this many multirun combinations
REPO = Path(__file__).resolve().parents[1]


class OptionError(ValueError):
    """A bad option value; the message is one line naming the key, the value and what is accepted."""


def _fail(key: str, value: Any, accepted: str) -> OptionError:
    return OptionError(f"option {key}={value!r}: expected {accepted}")


def check_name(key: str, value: Any) -> str:
    """``value`` if it is a safe folder name, else :class:`OptionError` (``../x``, ``a/b``, empty, ...)."""
    text = str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None
    if text is None or not NAME_PATTERN.fullmatch(text) or ".." in text:
        raise _fail(key, value, "a plain name of letters, digits and . _ + - (no '/', no '..', at most 100 chars)")
    return text


def _int(key: str, value: Any, low: int, high: int | None = None, none: str | None = None) -> None:
    if value is None and none is not None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise _fail(key, value, bound + (f", or null ({none})" if none else ""))


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(key, value, "true or false")


def _choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise _fail(key, value, "one of " + ", ".join(choices))


def _device(value: Any) -> None:
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise _fail("device", value, "auto, cpu, cuda or cuda:<index>")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise OptionError(f"option device={value!r}: no CUDA device is available here; accepted: auto, cpu")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise _fail("device", value, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1} on this machine")


def switch(key: str, value: Any) -> bool:
    """An on/off option (``cache=off`` on the command line is the string ``off``; YAML reads ``off`` as false)."""
    if isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    raise _fail(key, value, "on or off (or true / false)")


def _nproc(value: Any, device: Any) -> None:
    """``nproc``: processes for one cell; on CUDA one GPU each, so at most the GPUs here (checked after ``device``)."""
    _int("nproc", value, 1, 1024)
    if value == 1 or not isinstance(device, str):
        return
    if device.startswith("cuda:"):
        raise _fail(
            "nproc", value, f"1 with device={device} (nproc > 1 puts rank r on cuda:r; use device=auto or cuda)"
        )
    import torch

    if device != "cpu" and torch.cuda.is_available() and value > torch.cuda.device_count():
        raise _fail("nproc", value, f"at most the {torch.cuda.device_count()} GPUs on this machine (one per process)")


def _results_dir(value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _fail("results_dir", value, "a folder path")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise _fail("results_dir", value, "a folder (this path is a file)")


def _benchmark(bench: Any, repo: Path) -> None:
    from eval.benchmarks import BENCHMARKS

    check_name("benchmark.name", bench.get("name"))
    _choice("benchmark.mode", bench.get("mode"), MODES)
    names = bench.get("benchmarks")
    if not names or isinstance(names, str) or any(n not in BENCHMARKS for n in names):
        raise _fail("benchmark.benchmarks", names, "a non-empty list of " + ", ".join(sorted(BENCHMARKS)))
    build = bench.get("build", False)
    _bool("benchmark.build", build)
    if bench.mode == "offline":
        data_dir = bench.get("data_dir")
        if not isinstance(data_dir, str) or not data_dir.strip():
            raise _fail("benchmark.data_dir", data_dir, "the folder with the annotations and videos (mode=offline)")
        path = (repo / Path(data_dir).expanduser()).resolve()
        if not build and not path.is_dir():
            raise OptionError(f"option benchmark.data_dir={data_dir!r}: no such folder ({path})")


def _model(model: Any) -> None:
    check_name("model.name", model.get("name"))
    _int("model.num_frames", model.get("num_frames"), 1, 4096)
    _choice("model.dtype", model.get("dtype", "float32"), DTYPES)
    _choice("model.attn_implementation", model.get("attn_implementation", "sdpa"), ATTN)
    _choice("model.tokenizer", model.get("tokenizer", "bytes"), ("bytes", "checkpoint"))
    _int("model.seed", model.get("seed", 0), 0, 2**32 - 1)


def build_strategy(cfg: Any) -> Any:
    """Instantiate ``cfg.prune``; a bad setting (e.g. a ratio outside (0, 1]) is a one-line :class:`OptionError`."""
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.prune)
    except Exception as err:  # noqa: BLE001 - Hydra wraps the strategy's ValueError/TypeError
        cause = err.__cause__ or err
        name = str(cfg.prune.get("_target_", "?")).rsplit(".", 1)[-1]
        raise OptionError(f"prune={name}: {_first_line(cause)}") from err


def check_knob_overrides(overrides: Sequence[str]) -> None:
    """Refuse ``ratio=`` and ``budget=`` together on one command line.

    One sets each method's own knob, the other solves that knob per sample.

    Raises:
        OptionError: both were given (``budget=null`` counts as not given).
    """
    given = {}
    for override in overrides:
        key, _, value = str(override).partition("=")
        given[key.lstrip("+~")] = value
    if "ratio" in given and given.get("budget", "null").strip().lower() not in ("null", "none", ""):
        raise OptionError(
            f"options ratio={given['ratio']} and budget={given['budget']} were both given: ratio sets each method's "
            "own knob (docs/methods/README.md), budget solves that knob per sample so that the achieved "
            f"budget_measure ({', '.join(_measures())}) hits the target; give one of them"
        )


def _measures() -> tuple[str, ...]:
    from prune.budget import MEASURES

    return MEASURES


def _budget(cfg: Any, strategy: Any) -> None:
    """``budget`` (null or a fraction in (0, 1]) and ``budget_measure``; the strategy must be solvable at a budget."""
    from prune.budget import AtBudget

    measure = cfg.get("budget_measure", "flops")
    _choice("budget_measure", measure, _measures())
    budget = cfg.get("budget")
    if budget is None:
        return
    if (
        isinstance(budget, bool)
        or not isinstance(budget, int | float)
        or not (math.isfinite(budget) and 0 < budget <= 1)
    ):
        raise _fail("budget", budget, "a target fraction in (0, 1] of budget_measure, or null (the method's own ratio)")
    if strategy.name == "none":
        return  # none ignores its knob, as it ignores ratio
    try:  # the solver's own checks (knobs are fields that leave the in-LLM stages alone, the measure is solvable)
        AtBudget(strategy, float(budget), measure, num_layers=2, hidden=1, ffn=1)
    except ValueError as err:
        raise OptionError(
            f"prune={strategy.name} budget={budget} budget_measure={measure}: {_first_line(err)}"
        ) from None


def validate(cfg: Any, repo: Path = REPO) -> Any:
    """Check every option of a composed eval config; return the built strategy (it validates its own settings).

    Raises:
        OptionError: the first bad option, one line.
    """
    ratio = cfg.get("ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio):
        raise _fail("ratio", ratio, "a number in (0, 1]")
    _int("seed", cfg.get("seed"), 0, 2**32 - 1)
    _int("limit", cfg.get("limit"), 1, none="all documents")
    _int("threads", cfg.get("threads"), 1, 1024, none="torch's default")
    _int("max_new_tokens", cfg.get("max_new_tokens"), 1, 65536, none="the task's generation length")
    _bool("paired_baseline", cfg.get("paired_baseline"))
    _bool("paired_timing", cfg.get("paired_timing", True))
    _bool("retime", cfg.get("retime", True))
    wait = cfg.get("lock_wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < math.inf:
        raise _fail("lock_wait", wait, "seconds >= 0 to wait for another run on the same cell")
    _choice("logger", cfg.get("logger"), LOGGERS)
    _nproc(cfg.get("nproc", 1), cfg.get("device"))
    _int("prefetch", cfg.get("prefetch", 0), 0, 64)
    switch("cache", cfg.get("cache", False))
    size = cfg.get("cache_gb", 20)
    if isinstance(size, bool) or not isinstance(size, int | float) or not 0 < size < math.inf:
        raise _fail("cache_gb", size, "the decode cache's size cap in GB, a number > 0")
    _results_dir(cfg.get("results_dir"))
    _model(cfg.model)
    _benchmark(cfg.benchmark, repo)
    _device(cfg.get("device"))
    strategy = build_strategy(cfg)
    check_name("prune (strategy name)", strategy.name)
    _budget(cfg, strategy)
    return strategy


def _overrides(argv: Sequence[str]) -> list[str] | None:
    """The plain ``key=value`` overrides of a command line, or None when it has flags precheck does not model."""
    out = []
    for arg in argv:
        if arg in ("-m", "--multirun"):
            continue
        if arg.startswith("-"):
            return None  # --cfg, --help, --info, ...: Hydra's own business
        if arg.startswith(("hydra.", "hydra/", "+hydra")):
            continue
        out.append(arg)
    return out


def precheck(argv: Sequence[str], compose: Callable[[list[str]], Any]) -> None:
    """Compose and :func:`validate` the overrides of ``argv`` (each sweep combination), before Hydra starts.

    Args:
        argv: the command line after the script name.
        compose: overrides -> composed config (``eval.runner.compose_config``).

    Raises:
        OptionError: a composition error (unknown key or option, bad override syntax) or a bad value, one line.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = _overrides(argv)
    if overrides is None:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's parser raises its own OverrideParseException
        raise OptionError(f"cannot parse overrides {' '.join(overrides)!r}: {_first_line(err)}") from None
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    combos = list(itertools.islice(itertools.product(*choices), MAX_SWEEP_COMBINATIONS))
    for combo in combos:
        check_knob_overrides(combo)
        try:
            cfg = compose(list(combo))
        except Exception as err:  # noqa: BLE001 - Hydra's ConfigCompositionException and friends
            raise OptionError(_first_line(err)) from None
        validate(cfg)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text}: {str(cause).strip()}"
    return " ".join(text.split())
