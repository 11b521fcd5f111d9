"""serve: the batching server for a registered model (cifar_models/server.py), on the model's own code.

    cifar10-serve -m models:/cifar10-classifier@champion --port 8000

The model is downloaded into a folder (a temporary one unless --model-dir says where; a local
model folder is served where it is), and the server is started on it as
`python -m cifar_models.server <folder>` with only the model's code/ on PYTHONPATH, as a
container does with the same folder, so the model serves the code it carries and not this
checkout's. The server replaces this process, so signals reach it directly.
"""

import os
import sys
import tempfile
from pathlib import Path

import click
import mlflow
from mlflow.exceptions import MlflowException

from steps.errors import StepError, first_line
from steps.runtime import check_tracking_store, setup_logging

SERVER_MODULE = "cifar_models.server"


def download_model(model_uri: str, folder: Path) -> Path:
    """The model at model_uri as a local folder (a local model folder is used as it is), checked
    to carry the batching server."""
    if (Path(model_uri) / "MLmodel").is_file():
        local = Path(model_uri).resolve()
    else:
        check_tracking_store()
        try:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))
        except (MlflowException, OSError) as error:
            raise StepError(f"{model_uri}: cannot download the model: {first_line(error)}") from None
    if not (local / "MLmodel").is_file():
        raise StepError(f"{model_uri}: not a model (no MLmodel in {local})")
    if not (local / "code" / "cifar_models" / "server.py").is_file():
        raise StepError(f"{model_uri}: this model predates the batching server; serve it with "
                        "`mlflow models serve` or register it again")
    return local


def server_command(model_dir: Path, options: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that serve model_dir on its own code."""
    env = {**os.environ, "PYTHONPATH": str(model_dir / "code")}
    return [sys.executable, "-m", SERVER_MODULE, str(model_dir), *options], env


@click.command(help=__doc__, context_settings={"ignore_unknown_options": True})
@click.option("-m", "--model-uri", default="models:/cifar10-classifier@champion", show_default=True)
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Download the model here (default: a temporary folder).")
@click.argument("server_options", nargs=-1, type=click.UNPROCESSED)
def cli(model_uri: str, model_dir: Path | None, server_options: tuple[str, ...]) -> None:
    """SERVER_OPTIONS go to the server: --host, --port, --max-batch-size, --batch-timeout,
    --workers, --threads, --timeout (`python -m cifar_models.server --help`)."""
    setup_logging()
    folder = model_dir or Path(tempfile.mkdtemp(prefix="cifar10-serve-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        local = download_model(model_uri, folder)
    except StepError as error:
        raise click.ClickException(str(error)) from None
    command, env = server_command(local, list(server_options))
    os.execve(command[0], command, env)


if __name__ == "__main__":
    cli()
