"""Click parameter types for the values MLflow hands the steps.

MLproject declares numbers as `type: float`, and a driver calling `mlflow.projects.run` may
pass 512 as "512.0"; a whole-number option accepts that, and refuses 512.5 instead of
silently truncating it.
"""

import click


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
