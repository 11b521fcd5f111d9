"""predict, its Spark engine and the cifar10-predict client, on a tiny untrained model registered as
cifar10-classifier@champion in a SQLite registry, and on PNGs written here (one of them corrupt)."""

import io
import subprocess
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

import cifar_models  # noqa: F401  (registers the architectures)
from benchmarks import _server
from cifar_models.inference import ModelSpec, save_network
from cifar_models.preprocess import CIFAR10_MEAN, CIFAR10_STD, CLASSES
from cifar_models.registry import create_model
from steps import predict_client, predict_output
from steps.predict import cli as predict_cli
from steps.predict import predict
from tests.conftest import REPO, mlflow_run_env

NAME = "cifar10-classifier"
CHAMPION = f"models:/{NAME}@champion"
CORRUPT = "b/corrupt.png"


def png(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder: Path, count: int) -> dict[str, bytes]:
    """count images under folder and a subfolder, one of them (CORRUPT) a broken PNG; returns
    path -> bytes. A hidden file and a text file lie beside them, which predict must skip."""
    images = {f"{'a' if i % 2 else 'b/c'}/{i:04d}.png": png(i, (32, 32) if i % 5 else (40, 24))
              for i in range(count - 1)}
    images[CORRUPT] = png(9999)[:60]
    for name, data in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "a" / ".hidden.png").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not an image")
    return images


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> _server.LoggedModel:
    root = tmp_path_factory.mktemp("predict-registry")
    torch.manual_seed(0)
    weights = save_network(create_model("fast_net_small"),
                           ModelSpec(model="fast_net_small", mean=CIFAR10_MEAN, std=CIFAR10_STD), root / "weights")
    return _server.log_model(root, weights, registered_name=NAME, alias="champion")


@pytest.fixture
def store(registry, tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    mlflow.set_tracking_uri(registry.tracking_uri)
    yield registry.tracking_uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("images")
    return folder, write_images(folder, 200)


def expected(images: dict[str, bytes]) -> pd.DataFrame:
    """The model's own answers, one image per call, for every good image."""
    model = mlflow.pyfunc.load_model(CHAMPION)
    good = {k: v for k, v in images.items() if k != CORRUPT}
    rows = model.predict(pd.DataFrame({"image": list(good.values())}))
    return rows.assign(path=list(good)).set_index("path").sort_index()


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        table = pd.read_csv(path, keep_default_na=True)
        table["probabilities"] = [None if pd.isna(p) else list(map(float, p.strip("[]").split(","))) for p in
                                  table["probabilities"]]
        return table
    return pd.read_parquet(path)


def assert_predicted(table: pd.DataFrame, images: dict[str, bytes], key: str = "path") -> None:
    table = table.set_index(key).sort_index()
    assert sorted(table.index) == sorted(images)
    bad = table.loc[CORRUPT]
    assert "not a readable image" in bad["error"] or "corrupt" in bad["error"]
    assert pd.isna(bad["label"]) and pd.isna(bad["class_id"]) and bad["probabilities"] is None or \
        (isinstance(bad["probabilities"], float) and pd.isna(bad["probabilities"]))
    good = table.drop(index=CORRUPT)
    assert good["error"].isna().all()
    reference = expected(images)
    assert good["label"].tolist() == reference["label"].tolist()
    assert good["class_id"].astype(int).tolist() == reference["class_id"].tolist()
    np.testing.assert_allclose(np.stack(good["probabilities"].tolist()), np.stack(reference["probabilities"].tolist()),
                               atol=1e-6, rtol=0)
    assert all(label in CLASSES for label in good["label"])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


# --- local engine -------------------------------------------------------------------------

def test_folder_searched_recursively_with_an_error_row_and_the_summary_logged(store, images, tmp_path):
    folder, data = images
    out = tmp_path / "out" / "predictions.parquet"
    with mlflow.start_run() as run:
        metrics = predict(CHAMPION, str(folder), str(out), batch_size=64)
    assert_predicted(pd.read_parquet(out), data)
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.metrics["images"] == 200 and logged.metrics["errors"] == 1 and logged.metrics["predicted"] == 199
    assert logged.metrics["images_per_second"] > 0
    assert sum(v for k, v in logged.metrics.items() if k.startswith("count_")) == 199
    assert metrics["errors"] == 1
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id)] == ["predictions.parquet"]
    assert leftovers(out.parent) == []


def test_tarball_to_csv(store, images, tmp_path):
    folder, data = images
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
    with mlflow.start_run():
        predict(CHAMPION, str(archive), str(tmp_path / "predictions.csv"))
    assert_predicted(read_table(tmp_path / "predictions.csv"), data)


def test_parquet_column_of_image_bytes_keyed_by_row(store, images, tmp_path):
    _, data = images
    paths = sorted(data)
    table = pa.table({"name": paths, "photo": pa.array([data[p] for p in paths], pa.binary())})
    pq.write_table(table, tmp_path / "images.parquet", row_group_size=50)
    with mlflow.start_run():
        predict(CHAMPION, str(tmp_path / "images.parquet"), str(tmp_path / "out.parquet"), batch_size=100)
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["row"].tolist() == list(range(len(paths)))
    assert_predicted(out.assign(path=paths).drop(columns="row"), data)


def test_an_unreadable_file_gets_its_row_and_the_batch_goes_on(store, tmp_path):
    folder = tmp_path / "images"
    data = write_images(folder, 6)
    (folder / "a" / "0001.png").unlink()
    (folder / "a" / "0001.png").symlink_to(tmp_path / "gone.png")  # listed, but reading it fails
    with mlflow.start_run():
        predict(CHAMPION, str(folder), str(tmp_path / "out.parquet"))
    out = pd.read_parquet(tmp_path / "out.parquet").set_index("path")
    assert out.loc["a/0001.png", "error"].startswith("cannot read the file")
    assert out["label"].notna().sum() == len(data) - 2


def test_a_failure_part_way_leaves_no_output_file(store, images, tmp_path, monkeypatch):
    folder, _ = images
    out = tmp_path / "predictions.parquet"
    monkeypatch.setattr(predict_output, "WRITE_ROWS", 16)  # pieces reach the disk before the failure
    real_load = mlflow.pyfunc.load_model
    calls = []

    class Failing:
        def __init__(self, model):
            self.model = model

        def predict(self, frame):
            calls.append(len(frame))
            if len(calls) == 4:
                assert not out.exists() and leftovers(tmp_path), "rows are written to a partial file"
                raise RuntimeError("the machine went away")
            return self.model.predict(frame)

    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: Failing(real_load(uri)))
    with pytest.raises(RuntimeError, match="went away"), mlflow.start_run():
        predict(CHAMPION, str(folder), str(out), batch_size=16)
    assert not out.exists() and leftovers(tmp_path) == []


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    pq.write_table(pa.table({"name": ["a"], "size": [3]}), tmp_path / "no_image.parquet")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "x.png").write_bytes(png(0))
    return {
        "missing path": (["--input", str(tmp_path / "nowhere")], "does not exist"),
        "empty folder": (["--input", str(tmp_path / "empty")], "no images"),
        "Parquet without an image column": (["--input", str(tmp_path / "no_image.parquet")], "no image column"),
        "model URI that does not resolve": (["--input", str(tmp_path / "ok"), "--model-uri", "models:/nope@champion"],
                                            "cannot load model models:/nope@champion"),
    }


@pytest.mark.parametrize("case", ["missing path", "empty folder", "Parquet without an image column",
                                  "model URI that does not resolve"])
def test_bad_input_is_one_line_a_non_zero_exit_and_no_output(store, tmp_path, case):
    args, fragment = bad_inputs(tmp_path)[case]
    out = tmp_path / "out.parquet"
    result = CliRunner().invoke(predict_cli, [*args, "--output", str(out)])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []


# --- the client ---------------------------------------------------------------------------

def client_files(folder: Path, data: dict[str, bytes]) -> list[str]:
    return [str(folder / name) for name in sorted(data)[:3]] + [str(folder / CORRUPT), str(folder / "missing.png")]


def assert_client_lines(result, files: list[str]) -> None:
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == files[:3]
    assert all(line.split("\t")[1] in CLASSES and 0 < float(line.split("\t")[2]) <= 1 for line in lines)
    errors = result.stderr.splitlines()
    assert errors[-2].startswith(f"{files[3]}\terror: ") and "readable" in errors[-2] or "corrupt" in errors[-2]
    assert errors[-1].startswith(f"{files[4]}\terror: cannot read the file")


def test_client_in_process(store, images):
    folder, data = images
    files = client_files(folder, data)
    assert_client_lines(CliRunner().invoke(predict_client.cli, files), files)


@pytest.mark.slow
def test_client_against_a_real_endpoint_gives_the_in_process_answers(registry, store, images, tmp_path):
    folder, data = images
    files = client_files(folder, data)
    local = CliRunner().invoke(predict_client.cli, files)
    served = _server.start(registry, tmp_path)
    try:
        remote = CliRunner().invoke(predict_client.cli, [*files, "--url", served.url])
    finally:
        _server.stop(served)
    assert_client_lines(remote, files)
    assert remote.stdout == local.stdout


def test_client_says_in_one_line_when_the_endpoint_is_down(store, images):
    folder, data = images
    result = CliRunner().invoke(predict_client.cli, [str(folder / sorted(data)[0]), "--url",
                                                     f"http://127.0.0.1:{_server.free_port()}"])
    assert result.exit_code == 1 and result.stderr.strip().startswith("Error: cannot reach")
    assert len(result.stderr.strip().splitlines()) == 1


# --- end to end ---------------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_run_predict_entry_point(store, images, tmp_path):
    folder, data = images
    out = tmp_path / "predictions.csv"
    cmd = ["mlflow", "run", str(REPO), "-e", "predict", "--env-manager", "local", "-P", f"model_uri={CHAMPION}",
           "-P", f"input={folder}", "-P", f"output={out}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=mlflow_run_env(store), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_predicted(read_table(out), data)


@pytest.mark.slow
def test_spark_gives_the_local_table_for_a_folder_a_tarball_and_parquet(store, images, tmp_path):
    from pyspark.sql import SparkSession

    folder, data = images
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=".")
    paths = sorted(data)
    pq.write_table(pa.table({"image": pa.array([data[p] for p in paths], pa.binary())}), tmp_path / "images.parquet",
                   row_group_size=64)
    spark = (SparkSession.builder.master("local[2]").appName("test_predict")
             .config("spark.driver.memory", "512m").config("spark.executor.memory", "512m")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    try:
        for name, source in [("folder", folder), ("tar", archive), ("parquet", tmp_path / "images.parquet")]:
            with mlflow.start_run():
                predict(CHAMPION, str(source), str(tmp_path / f"local-{name}.parquet"))
                predict(CHAMPION, str(source), str(tmp_path / f"spark-{name}.parquet"), engine="spark")
            key = "row" if name == "parquet" else "path"
            local = pd.read_parquet(tmp_path / f"local-{name}.parquet").sort_values(key).reset_index(drop=True)
            on_spark = pd.read_parquet(tmp_path / f"spark-{name}.parquet").sort_values(key).reset_index(drop=True)
            assert len(on_spark) == 200 and on_spark["error"].notna().sum() == 1
            pd.testing.assert_frame_equal(on_spark.drop(columns="probabilities"), local.drop(columns="probabilities"))
            good = local["error"].isna()
            # Spark batches the images differently, and a forward pass's float sums depend on the batch.
            np.testing.assert_allclose(np.stack(on_spark["probabilities"][good]), np.stack(local["probabilities"][good]),
                                       atol=1e-6, rtol=0)
    finally:
        spark.stop()
