"""What every step does at its click edge: logging, a fast check that the tracking store
answers, the MLflow run, and one-line errors for problems the user can fix."""

import logging
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import mlflow

from steps.errors import StepError, first_line
from steps.lifeline import watch_main

log = logging.getLogger(__name__)

ERROR_TAG = "error"  # a failed step's one-line reason, read by the main driver


def retry(fn: Callable[[], object], attempts: int, delay_s: float,
          errors: type[Exception] | tuple[type[Exception], ...] = Exception) -> object:
    """fn(), called again after each failure of the given types, with backoff (delay_s, then
    twice that, ...), at most `attempts` times in all; the last failure is raised to the caller,
    who decides whether it stops the step or only warns."""
    for attempt in range(attempts - 1):
        try:
            return fn()
        except errors:
            time.sleep(delay_s * 2 ** attempt)
    return fn()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # MLflow and its HTTP stack are chatty at INFO; their warnings still show.
    for name in ("mlflow", "urllib3", "alembic", "matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_tracking_store(timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after an hour of training, when an HTTP tracking server is down.

    Local stores (a SQLite file, a folder) need no check: MLflow creates them on first use.
    """
    uri = mlflow.get_tracking_uri()
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as reply:
            reply.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StepError(f"MLflow tracking server {uri} is unreachable ({reason}); "
                        "start it, or unset MLFLOW_TRACKING_URI to use the local store") from None


@contextmanager
def step_command() -> Iterator[mlflow.ActiveRun]:
    """Run the body inside an MLflow run (the one `mlflow run` created, when there is one).

    A StepError ends the run FAILED and leaves the process with its message on one line. A step
    that main started ends, its run KILLED, when main does (steps.lifeline)."""
    setup_logging()
    try:
        check_tracking_store()
        with mlflow.start_run() as run, watch_main(run.info.run_id):
            log.info("MLflow run %s (tracking store %s)", run.info.run_id, mlflow.get_tracking_uri())
            try:
                yield run
            except Exception as exc:
                # The message, as a tag, is what the main driver reports for a failed step.
                line = first_line(exc)
                if not isinstance(exc, StepError):  # a bug: its type says more than its message
                    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
                mlflow.set_tag(ERROR_TAG, line[:5000])
                raise
    except StepError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def command_without_run() -> Iterator[None]:
    """step_command's logging and one-line errors without an MLflow run: for the processes of a
    data-parallel training that do not log (steps.distributed)."""
    setup_logging()
    try:
        yield
    except StepError as exc:
        raise click.ClickException(str(exc)) from None
