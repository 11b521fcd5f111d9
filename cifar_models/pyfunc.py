"""The served model: encoded images in, CIFAR-10 classes out, through the one forward path.

`mlflow models serve` hands `CifarClassifier.predict` a DataFrame with one column `image` of
image bytes (MLflow base64-decodes a column the signature declares `binary`, for both
`dataframe_split` and `dataframe_records`). Each image is decoded, made RGB and 32x32 by
`decode_image`, and the batch goes through `predict_logits`, the function `evaluate` uses, so
the endpoint and the evaluation give the same answer for the same pixels. The probabilities
are the calibrated ones and `unknown` flags images that are probably none of the classes, both
by the model's calibration.json when it has one (cifar_models/calibration.py).

Everything a client can get wrong is answered with `InvalidRequest`, an MlflowException with
error code INVALID_PARAMETER_VALUE, which the scoring server turns into a 400 whose JSON body
is the error code and a one-line message. Any other exception in `predict` would become a 400
that carries the server's Python stack trace, so none may escape for bad input.

This module ships with the model (code_paths), so it imports nothing from the training code.
"""

import io
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc.scoring_server import _SERVER_MODEL_PATH
from PIL import ExifTags, Image

from cifar_models.calibration import Calibration, calibrated_probabilities, unknown_flags
from cifar_models.inference import load_network, predict_logits
from cifar_models.preprocess import IMAGE_SIZE

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "class_id", "confidence", "probabilities", "unknown")
WEIGHTS_ARTIFACT = "weights"  # key of the weights folder in the model's artifacts
CALIBRATION_ARTIFACT = "calibration"  # key of calibration.json, in models evaluate logged

# Request limits, checked before the expensive work: the row count before any image is
# opened, and every image's declared size (from its header, read by Image.open without
# decoding a pixel) before any image is decoded.
MAX_IMAGES = 256  # images per request
# Pixels per image, 16.8 M = 4096 x 4096: a 12-megapixel phone photo (4000 x 3000) passes.
# The decoded RGB frame of such an image is 50 MB, and a few hundred bytes of PNG can
# declare one, so this is the decompression-bomb guard; PIL's own (89 M pixels warns,
# 179 M raises) sits above it and is caught too.
MAX_PIXELS = 4096 * 4096
# Pixels per request, the sum over its images: 4 images at MAX_PIXELS. Without it, 256
# tiny files each declaring 16 M uniform pixels would cost minutes of decoding.
MAX_REQUEST_PIXELS = 4 * MAX_PIXELS
# Images per forward pass: a larger request runs in chunks of this size, so what a request
# holds at a time is one chunk's activations: it cuts a worker's peak memory under load, with
# no loss of images/s (benchmarks/README.md, "Endpoint").
FORWARD_BATCH = 64

# Only these decoders see request bytes. PIL reads many more formats, some through external
# programs (EPS runs Ghostscript) or rarely exercised parsers: none of that on untrusted input.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")

# Every image is squashed (no crop, aspect ratio not kept) to 32x32 with bicubic
# interpolation. PIL widens the kernel by the scale factor when shrinking, so a large photo
# is averaged down rather than aliased. An image that is already 32x32 is not resampled, so a
# PNG of a CIFAR test image decodes to exactly the pixels evaluate scores.
RESAMPLE = Image.Resampling.BICUBIC
# A JPEG at least twice this size on each side is decoded by libjpeg at 1/2, 1/4 or 1/8
# scale (each pixel the mean of a 2x2 to 8x8 block, taken in the DCT domain), never below
# DRAFT_SIDE, and RESAMPLE does the rest: a large photo decodes several times faster, within
# two grey levels of the full decode (tests/test_pyfunc.py; benchmarks/README.md, "Endpoint").
DRAFT_SIDE = 4 * IMAGE_SIZE
# Transparent pixels are composited onto white: CIFAR has no alpha, and white is what a
# transparent logo or cut-out looks like on a page, whereas dropping alpha shows whatever
# colour the transparent pixels happen to store.
BACKGROUND = (255, 255, 255)

# EXIF orientation -> the transpose that makes the image upright (as browsers show photos).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class InvalidRequest(MlflowException):
    """A request the client must fix. The scoring server answers it with a 400 whose body is
    {"error_code": "INVALID_PARAMETER_VALUE", "message": ...}.

    The server rewrites the `message` of an MlflowException raised in predict to
    "Failed to predict data '<the whole input frame>'. \\nError: <message>", which echoes the
    request back over several lines. The message here is fixed at construction, so the reply
    says what was wrong in one line and nothing else.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()), error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def _open_checked(data: object, where: str) -> Image.Image:
    """The image with only its header read, after the checks that need no decoding."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequest(f"{where}: expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidRequest(f"{where}: empty image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{where}: image has more than {MAX_PIXELS} pixels") from None
    except Exception:
        raise InvalidRequest(f"{where}: not a readable image ({', '.join(FORMATS)})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidRequest(f"{where}: image is {width}x{height}, more than {MAX_PIXELS} pixels")
    if width < 1 or height < 1:
        raise InvalidRequest(f"{where}: image is {width}x{height}")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # unreadable EXIF: the pixels are still good, take them as they are
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (PNG opens as I;16 or I): keep the top 8 bits. PIL's own
        # conversion to L clips at 255 instead, which turns most such images white.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba)
    return image.convert("RGB")


def _decode(image: Image.Image, where: str) -> np.ndarray:
    try:
        image.draft(None, (DRAFT_SIDE, DRAFT_SIDE))  # JPEG only; a no-op for other formats
        rgb = _to_rgb(image)  # the first line that decodes pixels
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE)
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{where}: image has more than {MAX_PIXELS} pixels") from None
    except Exception:
        raise InvalidRequest(f"{where}: image data is corrupt, truncated or of an unsupported mode "
                             f"({image.format} {image.mode})") from None
    # Read after decoding: a PNG may keep its EXIF after the pixel data.
    if (orientation := _orientation(image)) in _EXIF_TRANSPOSE:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
    return np.asarray(rgb, dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes to a (32, 32, 3) uint8 RGB array, or InvalidRequest saying why not.

    Formats in FORMATS (GIF and other animations: the first frame), any PIL mode (palette,
    greyscale, 1-bit, CMYK, 16-bit, with or without alpha), any size up to MAX_PIXELS; see
    RESAMPLE and BACKGROUND for how size and transparency are handled. EXIF orientation is
    applied, as a photo viewer would.
    """
    return _decode(_open_checked(data, "image"), "image")


def _pixels(value: object, where: str) -> np.ndarray:
    """One already decoded image, (32, 32, 3) whole numbers 0-255, as uint8."""
    try:
        array = np.asarray(value)
    except Exception:  # ragged nested lists
        array = np.empty(0)
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if array.shape != shape:
        raise InvalidRequest(f"{where}: a pixel array must have shape {shape}, got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "S":
        # The `inputs` form meets the signature's binary column, which MLflow enforces by
        # casting every number to bytes (numpy's bytes dtype): 255 arrives as b"255".
        try:
            array = array.astype(np.int64)
        except ValueError:
            raise InvalidRequest(f"{where}: a pixel array must hold whole numbers 0-255") from None
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise InvalidRequest(f"{where}: a pixel array must hold whole numbers 0-255")
    return array.astype(np.uint8)


def decode_images(values: list[object]) -> np.ndarray:
    """Images to (N, 32, 32, 3) uint8, every limit checked before any pixel is decoded.

    Each value is encoded image bytes, or an image already decoded to a (32, 32, 3) array of
    0-255 (what the `inputs` form of a request carries).
    """
    if not values:
        raise InvalidRequest("no images in the request")
    if len(values) > MAX_IMAGES:
        raise InvalidRequest(f"{len(values)} images in one request, at most {MAX_IMAGES} allowed")
    opened = [_pixels(value, f"image {i}") if isinstance(value, (list, np.ndarray))
              else _open_checked(value, f"image {i}") for i, value in enumerate(values)]
    total = sum(image.size[0] * image.size[1] for image in opened if isinstance(image, Image.Image))
    if total > MAX_REQUEST_PIXELS:
        raise InvalidRequest(f"images hold {total} pixels in all, at most {MAX_REQUEST_PIXELS} "
                             "per request")
    return np.stack([_decode(image, f"image {i}") if isinstance(image, Image.Image) else image
                     for i, image in enumerate(opened)])


def images_from_input(model_input: object) -> np.ndarray:
    """What predict accepts, as (N, 32, 32, 3) uint8: a DataFrame whose only column is
    `image` (see decode_images for its values), or an (N, 32, 32, 3) array of pixels."""
    if isinstance(model_input, pd.DataFrame):
        columns = [str(c) for c in model_input.columns]
        if columns != [INPUT_COLUMN]:
            # The scoring server drops columns the signature does not name before predict
            # runs, so a request with a misnamed column arrives here with none.
            if not columns:
                raise InvalidRequest(f"no column '{INPUT_COLUMN}': send one column '{INPUT_COLUMN}' "
                                     "of base64-encoded images")
            raise InvalidRequest(f"expected one column '{INPUT_COLUMN}' of base64-encoded images, "
                                 f"got columns {columns}")
        if len(model_input) > MAX_IMAGES:  # before reading a single value
            raise InvalidRequest(f"{len(model_input)} images in one request, at most {MAX_IMAGES} "
                                 "allowed")
        return decode_images(model_input[INPUT_COLUMN].tolist())
    if isinstance(model_input, np.ndarray) and model_input.ndim == 4:
        return decode_images(list(model_input))
    raise InvalidRequest(f"expected a DataFrame with column '{INPUT_COLUMN}' or a pixel array "
                         f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {type(model_input).__name__}")


def serving_threads() -> int | None:
    """Torch intra-op threads for this process if it is a scoring server, else None (leave
    torch's own choice, one per core, alone).

    One per uvicorn worker. A worker of `mlflow models serve` runs concurrent requests in a
    thread pool (asyncio.to_thread), and decoding and the forward pass release the GIL, so
    under load the requests themselves keep the cores busy. More intra-op threads only
    oversubscribe the cores: every concurrent forward brings its own OpenMP team, whose
    barriers stall whenever one of its threads is descheduled, by another request or by
    another process on the host. One thread per worker served more images/s, and a lone
    request faster, than two on 2 shared cores (benchmarks/README.md, "Endpoint"). A server
    that takes one large batch at a time on an idle machine may set CIFAR_SERVE_TORCH_THREADS
    to its cores.

    The scoring server is recognised by the variable through which `mlflow models serve`
    hands its uvicorn workers the model path. Anywhere else (a notebook, the packaging step,
    which runs the input example through the model) the model leaves the thread count alone:
    it is process-wide, and one thread would slow every later computation there.
    """
    if override := os.environ.get("CIFAR_SERVE_TORCH_THREADS"):
        return max(1, int(override))
    return 1 if _SERVER_MODEL_PATH in os.environ else None


class CifarClassifier(mlflow.pyfunc.PythonModel):
    """The registered model: weights from the `weights` artifact, code from cifar_models."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        if (threads := serving_threads()) is not None:
            torch.set_num_threads(threads)
        self.network, self.spec = load_network(context.artifacts[WEIGHTS_ARTIFACT], device="cpu")
        path = context.artifacts.get(CALIBRATION_ARTIFACT)
        # train's own model has none: the raw softmax, and never unknown.
        self.calibration = Calibration.from_json(Path(path).read_text()) if path else Calibration()

    # MLflow reads the annotation of model_input: a DataFrame (one of the types it infers no
    # signature from) keeps it from wrapping predict in type-hint validation, and from warning
    # about it on every import. The logged signature is what the server validates against.
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        return self.classify(self.images(model_input))

    # predict in its two halves, for a server that batches requests (steps/serve.py): each
    # request is decoded and checked on its own, so a bad one fails alone, and the images of
    # many requests then go through one classify.
    @staticmethod
    def images(model_input: pd.DataFrame) -> np.ndarray:
        """(N, 32, 32, 3) uint8 from what predict accepts, or InvalidRequest saying why not."""
        return images_from_input(model_input)

    def classify(self, images: np.ndarray) -> pd.DataFrame:
        """One row per image, as predict returns."""
        logits = predict_logits(self.network, images, self.spec.mean, self.spec.std, batch_size=FORWARD_BATCH)
        return predictions_frame(logits, self.spec.classes, self.calibration)


def predictions_frame(logits: torch.Tensor, classes: tuple[str, ...],
                      calibration: Calibration = Calibration()) -> pd.DataFrame:
    """One row per image: label, class_id, confidence (top probability), the probabilities in
    class order (softmax of logits / temperature, in float32 as evaluate computes them) and
    unknown. The label and probabilities are given for an unknown image too: the flag adds."""
    probabilities = calibrated_probabilities(logits, calibration.temperature)
    confidence, class_id = probabilities.max(dim=1)
    return pd.DataFrame({
        "label": [classes[i] for i in class_id.tolist()],
        "class_id": class_id.numpy().astype(np.int64),
        "confidence": confidence.numpy().astype(np.float64),
        "probabilities": probabilities.tolist(),
        "unknown": unknown_flags(logits, calibration).numpy().astype(bool),
    })
