"""The one exception type a step raises for a problem the user can fix: bad input, missing or
corrupt data, an unreachable tracking store. The click edge prints its message as one line and
exits non-zero; anything else is a bug and keeps its traceback."""


class StepError(Exception):
    pass
