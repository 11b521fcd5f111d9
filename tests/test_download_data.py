"""download_data: reading archives, validating them, the checked on-disk format, and the step
end to end through `mlflow run`. Every archive here is a small one the test builds itself."""

import functools
import hashlib
import http.server
import io
import json
import pickle
import subprocess
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from steps import data as D
from steps.download_data import download_data
from tests.conftest import REPO, mlflow_run_env

ROWS = 30  # images per batch in the fake archives


def make_batch(rng: np.random.Generator, rows: int = ROWS, row_bytes: int = D.ROW_BYTES,
               label_max: int = 9) -> bytes:
    data = rng.integers(0, 256, size=(rows, row_bytes), dtype=np.uint8)
    labels = [int(v) for v in np.arange(rows) % (label_max + 1)]
    return pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels}, protocol=2)


def make_archive(path: Path, overrides: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A cifar-10-python.tar.gz in the official layout, with chosen batches replaced or left out."""
    rng = np.random.default_rng(0)
    members = {name: make_batch(rng) for name in (*D.TRAIN_BATCHES, D.TEST_BATCH)}
    members.update(overrides or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(f"{D.BATCH_FOLDER}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    return make_archive(tmp_path / D.ARCHIVE_NAME)


def test_reads_archive_folder_and_file_url_alike(archive, tmp_path):
    from_tar = D.read_cifar(archive)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    from_folder = D.read_cifar(tmp_path / "extracted" / D.BATCH_FOLDER)
    from_parent = D.read_cifar(tmp_path / "extracted")
    from_url = D.read_cifar(D.local_path(archive.as_uri()))
    train_x, train_y, test_x, test_y = from_tar
    assert train_x.shape == (5 * ROWS, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (ROWS, 32, 32, 3) and train_y.dtype == np.int64
    for other in (from_folder, from_parent, from_url):
        for a, b in zip(from_tar, other):
            np.testing.assert_array_equal(a, b)


def test_pixel_layout_is_channels_last_rgb(tmp_path):
    # One image whose red plane is 10, green 20, blue 30: CIFAR rows are planar R, G, B.
    row = np.concatenate([np.full(1024, v, np.uint8) for v in (10, 20, 30)])[None]
    batch = pickle.dumps({b"data": row, b"labels": [3]}, protocol=2)
    x, y = D.parse_batch("one", batch)
    assert x.shape == (1, 32, 32, 3) and y.tolist() == [3]
    assert x[0, 5, 7].tolist() == [10, 20, 30]


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file or folder"),
    ("truncated", "probably truncated"),
    ("not_tar", "not a tar archive"),
    ("short_rows", "rows of 3072 bytes"),
    ("bad_labels", "labels outside 0..9"),
    ("missing_batch", "archive lacks data_batch_3"),
    ("garbled", "not a readable CIFAR batch"),
    ("code_in_pickle", "refusing to load"),
])
def test_bad_sources_give_one_line_errors(case, expected, tmp_path, archive):
    rng = np.random.default_rng(1)
    path = tmp_path / "bad.tar.gz"
    if case == "missing":
        path = tmp_path / "nope.tar.gz"
    elif case == "truncated":
        path.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif case == "not_tar":
        path.write_bytes(b"this is not an archive at all" * 10)
    elif case == "short_rows":
        make_archive(path, {"data_batch_2": make_batch(rng, row_bytes=3071)})
    elif case == "bad_labels":
        make_archive(path, {D.TEST_BATCH: make_batch(rng, label_max=10)})
    elif case == "missing_batch":
        make_archive(path, drop=("data_batch_3",))
    elif case == "garbled":
        make_archive(path, {"data_batch_1": b"\x80\x02garbage" + bytes(100)})
    elif case == "code_in_pickle":
        make_archive(path, {"data_batch_1": pickle.dumps(print)})  # a callable, not data
    with pytest.raises(D.DataError, match=expected) as info:
        D.read_cifar(path)
    assert "\n" not in str(info.value)


@pytest.fixture
def archive_url(archive):
    """The archive served over HTTP on loopback, so the real download code runs."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
    server.shutdown()


def test_official_download_verifies_md5(archive, archive_url, tmp_path):
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    got = D.fetch_official(tmp_path / "cache", url=archive_url, md5=md5)
    assert got.read_bytes() == archive.read_bytes()
    # A cached file that passes the check is not fetched again (the URL is now unreachable).
    assert D.fetch_official(tmp_path / "cache", url="http://127.0.0.1:9/x.tar.gz", md5=md5) == got
    with pytest.raises(D.DataError, match="MD5 does not match"):
        D.fetch_official(tmp_path / "cache2", url=archive_url, md5="0" * 32)


def test_no_network_names_the_source_parameter(tmp_path):
    with pytest.raises(D.DataError, match=r"cannot download .* -P source=") as info:
        D.fetch_official(tmp_path, url="http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert "\n" not in str(info.value)


def test_balanced_subset_keeps_equal_class_shares():
    y = np.repeat(np.arange(10), [50, 40, 30, 60, 50, 50, 50, 50, 50, 70])
    x = np.arange(len(y))
    sx, sy = D.balanced_subset(x, y, 100)
    assert np.bincount(sy, minlength=10).tolist() == [10] * 10
    assert np.array_equal(y[sx], sy)  # images keep their own labels
    assert D.balanced_subset(x, y, 0)[0] is x


def test_channel_stats_match_direct_computation():
    x = np.random.default_rng(0).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    mean, std = D.channel_stats(x)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 1, 2)), rtol=1e-12)


def test_stored_data_round_trip_and_corruption_is_refused(synthetic_data_dir):
    data = D.load_data(str(synthetic_data_dir))
    assert data.train_x.shape == (200, 32, 32, 3) and data.test_y.shape == (100,)
    assert data.classes[3] == "cat" and len(data.digest) == 16
    # Flip one byte in the middle of a stored array: the checksum catches it.
    path = synthetic_data_dir / "train_x.npy"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match="checksum mismatch"):
        D.load_data(str(synthetic_data_dir))


def test_write_data_leaves_nothing_on_failure(tmp_path, monkeypatch):
    x, y, tx, ty = D.synthetic(50, 20)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(D, "channel_stats", fail)
    with pytest.raises(OSError):
        D.write_data(tmp_path / "data", x, y, tx, ty, source="synthetic")
    assert list(tmp_path.iterdir()) == []


def test_synthetic_is_deterministic_and_balanced():
    a, b = D.synthetic(100, 50), D.synthetic(100, 50)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert np.bincount(a[1]).tolist() == [10] * 10


def test_download_data_logs_everything_a_later_step_needs(archive, tracking_uri):
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run() as run:
        manifest = download_data(str(archive), train_limit=100, test_limit=20, cache_dir=archive.parent)
    client = MlflowClient()
    got = client.get_run(run.info.run_id)
    assert got.data.params["train_size"] == "100" and got.data.params["test_size"] == "20"
    assert float(got.data.params["mean_r"]) == pytest.approx(manifest["mean"][0], abs=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert artifacts == {f"data/{n}.npy" for n in ("train_x", "train_y", "test_x", "test_y", "val_x", "val_y")} | {
        "data/manifest.json"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/class_distribution.png", "plots/samples.png"}
    inputs = got.inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["cifar10-test", "cifar10-train", "cifar10-val"]
    # The run's data loads through its runs:/ URI, checksums verified.
    data = D.load_data(f"runs:/{run.info.run_id}/data")
    assert len(data.train_y) == 100 and data.digest == manifest["digest"]


def test_download_data_synthetic(tracking_uri):
    import mlflow

    with mlflow.start_run() as run:
        manifest = download_data("synthetic", train_limit=100)
    data = D.load_data(f"runs:/{run.info.run_id}/data")
    # The default 5,000 held out is capped at a tenth of synthetic's 2,000 training images.
    assert manifest["sizes"] == {"train": 100, "test": 500, "val": 200}
    np.testing.assert_array_equal(data.test_x, D.synthetic()[2])
    assert len(data.val_y) == 200 and data.val_digest == manifest["val_digest"]


def test_validation_split_is_balanced_held_out_and_apart_from_train_limit():
    x, y, _, _ = D.synthetic(1000, 10)
    ids = np.arange(len(y))  # stand-ins for the images, to see which ones went where
    train_ids, train_y, val_ids, val_y = D.validation_split(ids, y, 100)
    assert np.bincount(val_y).tolist() == [10] * 10
    assert not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == 1000
    # train_limit's class-balanced prefix of what is left never reaches the held-out images.
    kept, _ = D.balanced_subset(train_ids, train_y, 500)
    assert not set(kept) & set(val_ids)
    assert len(D.validation_split(ids, y, 0)[2]) == 0
    with pytest.raises(D.DataError, match="leaves none of the 1000 to train on"):
        D.validation_split(ids, y, 1000)


def test_download_data_val_size_zero_keeps_every_training_image(tracking_uri):
    import mlflow

    with mlflow.start_run() as run:
        manifest = download_data("synthetic", val_size=0)
    data = D.load_data(f"runs:/{run.info.run_id}/data")
    assert manifest["sizes"] == {"train": 2000, "test": 500, "val": 0}
    assert len(data.val_y) == 0 and data.val_digest == ""


@pytest.mark.slow
def test_mlflow_run_download_data_and_bad_source(archive, tracking_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    env = mlflow_run_env(tracking_uri)
    cmd = ["mlflow", "run", str(REPO), "-e", "download_data", "--env-manager", "local"]
    # MLproject declares the limits as floats, so 5e1 is as good as 50.
    ok = subprocess.run([*cmd, "-P", f"source={archive}", "-P", "train_limit=5e1", "-P", "val_size=0"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "differs from the official" in ok.stderr  # a local copy's MD5 is reported, not rejected

    bad = subprocess.run([*cmd, "-P", f"source={tmp_path / 'missing.tar.gz'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {tmp_path / 'missing.tar.gz'}: no such file or folder"]
    assert "Traceback" not in bad.stderr

    runs = MlflowClient().search_runs(["0"], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    manifest = json.loads(Path(MlflowClient().download_artifacts(runs[0].info.run_id, "data/manifest.json", str(tmp_path))).read_text())
    assert manifest["sizes"] == {"train": 50, "test": ROWS, "val": 0}
    assert MlflowClient().list_artifacts(runs[1].info.run_id) == []  # the failed run holds nothing
