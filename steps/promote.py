"""promote: point the `champion` alias at a given version, forward or back (rollback).

Refuses a version that does not exist or was registered from a run that did not finish, and
changes nothing then. Prints what moved from which version to which. Needs no MLflow run of
its own: it only moves an alias.
"""

import click

from steps.errors import StepError
from steps.registry import CHAMPION, promote
from steps.runtime import check_tracking_store, setup_logging


@click.command(help=__doc__)
@click.option("--version", required=True, type=int, help="The model version to make champion.")
@click.option("--registered-model", default="cifar10-classifier", show_default=True)
def cli(version: int, registered_model: str) -> None:
    setup_logging()
    try:
        check_tracking_store()
        old, new = promote(registered_model, version)
    except StepError as exc:
        raise click.ClickException(str(exc)) from None
    if old == new:
        click.echo(f"{registered_model}: {CHAMPION} already on version {new}; nothing moved")
    else:
        click.echo(f"{registered_model}: {CHAMPION} moved from version {old or '(none)'} to version {new}")


if __name__ == "__main__":
    cli()
