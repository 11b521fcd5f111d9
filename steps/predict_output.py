"""The predictions table, written in pieces to a hidden partial file beside the output and moved
onto the output's name only when every row is in it.

A run that fails or is killed part-way leaves at most a `.<name>.<random>.partial` file, never a
file at the output's path that looks complete; a finished run replaces the output in one rename.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steps.classify import ERROR_COLUMN
from steps.errors import StepError

OUTPUT_SUFFIXES = (".parquet", ".csv")
# Rows held before they are written: one Parquet row group. Smaller groups make the file slow to
# read back; this many rows of predictions is a few MB.
WRITE_ROWS = 16384


def check_output(output: str) -> Path:
    path = Path(output).expanduser()
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise StepError(f"output {output}: must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if path.is_dir():
        raise StepError(f"output {output} is a folder; give a file name")
    return path


def result_schema(key: str, key_type: pa.DataType) -> pa.Schema:
    return pa.schema([(key, key_type), ("label", pa.string()), ("class_id", pa.int64()),
                      ("confidence", pa.float64()), ("probabilities", pa.list_(pa.float64())),
                      ("unknown", pa.bool_()), (ERROR_COLUMN, pa.string())])


class _Pieces:
    """Rows buffered up to WRITE_ROWS and then appended to the partial file."""

    def __init__(self, partial: Path, schema: pa.Schema, csv: bool) -> None:
        self.partial, self.schema, self.csv = partial, schema, csv
        self.buffer: list[pd.DataFrame] = []
        self.buffered = 0
        self.rows = 0
        self.parquet = None if csv else pq.ParquetWriter(partial, schema)

    def write(self, frame: pd.DataFrame) -> None:
        self.buffer.append(frame)
        self.buffered += len(frame)
        if self.buffered >= WRITE_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        frame = pd.concat(self.buffer, ignore_index=True)
        self.buffer, self.buffered = [], 0
        table = pa.Table.from_pandas(frame[self.schema.names], schema=self.schema, preserve_index=False)
        if self.parquet is not None:
            self.parquet.write_table(table)
        else:
            # A CSV cell holds one value: the probabilities as a JSON list.
            frame = table.to_pandas()
            frame["probabilities"] = [None if p is None else json.dumps(p.tolist()) for p in frame["probabilities"]]
            frame.to_csv(self.partial, mode="a", header=self.rows == 0, index=False)
        self.rows += len(table)

    def close(self) -> None:
        self.flush()
        if self.parquet is not None:
            self.parquet.close()
        elif self.rows == 0:  # CSV: the header is written with the first rows
            pd.DataFrame(columns=self.schema.names).to_csv(self.partial, index=False)


@contextmanager
def table_writer(output: Path, schema: pa.Schema) -> Iterator[_Pieces]:
    """A writer whose rows land at `output` only if the block ends without an exception."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    try:
        pieces = _Pieces(partial, schema, csv=output.suffix.lower() == ".csv")
        yield pieces
        pieces.close()
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
