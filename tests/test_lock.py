"""The environment is the lock (requirements/), and the lock is complete, hashed and satisfies pyproject.toml.

The first test is the drift guard: it fails, naming each package and the fix, when the venv running the tests differs
from the lock (a package missing, extra, or at another version), e.g. after `pip install -U filelock` by hand.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import lockcheck  # noqa: E402

REQ = ROOT / "requirements"


def test_environment_matches_the_lock():
    found = lockcheck.drift()
    assert not found, "\n".join(
        ["the venv differs from requirements/:", *found.lines(), "fix: run `make setup` (docs/install.md)"]
    )


def _lock(tmp_path, base, **layers):
    for name, pins in {"lock": base, **layers}.items():
        lines = [f"{n}=={v} \\\n    --hash=sha256:{'0' * 64}\n    # via x" for n, v in pins.items()]
        (tmp_path / f"{name}.txt").write_text("# header\n" + "\n".join(lines) + "\n")
    return tmp_path


def test_drift_names_an_upgraded_package_and_the_fix(tmp_path):
    req = _lock(tmp_path, {"filelock": "4.2.12"}, **{"torch-cpu": {"torch": "2.13.0+cpu"}})
    found = lockcheck.drift({"filelock": "4.3.1", "torch": "2.13.0+cpu", "vidprune": "0.1.0", "pip": "23.2"}, req)
    assert found.wrong == ("filelock installed 4.3.1, lock says 4.2.12",)
    assert not found.missing and not found.extra
    assert "other version: filelock installed 4.3.1, lock says 4.2.12" in found.lines()


def test_cli_message_names_package_and_fix(monkeypatch, capsys):
    monkeypatch.setattr(
        lockcheck, "drift", lambda: lockcheck.Drift((), ("filelock installed 4.3.1, lock says 4.2.12",), ())
    )
    monkeypatch.setattr(sys, "argv", ["lockcheck.py"])
    with pytest.raises(SystemExit) as exit_:
        lockcheck.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "filelock installed 4.3.1, lock says 4.2.12" in err and "make setup" in err


def test_drift_missing_extra_and_layers(tmp_path):
    layers = {"torch-cpu": {"torch": "2.13.0+cpu"}, "cuda": {"torch": "2.13.0", "triton": "3.7.1"}}
    req = _lock(tmp_path, {"a": "1.0"}, slurm={"submitit": "1.5.4", "launcher": "1.2.0"}, **layers)
    cpu = {"a": "1.0", "torch": "2.13.0+cpu"}
    assert not lockcheck.drift(cpu, req)  # CPU torch: the cuda layer is not expected
    assert lockcheck.drift({"torch": "2.13.0+cpu"}, req).missing == ("a==1.0",)
    assert lockcheck.drift({"a": "1.0"}, req).missing == ("torch==2.13.0+cpu",)  # no torch: the CPU layer is due
    assert lockcheck.drift({**cpu, "stray": "0.1"}, req).extra == ("stray==0.1",)
    # An extra is all or nothing: one of its packages installed makes the rest expected.
    assert lockcheck.drift({**cpu, "submitit": "1.5.4"}, req).missing == ("launcher==1.2.0",)
    assert not lockcheck.drift({**cpu, "submitit": "1.5.4", "launcher": "1.2.0"}, req)
    # PyPI's (CUDA) torch needs the cuda layer, and its exact version.
    assert lockcheck.drift({"a": "1.0", "torch": "2.13.0"}, req).missing == ("triton==3.7.1",)
    assert not lockcheck.drift({"a": "1.0", "torch": "2.13.0", "triton": "3.7.1"}, req)
    assert lockcheck.drift({"a": "1.0", "torch": "2.12.0", "triton": "3.7.1"}, req).wrong


@pytest.mark.parametrize("name", ["lock.txt", "torch-cpu.txt", "cuda.txt", "slurm.txt"])
def test_every_pin_is_exact_and_hashed(name):
    text = (REQ / name).read_text()
    blocks = [b for b in text.split("\n") if b and not b[0].isspace() and not b.startswith("#")]
    assert blocks, f"{name} pins nothing"
    for block in blocks:
        assert "==" in block and block.endswith("\\"), f"{name}: {block!r} is not an exact pin followed by hashes"
    assert text.count("--hash=sha256:") >= len(blocks)


def test_lock_satisfies_pyproject():
    """A direct requirement changed in pyproject.toml without `make lock` fails here, naming it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["dev"]
    pins = lockcheck.read_lock(REQ / "lock.txt")
    assert "torch" not in pins  # torch lives in exactly one of the two torch layers, never in the base
    for torch_layer in ("torch-cpu.txt", "cuda.txt"):
        torch = lockcheck.read_lock(REQ / torch_layer)["torch"]
        assert Requirement(next(s for s in direct if s.startswith("torch"))).specifier.contains(torch)
    pins |= lockcheck.read_lock(REQ / "torch-cpu.txt")
    for spec in direct:
        req = Requirement(spec)
        name = lockcheck.normalise(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements/lock.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock has {name}=={pins[name]}, wants {spec}"
    slurm = lockcheck.read_lock(REQ / "slurm.txt")
    for spec in project["optional-dependencies"]["slurm"]:
        req = Requirement(spec)
        assert req.specifier.contains(slurm[lockcheck.normalise(req.name)])


def test_overrides_hold_and_what_they_touch_imports():
    """antlr4 is overridden to 4.9.3 (Hydra's parser) and torchvision dropped; lmms-eval still imports without it."""
    from importlib import metadata

    assert metadata.version("antlr4-python3-runtime") == "4.9.3"
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("torchvision")
    code = "import omegaconf, lmms_eval.evaluator; assert omegaconf.OmegaConf.create({'a': '${b}', 'b': 1}).a == 1"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
