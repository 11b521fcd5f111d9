"""serve: the batching server for a registered model (cifar_models/server.py), on the model's own code.

    cifar10-serve -m models:/cifar10-classifier@champion --port 8000

The model is downloaded into a folder (kept beside nothing: a temporary one, unless --model-dir
says where), and the server is started there as `python -m cifar_models.server <folder>` with
only the model's code/ on PYTHONPATH, which is what a container does with the same folder, so
the model serves the code it carries and not this checkout's. The server replaces this process,
so signals reach it directly.
"""

import os
import sys
import tempfile
from pathlib import Path

import click
import mlflow

from steps.runtime import setup_logging

SERVER_MODULE = "cifar_models.server"


def download_model(model_uri: str, folder: Path) -> Path:
    """The model at model_uri as a local folder (a local model folder is used as it is), checked
    to carry the batching server."""
    if (Path(model_uri) / "MLmodel").is_file():
        local = Path(model_uri).resolve()
    else:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(folder)))
    if not (local / "MLmodel").is_file():
        raise click.ClickException(f"{model_uri}: not a model (no MLmodel in {local})")
    if not (local / "code" / "cifar_models" / "server.py").is_file():
        raise click.ClickException(f"{model_uri}: this model predates the batching server; serve it with "
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
    command, env = server_command(download_model(model_uri, folder), list(server_options))
    os.execve(command[0], command, env)


if __name__ == "__main__":
    cli()
