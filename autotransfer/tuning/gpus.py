"""One worker process per GPU: ``search --gpus`` and ``worker --gpus``.

:func:`plan_gpus` turns ``--gpus`` (``all``, ``none``, a count ``N`` or a list
of indices ``0,2``) and ``--trials-per-gpu K`` into worker *slots*. One slot on
the first GPU (or none: the CPU) runs in the calling process as before; more
slots start one ``autotransfer worker`` process each (:func:`run_workers`),
pinned to its GPU with ``CUDA_VISIBLE_DEVICES`` and with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set it.
They all join the same study and share its exact budget
(:mod:`autotransfer.store.budget`). The parent prints their output, each line
tagged with its GPU (so the progress shows which GPU runs which trial),
forwards SIGINT and SIGTERM to them, reports a worker that dies (and fails its
running trial at once, so another worker retries it), and returns each
worker's exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from autotransfer.engine.device import Machine, detect
from autotransfer.exceptions import UserInputError

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_DEFAULT = "expandable_segments:True"


@dataclass(frozen=True)
class Slot:
    """One worker process: the GPU it is pinned to (``gpu_id``: the physical id
    it gets as ``CUDA_VISIBLE_DEVICES``) and its number on that GPU."""

    gpu: int
    gpu_id: str
    k: int = 0
    per_gpu: int = 1

    @property
    def label(self) -> str:
        return f"GPU {self.gpu_id}" + (f"/{self.k}" if self.per_gpu > 1 else "")


@dataclass(frozen=True)
class GpuPlan:
    slots: tuple[Slot, ...]

    @property
    def spawn(self) -> bool:
        """Whether worker processes are started (else this process runs trials
        itself, on the CPU or its first GPU)."""
        return len(self.slots) > 1 or any(s.gpu != 0 for s in self.slots)


def plan_gpus(
    gpus: str | None, trials_per_gpu: int, train_device: str, machine: Machine | None = None
) -> GpuPlan:
    """The worker slots for ``--gpus`` / ``--trials-per-gpu`` on this machine.

    Raises:
        UserInputError: a malformed value, GPUs asked for where there are none
            or fewer, or ``--gpus`` with a study whose ``train.device`` is not auto.
    """
    if trials_per_gpu < 1:
        raise UserInputError(f"--trials-per-gpu {trials_per_gpu}: give 1 or more")
    if gpus is None:
        if train_device != "auto":
            return GpuPlan(())  # the spec's own device, in this process
        gpus = "all"
    gpus = gpus.strip().lower()
    if gpus == "none":
        return GpuPlan(())
    if train_device != "auto":
        raise UserInputError(
            f"--gpus {gpus}: the study's train.device is '{train_device}'; --gpus needs "
            "train.device auto (each worker then uses the GPU it is pinned to)"
        )
    machine = machine if machine is not None else detect()
    if gpus == "all":
        chosen = list(range(machine.count)) if machine.cuda else []
    else:
        chosen = _parse_gpus(gpus, machine)
    ids = machine.visible or tuple(str(i) for i in range(machine.count))
    return GpuPlan(tuple(
        Slot(i, ids[i], k, trials_per_gpu) for i in chosen for k in range(trials_per_gpu)
    ))


def _parse_gpus(text: str, machine: Machine) -> list[int]:
    hint = "give all, none, a count (e.g. 2) or GPU indices (e.g. 0,2; one GPU: 3,)"
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts if p) or not any(parts):
        raise UserInputError(f"--gpus '{text}' is not valid; {hint}")
    have = machine.count if machine.cuda else 0
    if "," not in text:  # a count
        n = int(text)
        if n == 0:
            raise UserInputError("--gpus 0 is a count of none; use --gpus none for the CPU")
        if n > have:
            raise UserInputError(
                f"--gpus {n}: this machine has {have} GPU(s); give at most {have}"
                + (" or none" if have else " or none (no CUDA GPU is available)")
            )
        return list(range(n))
    indices = [int(p) for p in parts if p]
    bad = [i for i in indices if i >= have]
    if bad:
        raise UserInputError(
            f"--gpus {text}: no GPU {bad[0]} here ("
            + (f"GPUs 0..{have - 1}" if have else "no CUDA GPU is available")
            + "); " + hint
        )
    return list(dict.fromkeys(indices))


@dataclass
class WorkerExit:
    slot: Slot
    pid: int
    returncode: int
    died: bool  # ended without being asked to (killed, crashed, failed)

    def describe(self) -> str:
        code = self.returncode
        how = (
            f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        )
        return f"worker on {self.slot.label} (pid {self.pid}) {how}"


def worker_env(slot: Slot, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of ``slot``'s worker: pinned to its GPU."""
    env = {**os.environ, **(extra or {})}
    env["CUDA_VISIBLE_DEVICES"] = slot.gpu_id
    env.setdefault(ALLOC_CONF, ALLOC_DEFAULT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def _forward_signals(procs: list[subprocess.Popen[bytes]], got: list[int]) -> Iterator[None]:
    """SIGINT / SIGTERM to this process go to every worker (once each)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        for p in procs:
            if p.poll() is None:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def run_workers(
    plan: GpuPlan,
    worker_args: list[str],
    echo: Callable[[str], None],
    on_death: Callable[[WorkerExit], None] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[list[WorkerExit], int | None]:
    """Start one ``autotransfer worker WORKER_ARGS`` per slot (``env`` added to
    its environment: the storage URL travels there, not on a command line that
    ``ps`` shows) and wait for all.
    ``echo`` gets each output line tagged with its slot; ``on_death`` runs when
    a worker ends that was not asked to stop. Returns every worker's exit and
    the signal this process forwarded (None if none)."""
    command = [sys.executable, "-m", "autotransfer", "worker", *worker_args]
    procs: list[subprocess.Popen[bytes]] = []
    got: list[int] = []
    readers = []
    with _forward_signals(procs, got):
        for slot in plan.slots:
            # A new session: a Ctrl-C in the terminal reaches the parent only, which
            # forwards it once (a second one would make a worker exit at once).
            proc = subprocess.Popen(
                command, env=worker_env(slot, env), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            procs.append(proc)
            echo(f"[{slot.label}] worker started (pid {proc.pid})")
            reader = threading.Thread(
                target=_pump, args=(proc, slot, echo), daemon=True
            )
            reader.start()
            readers.append(reader)
        exits: dict[int, WorkerExit] = {}
        while len(exits) < len(procs):
            for slot, proc in zip(plan.slots, procs, strict=True):
                if proc.pid in exits or proc.poll() is None:
                    continue
                asked = bool(got) and proc.returncode == 128 + got[0]
                ended = WorkerExit(slot, proc.pid, proc.returncode,
                                   died=proc.returncode != 0 and not asked)
                exits[proc.pid] = ended
                if ended.died and on_death is not None:
                    on_death(ended)
            time.sleep(0.1)
    for reader in readers:
        reader.join(timeout=5)
    return [exits[p.pid] for p in procs], (got[0] if got else None)


def _pump(proc: subprocess.Popen[bytes], slot: Slot, echo: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        echo(f"[{slot.label}] {raw.decode(errors='replace').rstrip()}")


def launch(
    plan: GpuPlan,
    storage_url: str,
    study_name: str,
    artifacts: str,
    echo: Callable[[str], None],
    recover: Callable[[], None],
    data: str | None = None,
    timeout: float | None = None,
    n_trials: int | None = None,
) -> list[WorkerExit]:
    """Run ``plan``'s workers on the study until its budget is spent; ``recover``
    (fail a dead worker's running trial and queue it again) runs after each
    death. Returns the workers that died.

    Raises:
        Interrupted: this process got SIGINT or SIGTERM (forwarded to the workers,
            which queue their running trials again and stop).
    """
    from autotransfer.tuning.interrupts import Interrupted

    args = ["--study-name", study_name, "--artifacts", artifacts]
    if data is not None:
        args += ["--data", data]
    if timeout is not None:
        args += ["--timeout", repr(timeout)]
    if n_trials is not None:
        args += ["--n-trials", str(n_trials)]
    echo(
        f"{len(plan.slots)} worker(s): "
        + ", ".join(s.label for s in plan.slots)
        + " (one process each; lines below are tagged with their GPU)"
    )

    def died(exit: WorkerExit) -> None:
        echo(f"error: {exit.describe()}; its running trial is failed and queued again")
        recover()

    exits, signum = run_workers(
        plan, args, echo, died, env={"AUTOTRANSFER_STORAGE": storage_url}
    )
    if signum is not None:
        raise Interrupted(signum)
    return [e for e in exits if e.died]
