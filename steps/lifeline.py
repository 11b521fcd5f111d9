"""A stopped pipeline stops its steps.

main starts each step through MLflow's local backend, which runs `mlflow run -e <step>` under
setsid: the step has its own session and process group, so neither Ctrl-C in main's terminal
nor a kill of main's process group reaches it, and it would train on, holding the CPU and
train's checkpoint lock, while a rerun of main is refused. So main, when SIGINT or SIGTERM
arrives while it waits for a step (wait_or_stop), cancels the step (SIGTERM to the step's
process group), marks its run KILLED and exits with one line.
"""

import signal

from mlflow.tracking import MlflowClient

from steps.errors import StepError


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
