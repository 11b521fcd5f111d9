"""A real `mlflow models serve`, or the batching server (cifar_models/server.py), of a model
logged with log_pyfunc_model, for tests and benchmarks.

The model is logged into a SQLite tracking store and registry under a scratch folder (never the
repository's ./mlruns) and served from a working directory in that folder by the mlflow CLI,
with `--env-manager local`, on 127.0.0.1 and a free port. With `hide_repository` (the default)
every Python process of the server starts with a sitecustomize that removes the editable
install's import hooks, so `steps` and `cifar_models` cannot be imported from the repository
and the model runs on the code it carries, as it would on a machine without this checkout.

The process tree is: the mlflow CLI, which waits on `bash -c "exec uvicorn ..."`, that is the
uvicorn process; with more than one worker, uvicorn's workers are its children. The batching
server's: LitServe's main process, whose children are the HTTP server, the inference worker(s),
a multiprocessing manager and its resource tracker.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from steps.package import log_pyfunc_model

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120

# Loaded by every Python process of the server (PYTHONPATH): drops the editable install's
# finder and path hook, which would otherwise import `steps` and `cifar_models` from the
# repository.
HIDE_REPOSITORY = textwrap.dedent("""\
    import sys
    editable = lambda f: getattr(f, "__module__", "").startswith("__editable__")
    sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p and p.rstrip("/") != {repo!r}]
""")


class ServerError(RuntimeError):
    """The server exited or did not answer /ping in time; the message ends with its log."""


@dataclass(frozen=True)
class LoggedModel:
    tracking_uri: str  # sqlite:///... under the scratch folder
    model_uri: str  # the logged model, models:/m-...
    served_uri: str  # what the server is given: model_uri, or models:/<name>@<alias>
    weights_dir: Path


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:<port>
    process: subprocess.Popen  # the mlflow CLI; its session holds the whole tree
    env: dict[str, str]  # the server's environment, for other processes that must match it
    workdir: Path  # outside the repository
    log: Path


def log_model(root: Path, weights_dir: Path, registered_name: str | None = None,
              alias: str | None = None, calibration_file: Path | None = None) -> LoggedModel:
    """Log the served model from weights_dir (and calibration_file, when given) into a SQLite
    store under root (registered and aliased when names are given). Leaves the process's
    tracking URI as it found it."""
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    try:
        # Artifacts under root too: by default they would land in ./mlruns of the working directory.
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = log_pyfunc_model(weights_dir, registered_model_name=registered_name,
                                    calibration_file=calibration_file)
        served_uri = info.model_uri
        if registered_name and alias:
            MlflowClient().set_registered_model_alias(registered_name, alias, info.registered_model_version)
            served_uri = f"models:/{registered_name}@{alias}"
    finally:
        mlflow.set_tracking_uri(None)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return LoggedModel(tracking_uri, info.model_uri, served_uri, Path(weights_dir))


@contextlib.contextmanager
def _tracking(tracking_uri: str):
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(root: Path, tracking_uri: str, hide_repository: bool = True,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without PYTHON* and MLFLOW_* settings, plus the store, this venv first
    on PATH (`mlflow models serve` runs `uvicorn` from PATH) and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hide_repository:
        hide = root / "hide_repository"
        hide.mkdir(exist_ok=True)
        (hide / "sitecustomize.py").write_text(HIDE_REPOSITORY.format(repo=str(REPO)))
        env["PYTHONPATH"] = str(hide)
    env.update(extra or {})
    return env


def start(model: LoggedModel, root: Path, workers: int = 1, hide_repository: bool = True,
          extra_env: dict[str, str] | None = None, timeout_s: float = START_TIMEOUT_S) -> Server:
    """Serve model from root/workdir and return once /ping answers; ServerError otherwise.

    The worker count goes in MLFLOW_MODELS_WORKERS, which the CLI reads in place of `-w` and
    the served model reads to share the cores among workers (cifar_models.pyfunc.serving_threads).
    """
    env = server_env(root, model.tracking_uri, hide_repository,
                     {"MLFLOW_MODELS_WORKERS": str(workers), **(extra_env or {})})
    workdir = root / "workdir"
    workdir.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model.served_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(url=url, process=process, env=env, workdir=workdir, log=log)
    try:
        wait_until_serving(server, timeout_s)
    except BaseException:
        stop(server)
        raise
    return server


def download(model: LoggedModel, folder: Path) -> Path:
    """The served model as a local model folder under folder."""
    with _tracking(model.tracking_uri):
        return Path(mlflow.artifacts.download_artifacts(model.served_uri, dst_path=str(folder)))


def start_batching(model_dir: Path, root: Path, tracking_uri: str, options: tuple[str, ...] = (),
                   hide_repository: bool = True, extra_env: dict[str, str] | None = None,
                   timeout_s: float = START_TIMEOUT_S) -> Server:
    """The batching server (cifar_models/server.py) on the model folder model_dir, started as
    `cifar10-serve` and a container start it: `python -m cifar_models.server` with the model's
    code/ on PYTHONPATH, from root/workdir; returns once /ping answers, ServerError otherwise.
    options go to the server (--max-batch-size ...)."""
    env = server_env(root, tracking_uri, hide_repository, extra_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(model_dir / "code")]))
    workdir = root / "workdir"
    workdir.mkdir(exist_ok=True)
    port = free_port()
    log = root / "batching-server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cifar_models.server", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
             *options],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(url=f"http://127.0.0.1:{port}", process=process, env=env, workdir=workdir, log=log)
    try:
        wait_until_serving(server, timeout_s)
    except BaseException:
        stop(server)
        raise
    return server


def ping(url: str, timeout_s: float = 2) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout_s) as reply:
            return reply.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until_serving(server: Server, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise ServerError(f"server exited with {server.process.returncode}:\n{log_tail(server)}")
        if ping(server.url):
            return
        time.sleep(0.5)
    raise ServerError(f"server did not answer /ping within {timeout_s:.0f} s:\n{log_tail(server)}")


def log_tail(server: Server, chars: int = 3000) -> str:
    return server.log.read_text(errors="replace")[-chars:] if server.log.exists() else ""


def stop(server: Server) -> None:
    """End the server's whole process group (the mlflow CLI, uvicorn and its workers)."""
    stop_group(server.process)


def stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """End a process started as its group's leader, and the group: SIGTERM, then SIGKILL after grace_s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# --- processes ---------------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """pid and its descendants that are alive now, parents before children (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        tree.append(current)
        todo.extend(sorted(children.get(current, [])))
    return tree


def process_status(pid: int) -> dict:
    """rss_kb (VmRSS, resident now), hwm_kb (VmHWM, peak resident), anon_kb and file_kb (the
    resident memory that is the process's own, and that of mapped files such as the shared
    libraries, which processes share), threads and command of a process, from /proc; empty if
    it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kb = {key: int(fields[name].split()[0]) for key, name in
          (("rss_kb", "VmRSS"), ("hwm_kb", "VmHWM"), ("anon_kb", "RssAnon"), ("file_kb", "RssFile"))}
    return {**kb, "threads": int(fields["Threads"]), "command": cmdline.strip()[:120]}


def pss_kb(pid: int) -> int:
    """Proportional set size of a process (Linux): its resident pages, each shared page divided
    by the number of processes that share it, so that a tree of forked processes sums to what
    it really holds; 0 if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (those still alive)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (not idle, not waiting on I/O), all cores."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
