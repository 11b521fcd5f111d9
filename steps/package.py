"""Packaging a trained network as the served MLflow model.

The model's artifacts are the weights folder `train` wrote (a `state_dict` and its spec), and
in the model evaluate logs also the calibration it fitted (cifar_models/calibration.py); its code is the `cifar_models` package alone, so it loads and serves from any directory on a
machine without this repository; the training code in `steps` never ships.

The PythonModel is logged as code (MLflow's "models from code"), not as a pickle: loading the
model imports `cifar_models.pyfunc` and reads the weights with `torch.load(weights_only=True)`,
so nothing in a registered model is ever unpickled.
"""

import importlib.metadata
import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array
from PIL import Image

import cifar_models.pyfunc
from cifar_models.pyfunc import CALIBRATION_ARTIFACT, INPUT_COLUMN, WEIGHTS_ARTIFACT
from steps.artifacts import PYFUNC_MODEL

# The package directory, found from a module inside it: an editable install made before the
# package had an __init__.py imports it as a namespace package, whose __file__ is None.
CIFAR_MODELS_DIR = Path(cifar_models.pyfunc.__file__).parent

# The model file MLflow runs when it loads the model, after putting code_paths on sys.path.
MODEL_CODE = '''"""The CIFAR-10 classifier; the code is cifar_models/pyfunc.py among this model's code."""
import mlflow

from cifar_models.pyfunc import CifarClassifier

mlflow.models.set_model(CifarClassifier())
'''
MODEL_CODE_FILE = "cifar_classifier.py"

# Distributions the served model imports, pinned to the versions installed here.
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "pandas", "pillow")
# The batching server's engine (cifar_models/server.py), pinned too where it is installed (the
# `serve` extra), so that an environment or image made from the model's requirements can run it.
OPTIONAL_SERVING_DISTRIBUTIONS = ("litserve",)

SIGNATURE = ModelSignature(
    # `binary` makes the scoring server base64-decode the column of a JSON request. The
    # column is declared optional, though every request needs it, so that a request without
    # it reaches predict and gets a one-line 400. When MLflow enforces a required column
    # itself, its 400 message runs over several lines and quotes the request back.
    inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN, required=False)]),
    outputs=Schema([
        ColSpec(DataType.string, "label"),
        ColSpec(DataType.long, "class_id"),
        ColSpec(DataType.double, "confidence"),
        ColSpec(Array(DataType.double), "probabilities"),  # one per class, in class order
        ColSpec(DataType.boolean, "unknown"),  # probably none of the classes
    ]),
)


def pinned_requirements() -> list[str]:
    """`name==version` for SERVING_DISTRIBUTIONS and the installed OPTIONAL_SERVING_DISTRIBUTIONS,
    without local version labels (`2.12.1+cu128` is not on PyPI; the plain version resolves to the
    same release)."""
    def installed(name: str) -> bool:
        try:
            return bool(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            return False

    names = [*SERVING_DISTRIBUTIONS, *filter(installed, OPTIONAL_SERVING_DISTRIBUTIONS)]
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def example_png(seed: int = 0) -> bytes:
    """A deterministic 32x32 RGB PNG of noise: the logged input example."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def log_pyfunc_model(weights_dir: Path, name: str = PYFUNC_MODEL,
                     registered_model_name: str | None = None, calibration_file: Path | None = None) -> ModelInfo:
    """Log the served model in the active run (registering it when a name is given); with a
    calibration_file (calibration.json), the model serves calibrated probabilities and `unknown`.

    MLflow runs the input example through the model while logging, so a model that cannot
    load or predict fails here rather than when it is served.
    """
    with tempfile.TemporaryDirectory() as scratch:
        model_code = Path(scratch) / MODEL_CODE_FILE
        model_code.write_text(MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(model_code),
            artifacts={WEIGHTS_ARTIFACT: str(weights_dir),
                       **({CALIBRATION_ARTIFACT: str(calibration_file)} if calibration_file else {})},
            code_paths=[str(CIFAR_MODELS_DIR)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({INPUT_COLUMN: [example_png()]}),
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_model_name,
        )
