"""Compare the running environment with the locks under requirements/ (run by `make setup` and by the test suite).

Expected: every package of ``lock.txt`` at its locked version, one torch layer (``cuda.txt`` where torch is installed
and is not a ``+cpu`` build, else ``torch-cpu.txt``), and each optional extra layer (``slurm.txt``) that is *active*:
an extra is active when any of its packages is installed, and then all of it must be, at its locked versions (a
half-installed layer is drift too). Not compared: vidprune itself (the editable project) and pip (the installer that
came with the venv's Python).

Usage::

    python scripts/lockcheck.py           # exit 1 with one line per difference and the fix
    python scripts/lockcheck.py --extras  # names of installed packages no active lock names (make setup removes them)
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REQ = Path(__file__).resolve().parents[1] / "requirements"
BASE = "lock.txt"
EXTRAS = ("slurm.txt",)
NOT_COMPARED = frozenset({"vidprune", "pip"})


def normalise(name: str) -> str:
    """PEP 503 name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{name: version}`` of every ``name==version`` pin in a lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[normalise(match[1])] = match[2]
    return pins


def installed() -> dict[str, str]:
    """``{name: version}`` of every distribution the running interpreter sees."""
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


@dataclass(frozen=True)
class Drift:
    """Differences between the environment and the active locks; empty when they agree."""

    missing: tuple[str, ...]  # "name==locked"
    wrong: tuple[str, ...]  # "name installed X, lock says Y"
    extra: tuple[str, ...]  # "name==X"

    def __bool__(self) -> bool:
        return bool(self.missing or self.wrong or self.extra)

    def lines(self) -> list[str]:
        return (
            [f"missing: {m} (in the lock, not installed)" for m in self.missing]
            + [f"other version: {w}" for w in self.wrong]
            + [f"not in the lock: {e}" for e in self.extra]
        )


def expected(have: dict[str, str], req: Path = REQ) -> dict[str, str]:
    """The pins that the environment ``have`` must match: the base lock, its torch layer and every active extra."""
    want = read_lock(req / BASE)
    want.update(read_lock(req / ("torch-cpu.txt" if "+cpu" in have.get("torch", "+cpu") else "cuda.txt")))
    for layer in EXTRAS:
        pins = read_lock(req / layer) if (req / layer).exists() else {}
        if any(name in have for name in pins):
            want.update(pins)
    return want


def drift(have: dict[str, str] | None = None, req: Path = REQ) -> Drift:
    """Compare ``have`` (default: this interpreter's packages) with the locks in ``req``."""
    have = installed() if have is None else have
    want = expected(have, req)
    missing = tuple(f"{n}=={v}" for n, v in sorted(want.items()) if n not in have)
    wrong = tuple(
        f"{n} installed {have[n]}, lock says {v}" for n, v in sorted(want.items()) if n in have and have[n] != v
    )
    extra = tuple(f"{n}=={v}" for n, v in sorted(have.items()) if n not in want and n not in NOT_COMPARED)
    return Drift(missing, wrong, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", action="store_true", help="print the names of packages no active lock names")
    parser.add_argument("--quiet", action="store_true", help="print nothing when the environment matches")
    args = parser.parse_args()
    found = drift()
    if args.extras:
        print(" ".join(e.split("==")[0] for e in found.extra))
        return
    if found:
        print(f"environment differs from requirements/ ({sys.prefix}):", file=sys.stderr)
        for line in found.lines():
            print(f"  {line}", file=sys.stderr)
        print(
            "fix: run `make setup` (it reinstalls exactly the lock); to change a version on purpose: `make lock`",
            file=sys.stderr,
        )
        sys.exit(1)
    if not args.quiet:
        print(f"environment matches requirements/ ({len(expected(installed()))} packages)")


if __name__ == "__main__":
    main()
