"""The served model in-process: decoding every format and mode, the request limits, one-line
errors for bad input, and predictions equal to the shared forward path. The same model over
real HTTP is tests/test_serving.py."""

import io
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH
from PIL import Image

import cifar_models.fast_net  # noqa: F401  (registers fast_net)
from cifar_models.calibration import CALIBRATION_FILE, Calibration, ood_scores
from cifar_models.inference import ModelSpec, load_network, predict_logits, save_network
from cifar_models.preprocess import CIFAR10_MEAN, CIFAR10_STD, CLASSES
from cifar_models.pyfunc import (
    CALIBRATION_ARTIFACT, MAX_IMAGES, MAX_PIXELS, MAX_REQUEST_PIXELS, OUTPUT_COLUMNS, RESAMPLE, WEIGHTS_ARTIFACT,
    CifarClassifier, InvalidRequest, decode_image,
)
from cifar_models.registry import create_model

# Every (format, mode) PIL can write; each must decode.
SAVABLE = [
    ("PNG", "1"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "RGB"), ("PNG", "RGBA"),
    ("PNG", "I;16"), ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("BMP", "1"),
    ("BMP", "L"), ("BMP", "P"), ("BMP", "RGB"), ("GIF", "L"), ("GIF", "P"), ("GIF", "RGBA"),
    ("WEBP", "RGB"), ("WEBP", "RGBA"), ("TIFF", "CMYK"), ("TIFF", "LA"), ("TIFF", "I;16"),
    ("TIFF", "F"), ("TIFF", "YCbCr"), ("PPM", "RGB"), ("PPM", "I"),
]


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A 65-byte PNG that declares width x height RGB pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def frame(*values: object) -> pd.DataFrame:
    return pd.DataFrame({"image": list(values)})


def assert_rejected(call, *fragments: str) -> None:
    """call() raises the served model's client error: a one-line, 400-class MlflowException."""
    with pytest.raises(MlflowException) as caught:
        call()
    error = caught.value
    assert isinstance(error, InvalidRequest)
    assert error.error_code == "INVALID_PARAMETER_VALUE" and error.get_http_status_code() == 400
    assert "\n" not in error.message and error.message
    for fragment in fragments:
        assert fragment in error.message


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    torch.manual_seed(0)
    spec = ModelSpec(model="fast_net", mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return save_network(create_model("fast_net"), spec, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def classifier(weights_dir) -> CifarClassifier:
    model = CifarClassifier()
    model.load_context(PythonModelContext(artifacts={WEIGHTS_ARTIFACT: str(weights_dir)}, model_config={}))
    return model


def reference_logits(weights_dir, images: np.ndarray) -> torch.Tensor:
    network, spec = load_network(weights_dir)
    return predict_logits(network, images, spec.mean, spec.std)


def reference_probabilities(weights_dir, images: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """What evaluate computes for the same pixels: the shared forward path, softmax of the
    logits over the temperature in float32."""
    return torch.softmax(reference_logits(weights_dir, images) / temperature, dim=1).numpy()


# --- decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "PPM"])
def test_32x32_lossless_images_decode_to_exactly_their_pixels(fmt):
    pixels = noise(32, 32)
    assert np.array_equal(decode_image(encode(pixels, fmt)), pixels)


@pytest.mark.parametrize("fmt,mode", SAVABLE)
@pytest.mark.parametrize("size", [(32, 32), (1, 1), (9, 7), (33, 31), (300, 5)])
def test_every_format_mode_and_size_decodes_to_32x32_rgb(fmt, mode, size):
    data = encode(noise(size[1], size[0]), fmt, mode)
    decoded = decode_image(data)
    assert decoded.shape == (32, 32, 3) and decoded.dtype == np.uint8


def test_other_sizes_are_resized_with_the_documented_filter():
    pixels = noise(48, 80)
    expected = np.asarray(Image.fromarray(pixels).resize((32, 32), RESAMPLE))
    assert np.array_equal(decode_image(encode(pixels)), expected)


@pytest.mark.parametrize("size", [(4000, 3000), (640, 480), (300, 200)])
def test_a_large_jpeg_decoded_at_reduced_scale_stays_within_two_grey_levels_of_the_full_decode(size):
    photo = np.asarray(Image.fromarray(noise(32, 32)).resize(size, Image.Resampling.BICUBIC)).astype(int)
    photo = np.clip(photo + np.random.default_rng(0).normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
    data = encode(photo, "JPEG", quality=90)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), RESAMPLE)).astype(int)
    difference = np.abs(decode_image(data).astype(int) - full)
    assert difference.max() <= 2 and difference.mean() < 0.5, (difference.max(), difference.mean())


def test_animated_gif_gives_its_first_frame():
    red, blue = (Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 0, 255)))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert (decode_image(data) == [255, 0, 0]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(mode):
    image = Image.new("RGBA", (32, 32), (10, 200, 30, 0))
    if mode == "P":  # a palette image whose only colour is the transparent one
        image = Image.new("P", (32, 32), 0)
        image.putpalette([10, 200, 30] * 256)
        data = encode(image, transparency=0)
    else:
        data = encode(image, mode=mode)
    assert (decode_image(data) == 255).all()


def test_16_bit_greyscale_keeps_its_top_byte():
    image = Image.fromarray(np.full((32, 32), 0x8040, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    assert (decode_image(encode(image)) == 0x80).all()


def test_exif_orientation_is_applied():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, 16:] = 255  # right half white
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down: shown rotated by 180 degrees
    decoded = decode_image(encode(pixels, "JPEG", exif=exif, quality=95)).astype(int)
    assert decoded[:, :12].mean() > 200 and decoded[:, 20:].mean() < 50


# --- limits and bad input -----------------------------------------------------------------

def test_pixel_limit_is_checked_from_the_header_before_decoding():
    side = int(MAX_PIXELS ** 0.5)
    assert side * side == MAX_PIXELS
    # At the limit, the header passes and decoding then finds no pixel data ...
    assert_rejected(lambda: decode_image(png_header(side, side)), "corrupt")
    # ... one row more is refused from the 65-byte header alone.
    assert_rejected(lambda: decode_image(png_header(side, side + 1)), f"more than {MAX_PIXELS} pixels")
    # Above PIL's own bomb limit (179 M pixels) PIL refuses at open; same answer.
    assert_rejected(lambda: decode_image(png_header(100_000, 100_000)), f"more than {MAX_PIXELS} pixels")


def test_request_pixel_budget_is_checked_before_decoding(classifier):
    side = int(MAX_PIXELS ** 0.5)
    count = MAX_REQUEST_PIXELS // MAX_PIXELS + 1
    assert_rejected(lambda: classifier.predict(None, frame(*[png_header(side, side)] * count)), "in all")


def test_image_count_is_checked_before_any_image_is_read(classifier):
    assert_rejected(lambda: classifier.predict(None, frame(*[b"not an image"] * (MAX_IMAGES + 1))),
                    f"at most {MAX_IMAGES}")
    pixels = np.zeros((MAX_IMAGES + 1, 32, 32, 3), dtype=np.uint8)
    assert_rejected(lambda: classifier.predict(None, pixels), f"at most {MAX_IMAGES}")


@pytest.mark.parametrize("model_input,fragment", [
    (pd.DataFrame({"img": [encode(noise(32, 32))]}), "column"),
    (pd.DataFrame({"image": [encode(noise(32, 32))], "x": [1]}), "column"),
    (pd.DataFrame(index=[0]), "no column 'image'"),
    (frame(), "no images"),
    (frame(None), "got NoneType"),
    (frame(b""), "empty"),
    (frame("aGVsbG8="), "got str"),
    (frame(7), "got int"),
    (frame(b"GIF89a but not really"), "not a readable image"),
    (frame(encode(noise(32, 32))[:60]), "image 0"),
    (frame(encode(noise(32, 32)), b"\x89PNG\r\n\x1a\n"), "image 1"),
    (frame(np.zeros((32, 31, 3), dtype=np.uint8)), "shape"),
    (frame(np.full((32, 32, 3), 256)), "0-255"),
    (frame(np.full((32, 32, 3), 1.5)), "0-255"),
    (frame(np.full((32, 32, 3), b"1.5")), "0-255"),
    (np.zeros((2, 32, 32), dtype=np.uint8), "got ndarray"),
    ([encode(noise(32, 32))], "got list"),
])
def test_bad_input_is_a_one_line_client_error(classifier, model_input, fragment):
    assert_rejected(lambda: classifier.predict(None, model_input), fragment)


def test_the_scoring_server_cannot_rewrite_the_message():
    # mlflow's scoring server does `e.message = f"Failed to predict data '{data}'. \nError: ..."`
    error = InvalidRequest("image 0: empty\nimage")
    error.message = "Failed to predict data '<the request>'. \nError: image 0: empty"
    assert error.message == "image 0: empty image"
    assert "stack_trace" not in error.serialize_as_json()


# --- predictions --------------------------------------------------------------------------

def test_predictions_are_the_softmax_of_the_shared_forward_path(classifier, weights_dir):
    images = np.stack([noise(32, 32, seed) for seed in range(8)])
    out = classifier.predict(None, frame(*(encode(image) for image in images)))
    expected = reference_probabilities(weights_dir, images)

    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == len(images)
    probabilities = np.array(out["probabilities"].tolist())
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities, expected, atol=1e-6, rtol=0)
    assert out["class_id"].tolist() == expected.argmax(axis=1).tolist()
    assert out["label"].tolist() == [CLASSES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(out["confidence"], expected.max(axis=1), atol=1e-6, rtol=0)
    assert out["class_id"].dtype == np.int64 and out["confidence"].dtype == np.float64
    assert out["unknown"].dtype == bool and not out["unknown"].any()  # no calibration.json: never unknown


def test_a_calibrated_model_serves_softmax_over_t_and_flags_scores_below_the_threshold(weights_dir, tmp_path):
    images = np.stack([noise(32, 32, seed) for seed in range(8)])
    logits = reference_logits(weights_dir, images)
    scores = ood_scores(logits, 2.0, "energy")
    # Half the images above the threshold, half below.
    threshold = float(scores.median()) + 1e-6
    calibration = Calibration(temperature=2.0, score="energy", threshold=threshold, accept_share=0.95)
    (tmp_path / CALIBRATION_FILE).write_text(calibration.to_json())
    model = CifarClassifier()
    model.load_context(PythonModelContext(artifacts={WEIGHTS_ARTIFACT: str(weights_dir),
                                                     CALIBRATION_ARTIFACT: str(tmp_path / CALIBRATION_FILE)},
                                          model_config={}))
    out = model.predict(None, frame(*(encode(image) for image in images)))
    np.testing.assert_allclose(np.array(out["probabilities"].tolist()),
                               reference_probabilities(weights_dir, images, temperature=2.0), atol=1e-6, rtol=0)
    assert out["unknown"].tolist() == (scores < threshold).tolist()
    assert 0 < out["unknown"].sum() < len(images)
    # The label is still given for an unknown image, the same as the uncalibrated model's.
    assert out["class_id"].tolist() == logits.argmax(dim=1).tolist()


def test_pixel_arrays_predict_like_the_same_images_encoded(classifier):
    images = np.stack([noise(32, 32, seed) for seed in range(3)])
    from_png = classifier.predict(None, frame(*(encode(image) for image in images)))
    # A 4-d array in-process; over HTTP, `inputs` arrives as a column of numbers cast to bytes.
    for pixels in (images, frame(*images), frame(*images.astype(bytes))):
        pd.testing.assert_frame_equal(classifier.predict(None, pixels), from_png)


def test_torch_threads_are_set_only_in_a_scoring_server(weights_dir, monkeypatch):
    """One intra-op thread per server worker (see serving_threads); loaded anywhere else, the
    model leaves the process-wide thread count alone."""
    context = PythonModelContext(artifacts={WEIGHTS_ARTIFACT: str(weights_dir)}, model_config={})
    monkeypatch.delenv("CIFAR_SERVE_TORCH_THREADS", raising=False)
    monkeypatch.delenv(_SERVER_MODEL_PATH, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        CifarClassifier().load_context(context)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv(_SERVER_MODEL_PATH, str(weights_dir))
        CifarClassifier().load_context(context)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("CIFAR_SERVE_TORCH_THREADS", "3")
        CifarClassifier().load_context(context)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)

# --- fuzzing: every input ends in a prediction or a client error --------------------------

def _image_bytes(draw) -> bytes:
    fmt, mode = draw(st.sampled_from(SAVABLE))
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    return encode(noise(height, width, draw(st.integers(0, 2**16))), fmt, mode)


@st.composite
def valid_images(draw) -> bytes:
    return _image_bytes(draw)


@st.composite
def damaged_images(draw) -> bytes:
    data = bytearray(_image_bytes(draw))
    if draw(st.booleans()):  # truncated
        return bytes(data[:draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 4))):  # bytes flipped
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


def _assert_prediction_or_client_error(classifier, values: list) -> None:
    try:
        out = classifier.predict(None, frame(*values))
    except MlflowException as error:
        assert error.error_code == "INVALID_PARAMETER_VALUE", error.message
        assert error.get_http_status_code() == 400 and "\n" not in error.message
        return
    assert len(out) == len(values)
    probabilities = np.array(out["probabilities"].tolist())
    assert np.isfinite(probabilities).all() and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert out["class_id"].between(0, 9).all()


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# PIL warns about damaged metadata (corrupt EXIF) that it then reads past; not under test.
quiet_pil = pytest.mark.filterwarnings("ignore::UserWarning:PIL")


@quiet_pil
@FUZZ
@given(st.lists(valid_images(), min_size=1, max_size=3))
def test_fuzz_valid_images_always_predict(classifier, images):
    out = classifier.predict(None, frame(*images))
    assert len(out) == len(images)


@quiet_pil
@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=512), damaged_images(), valid_images(),
                          st.none(), st.text(max_size=8), st.integers()),
                min_size=0, max_size=3))
def test_fuzz_any_input_predicts_or_is_a_client_error(classifier, values):
    _assert_prediction_or_client_error(classifier, values)
