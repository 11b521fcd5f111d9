"""The one exception type a step raises for a problem the user can fix: bad input, missing or
corrupt data, an unreachable tracking store. The click edge prints its message as one line and
exits non-zero; anything else is a bug and keeps its traceback."""


class StepError(Exception):
    pass


def first_line(exc: BaseException) -> str:
    """The first line of exc's message ("" when it has none): what a one-line report shows of an
    error whose message may run to a traceback or a server's whole reply."""
    return (str(exc).strip().splitlines() or [""])[0].strip()
