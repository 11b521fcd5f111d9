"""predict's Spark engine: the images read by Spark, classified by `mlflow.pyfunc.spark_udf` of the
same model on the executors, and the predictions streamed back to the driver, which writes the
same table as the local engine.

A folder is read with Spark's `binaryFile` source and a Parquet file with its Parquet reader, so
both can live wherever the cluster reads (hdfs://, s3a://). A tarball cannot be split across
executors; the driver unpacks it into a Parquet spool beside the output, which on a cluster must
therefore be on storage the executors see.

The served model refuses a whole call when one image in it is bad, and a refused call would fail
the Spark job. So each image is first decoded alone by the model's own `decode_image` (the model's
code, shipped to the executors); an image it refuses gets that refusal as its error, and a valid
placeholder in its place for the model, whose answer for it is then dropped. Spark hands the model
batches of `batch_size` rows, within its per-call limit; a batch of large photos can still exceed
the model's per-call pixel budget (cifar_models.pyfunc.MAX_REQUEST_PIXELS), and then a smaller
batch_size is the remedy.
"""

import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from steps.classify import ERROR_COLUMN, RESULT_COLUMNS
from steps.errors import StepError, first_line
from steps.package import example_png
from steps.predict_inputs import IMAGE_SUFFIXES, Source, read_chunks

log = logging.getLogger(__name__)

RESULT_TYPE = "label string, class_id long, confidence double, probabilities array<double>, unknown boolean"
# binaryFile's filter is a Hadoop glob on file names, which is case-sensitive.
IMAGE_GLOB = "*.{" + ",".join(s[1:] for s in IMAGE_SUFFIXES) + "," + ",".join(s[1:].upper() for s in IMAGE_SUFFIXES) + "}"
SPOOL_ROWS = 4096  # tarball members per Parquet row group in the spool
# What Spark counts a file as costing when it packs files into partitions, unless the session
# says otherwise. Its default, 4 MB, puts 32 small images in a partition, and each partition is
# a Python task with its own start-up; at 64 KB a partition holds about 2,000 of them.
OPEN_COST = ("spark.sql.files.openCostInBytes", str(64 * 1024))


def start_session(master: str | None, conf: dict[str, str]):
    """The active Spark session (spark-submit's), else a new one; and whether this call made it."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName("cifar10-predict")
    if master:
        builder = builder.master(master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate(), True


def model_code_zip(model_dir: Path, scratch: Path) -> Path:
    """The model's own cifar_models package as a zip for SparkContext.addPyFile."""
    package = model_dir / "code" / "cifar_models"
    if not package.is_dir():
        raise StepError(f"model at {model_dir} carries no cifar_models code; is it the served CIFAR-10 model?")
    archive = scratch / "cifar_models.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for file in package.rglob("*.py"):
            z.write(file, Path("cifar_models") / file.relative_to(package))
    return archive


def spool_tar(source: Source, spool: Path, batch_size: int) -> None:
    """The tarball's images into a Parquet file of (path, image), a row group at a time."""
    schema = pa.schema([("path", pa.string()), ("image", pa.binary())])
    with pq.ParquetWriter(spool, schema) as writer:
        for chunk in read_chunks(source, SPOOL_ROWS):
            writer.write_table(pa.table({"path": chunk.keys, "image": chunk.images}, schema=schema))


def image_frame(spark, source: Source, scratch: Path, batch_size: int):
    """A DataFrame of (key, image): the key a path (URI, as Spark lists it) or a row number."""
    from pyspark.sql import functions as F

    if source.kind == "folder":
        return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                .option("pathGlobFilter", IMAGE_GLOB).load(str(source.path.resolve()))
                .select(F.col("path").alias("key"), F.col("content").alias("image")))
    if source.kind == "tar":
        spool = scratch / "spool.parquet"
        spool_tar(source, spool, batch_size)
        return spark.read.parquet(str(spool)).select(F.col("path").alias("key"), "image")
    # Row numbers in file order: zipWithIndex numbers partitions in order, and Spark splits one
    # Parquet file into partitions in row-group order.
    images = spark.read.parquet(str(source.path.resolve())).select(source.column)
    return images.rdd.zipWithIndex().map(lambda pair: (pair[1], pair[0][0])).toDF("key long, image binary")


def checked_predictions(spark, frame, model_dir: str):
    """frame's rows with RESULT_COLUMNS: the model's answer, or the model's refusal of the image."""
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")
    def refusal(images: pd.Series) -> pd.Series:
        # Runs on the executors, on the model's own code (addPyFile), not this repository's.
        import re

        from cifar_models.pyfunc import decode_image

        def why(data) -> str | None:
            try:
                decode_image(data)
            except Exception as exc:
                return re.sub(r"^image( \d+)?: ", "", " ".join(str(getattr(exc, "message", exc)).split()))
            return None

        return images.map(why)

    model = mlflow.pyfunc.spark_udf(spark, model_dir, result_type=RESULT_TYPE, env_manager="local")
    checked = frame.withColumn(ERROR_COLUMN, refusal("image"))
    usable = F.when(F.col(ERROR_COLUMN).isNull(), F.col("image")).otherwise(F.lit(example_png()))
    predicted = checked.withColumn("p", model(F.struct(usable.alias("image"))))
    ok = F.col(ERROR_COLUMN).isNull()
    return predicted.select("key", *[F.when(ok, F.col(f"p.{c}")).alias(c) for c in RESULT_COLUMNS[:-1]],
                            ERROR_COLUMN)


def relative_key(key: str, base: str) -> str:
    """A path Spark lists (file:/data/x/a.png) relative to the folder it was asked to read."""
    path = urlparse(key).path
    return path[len(base):].lstrip("/") if path.startswith(base) else key


def spark_results(model_uri: str, source: Source, batch_size: int, master: str | None,
                  conf: dict[str, str]) -> Iterator[pd.DataFrame]:
    """The key and RESULT_COLUMNS for every image, batch_size rows at a time, in Spark's order
    (the local engine's order is the input's; no sort, as a sort would run the model twice)."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise StepError("engine=spark needs pyspark: pip install -e '.[spark]'") from None
    scratch = Path(tempfile.mkdtemp(prefix="cifar10-predict-"))
    spark, started = start_session(master, conf)
    try:
        try:
            model_dir = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(scratch / "model")))
        except Exception as exc:
            raise StepError(f"cannot load model {model_uri}: {first_line(exc)}") from None
        # The model refuses calls of more than MAX_IMAGES rows; Spark's Arrow batches are its calls.
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
        if not spark.sparkContext.getConf().contains(OPEN_COST[0]):
            spark.conf.set(*OPEN_COST)
        spark.sparkContext.addPyFile(str(model_code_zip(model_dir, scratch)))
        frame = image_frame(spark, source, scratch, batch_size)
        rows = checked_predictions(spark, frame, str(model_dir))
        base = urlparse(source.path.resolve().as_uri()).path
        batch: list = []
        for row in rows.toLocalIterator(prefetchPartitions=True):
            batch.append(row.asDict(recursive=False))
            if len(batch) == batch_size:
                yield _frame(batch, source, base)
                batch = []
        if batch:
            yield _frame(batch, source, base)
    finally:
        if started:
            spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _frame(rows: list[dict], source: Source, base: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["key", *RESULT_COLUMNS])
    keys = frame.pop("key")
    if source.kind == "folder":
        keys = [relative_key(k, base) for k in keys]
    frame.insert(0, source.key, keys)
    frame["class_id"] = frame["class_id"].astype("Int64")
    frame["confidence"] = frame["confidence"].astype("float64")
    frame["unknown"] = frame["unknown"].astype("boolean")
    return frame
