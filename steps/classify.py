"""Images through a loaded pyfunc in one call per chunk, an unreadable image costing only its own row.

The served model refuses a whole request when one image in it is bad (one-line
INVALID_PARAMETER_VALUE, as the endpoint answers 400). A batch must not: a refused chunk is split
in halves until every refused part is a single image, whose refusal is its error. A chunk with no
bad image, the common case, is one `predict` call, so a batch runs at the model's own rate and
decodes every image with the model's own code, as the endpoint does.
"""

import re

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode, INVALID_PARAMETER_VALUE

from cifar_models.pyfunc import INPUT_COLUMN, OUTPUT_COLUMNS

ERROR_COLUMN = "error"  # why an image got no prediction; null when it got one
RESULT_COLUMNS = (*OUTPUT_COLUMNS, ERROR_COLUMN)

_BAD_INPUT = ErrorCode.Name(INVALID_PARAMETER_VALUE)
# The model names the image it refuses by its place in the request ("image 3: ..."), or as
# "image: ..." when it decodes one alone; in a table row the place says nothing.
_IMAGE_PREFIX = re.compile(r"^image( \d+)?: ")


def image_error(message: str) -> str:
    """The model's refusal of one image, without the request position it starts with."""
    return _IMAGE_PREFIX.sub("", " ".join(message.split()))


def error_rows(errors: list[str]) -> pd.DataFrame:
    """Rows with no prediction, one per error message."""
    n = len(errors)
    return pd.DataFrame({"label": pd.Series([None] * n, dtype=object),
                         "class_id": pd.array([None] * n, dtype="Int64"),
                         "confidence": pd.Series([float("nan")] * n, dtype="float64"),
                         "probabilities": pd.Series([None] * n, dtype=object),
                         "unknown": pd.array([None] * n, dtype="boolean"),
                         ERROR_COLUMN: pd.Series(errors, dtype=object)})


def classify(model, images: list) -> pd.DataFrame:
    """RESULT_COLUMNS for each of images (encoded bytes, or None), in order.

    Only the model's refusal of its input is caught; any other failure (a broken model, memory)
    stops the caller, as it would every later chunk too.
    """
    if not images:
        return error_rows([])
    try:
        predicted = model.predict(pd.DataFrame({INPUT_COLUMN: images}))
    except MlflowException as exc:
        if exc.error_code != _BAD_INPUT:
            raise
        if len(images) == 1:
            return error_rows([image_error(exc.message)])
        half = len(images) // 2
        return pd.concat([classify(model, images[:half]), classify(model, images[half:])], ignore_index=True)
    # reindex: a model registered before `unknown` existed gives no such column; it stays null.
    rows = predicted.reindex(columns=list(OUTPUT_COLUMNS)).reset_index(drop=True)
    rows["class_id"] = rows["class_id"].astype("Int64")
    rows["unknown"] = rows["unknown"].astype("boolean")
    rows[ERROR_COLUMN] = pd.Series([None] * len(rows), dtype=object)
    return rows
