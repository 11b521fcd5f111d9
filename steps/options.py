"""Parameters as MLflow hands them to the steps, and as the steps log them back.

MLproject declares numbers as `type: float`, and a driver calling `mlflow.projects.run` may
pass 512 as "512.0"; a whole-number option accepts that, and refuses 512.5 instead of
silently truncating it.

`mlflow run` logs every entry-point parameter itself, as the string it was given ("1e-7",
"0"), before the step starts; MLflow refuses to log a param twice with another value, so a
step logs its parsed values (1e-07, 0.0) only where the run does not hold them already.

The word `recipe` (MLproject's default for train's recipe-overridable options, see
steps.recipes) or an empty parameter means "not given": `mlflow run` logs it as it was given, and
a step that resolved it to a value logs that as `<name>_resolved`, as the run's own `<name>`
cannot be changed any more.
"""

import logging
from collections.abc import Mapping

import click
import mlflow

from steps.budget import parse_seconds
from steps.errors import StepError

log = logging.getLogger(__name__)


# "the recipe's value", an empty parameter, and mlflow run's shell quoting of the empty one
NOT_GIVEN = ("recipe", "", "''", '""')


class OrNotGiven(click.ParamType):
    """`inner`, or None for the empty string: how MLproject, which must pass every parameter,
    says that an option was not given."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value in NOT_GIVEN):
            return None
        return self.inner.convert(value, param, ctx)


class WholeNumber(click.ParamType):
    name = "integer"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not number.is_integer():
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


WHOLE = WholeNumber()


class Duration(click.ParamType):
    """Seconds, given as a number or with a unit (90s, 15m, 1h): parse_seconds."""
    name = "duration"

    def convert(self, value, param, ctx) -> float:
        try:
            return parse_seconds(value)
        except StepError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def _same(logged: str, value) -> bool:
    if logged == str(value):
        return True
    if value == "" and logged in ("''", '""'):  # mlflow run logs an empty string as its shell quoting
        return True
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return False


def log_params(params: Mapping[str, object]) -> None:
    """mlflow.log_params for the active run, skipping those `mlflow run` already logged."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    fresh = {}
    for key in params.keys() & logged.keys():
        if _same(logged[key], params[key]):
            continue
        if logged[key] in NOT_GIVEN:
            fresh[f"{key}_resolved"] = params[key]
        else:
            log.warning("param %s: the run holds %r, the step parsed %r; keeping the run's", key, logged[key], params[key])
    fresh.update({k: v for k, v in params.items() if k not in logged})
    if fresh:
        mlflow.log_params(fresh)


def recipe_param(recipe: str) -> dict[str, str]:
    """The recipe a step ran, to log: as `recipe_resolved` when the run holds the `auto` that
    `mlflow run` logged, else as `recipe`."""
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    return {"recipe_resolved" if run.data.params.get("recipe") == "auto" else "recipe": recipe}
