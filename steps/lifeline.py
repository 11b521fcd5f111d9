"""A stopped pipeline stops its steps.

main starts each step through MLflow's local backend, which runs `mlflow run -e <step>` under
setsid: the step has its own session and process group, so neither Ctrl-C in main's terminal
nor a kill of main's process group reaches it, and it would train on, holding the CPU and
train's checkpoint lock, while a rerun of main is refused. Two halves stop it:

- main, when SIGINT or SIGTERM arrives while it waits for a step (wait_or_stop), cancels the
  step (SIGTERM to the step's process group), marks its run KILLED and exits with one line;
- SIGKILL cannot be caught, so each step watches main itself (watch_main): main names itself
  in CIFAR10_PIPELINE_MAIN, which the step inherits with main's environment, and a step that
  finds main gone marks its own run KILLED and kills its process group.
"""

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

from steps.errors import StepError

log = logging.getLogger(__name__)

MAIN_ENV = "CIFAR10_PIPELINE_MAIN"  # "<pid>:<start time>" of the main that started this step
POLL_S = 1.0  # how often a step looks for its main


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or
    None when it is gone or a zombie. With the pid it names one process: a pid the kernel
    hands out again later comes with another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; fields 3 on follow it.
    state, *rest = stat.rsplit(")", 1)[1].split()
    return None if state in ("Z", "X") else rest[18]


def name_main() -> None:
    """Name this process, as main, to the steps it starts from now on."""
    started = start_time(os.getpid())
    if started is not None:  # no /proc (macOS): steps are not watched, only cancelled on a signal
        os.environ[MAIN_ENV] = f"{os.getpid()}:{started}"


def _interrupt(signum, frame) -> None:
    # Once is enough. Ctrl-C in a terminal also reaches the `mlflow run` above main, which
    # answers it with SIGTERM to main: neither that nor a second Ctrl-C may cut the cleanup short.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_or_stop(submitted, entry_point: str) -> bool:
    """submitted.wait(); but on SIGINT or SIGTERM the step is stopped first: cancelled, its run
    marked KILLED (a step ended by a signal leaves its run RUNNING), and StepError raised."""
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ok = submitted.wait()
    except KeyboardInterrupt as exc:
        submitted.cancel()
        MlflowClient().set_terminated(submitted.run_id, "KILLED")
        name = exc.args[0] if exc.args else "SIGINT"
        raise StepError(f"stopped by {name}: {entry_point} (run {submitted.run_id}) was stopped and marked KILLED; "
                        "run main again to resume") from None
    for s, handler in previous.items():
        signal.signal(s, handler)
    return ok


def _stop_this_step(run_id: str, main_pid: str) -> None:
    log.error("main (pid %s) is gone: stopping this step, its run %s marked KILLED", main_pid, run_id)
    try:
        MlflowClient().set_terminated(run_id, "KILLED")
    except Exception as exc:  # the store away: stopping matters more than the status
        log.warning("could not mark run %s KILLED (%s)", run_id, exc)
    # MLflow started the step's `mlflow run` with setsid, so the step's process group is its own
    # session and holds only this step: that `mlflow run`, this process and any augmentation
    # workers, which hold train's checkpoint lock too (they inherited its open file).
    if os.getpgrp() == os.getsid(0):
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def stop_if_main_gone(run_id: str) -> None:
    """What watch_main does, once, for a step whose own work has ended: if its main is gone, the
    run marked KILLED and the step's process group killed. A data-parallel train's launcher
    calls it when its ranks stopped because rank 0 found main gone; it cannot watch main itself,
    as killing it would leave torchrun no chance to stop the other ranks, and ending normally
    would let its `mlflow run` mark the run FAILED over KILLED."""
    named = os.environ.get(MAIN_ENV)
    if named:
        pid, started = named.split(":")
        if start_time(int(pid)) != started:
            _stop_this_step(run_id, pid)


@contextmanager
def watch_main(run_id: str) -> Iterator[None]:
    """While the body runs, stop this step within about POLL_S seconds of its main's end.

    A thread polls main's pid and start time rather than the kernel's PR_SET_PDEATHSIG, which
    fires on the death of the direct parent: a step's parent is the `mlflow run` between it and
    main, and that outlives main. A step run by hand (no CIFAR10_PIPELINE_MAIN) is not watched."""
    named = os.environ.get(MAIN_ENV)
    if not named:
        yield
        return
    pid, started = named.split(":")
    done = threading.Event()

    def watch() -> None:
        while not done.wait(POLL_S):
            if start_time(int(pid)) != started:
                _stop_this_step(run_id, pid)

    threading.Thread(target=watch, name="watch-main", daemon=True).start()
    try:
        yield
    finally:
        done.set()
