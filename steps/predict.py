"""predict: a registered model applied to a folder, a tarball or a Parquet file of images, the
answers in one table.

Reads: a model URI (models:/cifar10-classifier@champion by default; any pyfunc URI of the served
model) and the input (steps.predict_inputs). Writes: the output, a .parquet or .csv file with one
row per image: its path (row number for Parquet input), label, class_id, confidence,
probabilities, unknown and error (why an image got no prediction; then the others are empty). Logs params
model_uri, input, output, engine, batch_size; metrics images, predicted, errors,
images_per_second (reading, predicting and writing, without loading the model) and count_<class>;
and the output as an artifact.

engine=local predicts in this process, one chunk of batch_size images at a time through the
model's own `predict` (steps.classify); engine=spark reads the images with Spark and predicts
with `mlflow.pyfunc.spark_udf` of the same model (steps.predict_spark). Both write the same table.
"""

import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator

import click
import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cifar_models.pyfunc import MAX_IMAGES
from steps.classify import ERROR_COLUMN, classify, error_rows
from steps.errors import StepError, first_line
from steps.options import WHOLE, log_params
from steps.predict_inputs import Source, open_source, read_chunks
from steps.predict_output import check_output, result_schema, table_writer
from steps.runtime import step_command

log = logging.getLogger(__name__)

CHAMPION_URI = "models:/cifar10-classifier@champion"
ENGINES = ("local", "spark")
PROGRESS_EVERY_S = 10  # a plain progress line this often when stderr is not a terminal


def load_model(model_uri: str):
    """The pyfunc, or StepError in one line when the URI does not resolve or the model won't load."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:
        raise StepError(f"cannot load model {model_uri}: {first_line(exc)}") from None


def local_results(model, source: Source, batch_size: int) -> Iterator[pd.DataFrame]:
    """RESULT_COLUMNS and the source's key for every image, one chunk at a time. Chunks are read
    in this thread: a reader thread ahead of the model measured slower on 2 cores, where it takes
    time from the forward's threads (benchmarks/README.md, "Batch prediction")."""
    for chunk in read_chunks(source, batch_size):
        readable = [i for i, error in enumerate(chunk.errors) if error is None]
        rows = classify(model, [chunk.images[i] for i in readable])
        if len(readable) < len(chunk.keys):  # a file that could not be read keeps its place, with its reason
            unreadable = [i for i, error in enumerate(chunk.errors) if error is not None]
            rows = pd.concat([rows, error_rows([chunk.errors[i] for i in unreadable])], ignore_index=True)
            rows.index = readable + unreadable
            rows = rows.sort_index().reset_index(drop=True)
        rows.insert(0, source.key, chunk.keys)
        yield rows


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) a plain line every PROGRESS_EVERY_S."""

    def __init__(self, total: int | None) -> None:
        self.bar = tqdm(total=total, unit="img", file=sys.stderr) if sys.stderr.isatty() else None
        self.count, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info("%d images, %.0f images/s", self.count, self.count / (now - self.start))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def source_size(source: Source) -> int | None:
    """The image count when it is known without reading the input (Parquet metadata)."""
    if source.kind == "parquet":
        return pq.ParquetFile(source.path).metadata.num_rows
    return None


def predict(model_uri: str, input_path: str, output: str, *, engine: str = "local", batch_size: int = MAX_IMAGES,
            spark_master: str | None = None, spark_conf: dict[str, str] | None = None) -> dict[str, float]:
    """Predict every image of input_path into output and log the summary to the active run.

    spark_master and spark_conf apply with engine="spark": None takes Spark's own configuration
    (spark-defaults.conf, spark-submit's options), which is local[*] when it sets none.
    """
    if engine not in ENGINES:
        raise StepError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if not 1 <= batch_size <= MAX_IMAGES:
        raise StepError(f"batch_size must be 1 to {MAX_IMAGES}, the most images the model takes in one call")
    out_path = check_output(output)
    source = open_source(input_path)
    log_params({"model_uri": model_uri, "input": input_path, "output": output, "engine": engine,
                "batch_size": batch_size})

    if engine == "local":
        results = local_results(load_model(model_uri), source, batch_size)
    else:
        from steps.predict_spark import spark_results  # pyspark is an optional extra

        results = spark_results(model_uri, source, batch_size, spark_master, spark_conf or {})
    key_type = pa.string() if source.key == "path" else pa.int64()

    counts: Counter = Counter()
    errors = images = 0
    progress = Progress(source_size(source))
    start = time.perf_counter()
    try:
        with table_writer(out_path, result_schema(source.key, key_type)) as writer:
            for rows in results:
                writer.write(rows)
                failed = int(rows[ERROR_COLUMN].notna().sum())
                errors += failed
                images += len(rows)
                counts.update(rows["label"].dropna().tolist())
                progress.update(len(rows))
            if images == 0:
                raise StepError(f"input {input_path}: no images in it")
    finally:
        progress.close()
    seconds = time.perf_counter() - start

    metrics = {"images": images, "predicted": images - errors, "errors": errors,
               "images_per_second": images / seconds, "seconds": seconds}
    metrics.update({f"count_{label}": n for label, n in sorted(counts.items())})
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(out_path))
    log.info("%d images -> %s: %d predicted, %d errors, %.0f images/s", images, out_path,
             images - errors, errors, metrics["images_per_second"])
    return metrics


@click.command(help=__doc__)
@click.option("--model-uri", default=CHAMPION_URI, show_default=True, help="Any pyfunc URI of the served model.")
@click.option("--input", "input_path", required=True,
              help="A folder of images (recursive), a .tar/.tar.gz of images or a Parquet file with an image column.")
@click.option("--output", required=True, help="The table to write: a .parquet or .csv file.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True)
@click.option("--batch-size", default=MAX_IMAGES, type=WHOLE, show_default=True,
              help=f"Images per model call, at most {MAX_IMAGES}.")
@click.option("--spark-master", default=None,
              help="engine=spark: local[*], spark://host:7077, yarn, ...; not given: Spark's own configuration.")
def cli(model_uri: str, input_path: str, output: str, engine: str, batch_size: int, spark_master: str | None) -> None:
    with step_command():
        predict(model_uri, input_path, output, engine=engine, batch_size=batch_size, spark_master=spark_master)


if __name__ == "__main__":
    cli()
