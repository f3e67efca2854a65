"""One cell over N processes (``nproc=N``): lmms-eval's own multi-process route, started through accelerate.

``make eval ... nproc=N`` (and every job of ``make sweep``) validates the command line in the one process it starts
with, checks the cells' locks and the weights, writes the resolved config to
``<results_dir>/.cache/launch/<hash>.yaml`` and runs ``accelerate launch --multi_gpu --num_processes N`` on
``scripts/run_eval.py --rank-config <that file>`` (:func:`launch`). Each rank then runs the same cell
(:func:`eval.runner.run`):

* rank ``r`` gets device ``cuda:r`` on a GPU machine (NCCL), or the CPU (gloo: ``Accelerator(cpu=True)``);
* rank 0 prepares the task files and broadcasts their names; lmms-eval builds every task's requests and gives rank
  ``r`` the documents ``r, r + N, r + 2N, ...`` of the first ``limit``, padding shorter shards with a copy of a request
  whose answer it drops (the model answers those without running anything);
* rank 0 holds each cell's lock (``flock``) for the run; the other ranks wait for it before they open the sample log.
  All ranks append to the cell's one ``samples.jsonl`` under an exclusive ``flock`` per line, each line fsynced as
  its sample finishes, so a killed rank loses at most its sample in flight, and any later run (with any ``nproc``)
  reuses every finished sample;
* after lmms-eval has gathered the scores on rank 0, every rank's per-sample entries, resume counts and device
  description are gathered there (:func:`gather`), and rank 0 alone writes ``record.json`` (over all samples: the
  timing statistics cover every rank) and the tables. The record's ``devices`` names every rank's device.

When a rank dies, torch's elastic agent (under accelerate) stops the others and the launch exits non-zero; a re-run
resumes from the log. A rank's error is printed by that rank (one line); the launching process then exits with the
launcher's code.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "LaunchFailed",
    "barrier",
    "broadcast",
    "gather",
    "is_rank",
    "launch",
    "rank",
    "start",
    "world_size",
]

RANK_CONFIG_FLAG = "--rank-config"


class LaunchFailed(RuntimeError):
    """A rank of a multi-process cell failed; ``code`` is the launcher's exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def world_size() -> int:
    """Processes of this cell (``WORLD_SIZE``, set by the launcher; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_rank() -> bool:
    """Whether this process is one rank of a launched multi-process cell."""
    return world_size() > 1


def start(cuda: bool) -> Any:
    """The accelerate ``Accelerator`` of this rank (process group: NCCL on CUDA, gloo on the CPU), or None alone."""
    if not is_rank():
        return None
    from accelerate import Accelerator, InitProcessGroupKwargs

    # Ranks finish their shards at different times and wait for the slowest in lmms-eval's gathers: torch's default
    # 30-minute collective timeout would kill a long, unbalanced cell (lmms-eval raises its own default to 24 h too).
    return Accelerator(cpu=not cuda, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=24))])


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself when alone)."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any] | None:
    """Every rank's ``value`` on rank 0, in rank order; None on the other ranks (``[value]`` when alone)."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def barrier() -> None:
    """Wait for every rank."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def device_description(device: Any, machine: str) -> dict[str, Any]:
    """This rank's entry in a record's ``devices``: rank, host, torch device and what it is."""
    return {"rank": rank(), "host": platform.node(), "device": str(device), "machine": machine, "pid": os.getpid()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path: Path, nproc: int, script: Path) -> None:
    """Run ``script --rank-config <config_path>`` on ``nproc`` ranks through ``accelerate launch``; wait for them.

    Raises:
        LaunchFailed: a rank failed (its own error is printed above by that rank).
    """
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # torch's elastic launcher: N local ranks; on a CPU machine each rank builds a gloo group
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        RANK_CONFIG_FLAG,
        str(config_path),
    ]
    print(f"[vidprune] launching {nproc} processes: accelerate launch --num_processes {nproc} {script.name}")
    done = subprocess.run(cmd, cwd=script.parents[1])
    if done.returncode != 0:
        raise LaunchFailed(
            f"nproc={nproc}: a rank exited with status {done.returncode} (its error is above); re-run to resume, "
            "finished samples are kept",
            done.returncode,
        )
