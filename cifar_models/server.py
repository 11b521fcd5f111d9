"""The batching server: the model behind LitServe, which stacks the images of requests that
arrive together into one forward pass that uses every core.

It ships with the model and runs on the model's own code, from a model folder:

    PYTHONPATH=<model>/code python -m cifar_models.server <model> --port 8000

(`cifar10-serve -m models:/cifar10-classifier@champion` does this for a registered model, and
a container made by `mlflow models generate-dockerfile` runs it on /opt/ml/model.) It answers
POST /invocations with the requests and replies of `mlflow models serve` (JSON bodies), and
GET /ping.

Each request is parsed and its images decoded and checked on its own (`decode_request`, with
MLflow's own parser and schema enforcement and the model's `images`), so a bad request gets its
own one-line 400 and never fails the requests batched with it. LitServe then hands the decoded
requests that arrived within `batch_timeout_s` of each other (at most `max_batch_size`) to one
`predict`, which classifies all their images at once: a lone request of several images runs at
once on every core, and concurrent ones share one forward instead of each paying its own. The
forward runs as parallel streams, one per core, each classifying an equal share of the images on
one torch thread (a single image runs on one): a stream never waits at a barrier for a thread
that the HTTP process (on the same cores) holds up, as a multi-threaded forward's operators do,
so the HTTP process slows the forward by what it takes and no more. One inference worker takes
the cores by default; with more, the cores are divided among them.
"""

import argparse
import json
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import litserve as ls
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
# What `mlflow models serve` runs on a JSON body before and after predict, so that both servers
# read a request and write a reply alike (private names: tests/test_serving.py holds them to it).
from mlflow.pyfunc import _validate_prediction_input
from mlflow.pyfunc.scoring_server import _parse_json_data, predictions_to_json
from starlette.responses import Response

API_PATH = "/invocations"  # as `mlflow models serve`
PING_PATH = "/ping"
JSON = "application/json"
MAX_MESSAGE = 500  # characters of an error message in a reply; MLflow's can quote the request
BATCH_HEADER = "X-Batch-Requests"  # in each reply: how many requests were batched with it (itself too)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    max_batch_size: int = 16  # requests per forward (each up to MAX_IMAGES images)
    batch_timeout_s: float = 0.001  # how long a forward waits for more requests to join it
    workers: int = 1  # inference processes, each with its own copy of the model
    threads: int = 0  # forward streams (one torch thread each) per worker; 0: the cores divided among the workers
    timeout_s: float = 60  # a request still queued after this long gets a 504

    def streams(self) -> int:
        return self.threads or max(1, len(os.sched_getaffinity(0)) // self.workers)


def error_response(status: int, message: str, error_code: str = "INVALID_PARAMETER_VALUE") -> Response:
    """MLflow's error body, its message on one line and at most MAX_MESSAGE characters."""
    line = " ".join(str(message).split())
    if len(line) > MAX_MESSAGE:
        line = line[:MAX_MESSAGE - 3] + "..."
    return Response(json.dumps({"error_code": error_code, "message": line}), status_code=status, media_type=JSON)


class ClassifierAPI(ls.LitAPI):
    """The model at model_path as a LitServe API; see the module docstring."""

    def __init__(self, model_path: str, config: ServerConfig) -> None:
        if config.max_batch_size < 2:
            raise ValueError("max_batch_size must be at least 2: the server exists to batch")
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout_s,
                         api_path=API_PATH)
        self.model_path = model_path
        self.streams = config.streams()

    def setup(self, device: str) -> None:
        self.model = mlflow.pyfunc.load_model(self.model_path)
        # After loading, as the model may set its own (serving_threads). Set before the streams'
        # threads start: each takes the count when it first runs an operator.
        torch.set_num_threads(1)
        self.pool = ThreadPoolExecutor(self.streams, thread_name_prefix="forward")
        self.classifier = self.model.unwrap_python_model()
        if not hasattr(self.classifier, "classify"):
            raise RuntimeError(f"{self.model_path}: this model predates the batching server; serve it with "
                               "`mlflow models serve` or register it again")
        self.schema = self.model.metadata.get_input_schema()
        self.params_schema = self.model.metadata.get_params_schema()

    # `request` is not annotated: LitServe reads the annotation as the type FastAPI should
    # build, and without one hands over the body as parsed JSON.
    def decode_request(self, request) -> np.ndarray | Response:
        """The request's images, or the reply that refuses it: never an exception, which would
        fail every request in the batch."""
        if not isinstance(request, dict):
            return error_response(400, "the body must be a JSON object with one of dataframe_split, "
                                       "dataframe_records, instances or inputs", "BAD_REQUEST")
        try:
            parsed = _parse_json_data(request, self.model.metadata, self.schema)
            data, _ = _validate_prediction_input(parsed.data, parsed.params, self.schema, self.params_schema)
            return self.classifier.images(data)
        except MlflowException as error:
            return error_response(error.get_http_status_code(), error.message,
                                  error.error_code if isinstance(error.error_code, str) else "BAD_REQUEST")
        except Exception:
            log.exception("unexpected error while reading a request")
            return error_response(500, "internal error while reading the request", "INTERNAL_ERROR")

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, inputs: list) -> list:
        """One classify over the images of every good request; per request, (its rows or its
        refusal, how many requests came in this batch)."""
        good = [x for x in inputs if isinstance(x, np.ndarray)]
        rows = self.classify(np.concatenate(good)) if good else None
        out, start = [], 0
        for x in inputs:
            if isinstance(x, np.ndarray):
                out.append((rows.iloc[start:start + len(x)].reset_index(drop=True), len(inputs)))
                start += len(x)
            else:
                out.append((x, len(inputs)))
        return out

    def classify(self, images: np.ndarray) -> pd.DataFrame:
        """The model's classify on one contiguous share of the images per stream."""
        shares = np.array_split(images, min(self.streams, len(images)))
        if len(shares) == 1:
            return self.classifier.classify(images)
        return pd.concat(list(self.pool.map(self.classifier.classify, shares)), ignore_index=True)

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output) -> Response:
        result, batched = output
        if isinstance(result, Response):
            response = result
        else:
            body = StringIO()
            predictions_to_json(result, body)
            response = Response(body.getvalue(), media_type=JSON)
        response.headers[BATCH_HEADER] = str(batched)
        return response


class JsonBodiesOnly:
    """ASGI middleware: a POST to API_PATH must be JSON, else a one-line 4xx before LitServe,
    whose handler would answer a body it cannot parse with a 500."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != API_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != JSON:
            return await error_response(415, f"send Content-Type: {JSON} (got {content_type or 'none'!r})",
                                        "BAD_REQUEST")(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            json.loads(body)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError both are
            return await error_response(400, f"the body is not valid JSON: {error}", "BAD_REQUEST")(
                scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def build_server(model_path: str, config: ServerConfig = ServerConfig()) -> ls.LitServer:
    return ls.LitServer(ClassifierAPI(model_path, config), accelerator="cpu", devices=1,
                        workers_per_device=config.workers, timeout=config.timeout_s,
                        healthcheck_path=PING_PATH, middlewares=[JsonBodiesOnly])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cifar_models.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the model folder (MLmodel, code/, artifacts/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    defaults = ServerConfig()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--batch-timeout", type=float, default=defaults.batch_timeout_s, help="seconds")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="forward streams per worker, one torch thread each (0: the cores divided among the workers)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds")
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # LitServe stops its processes on this, and not on SIGTERM


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    config = ServerConfig(max_batch_size=args.max_batch_size, batch_timeout_s=args.batch_timeout,
                          workers=args.workers, threads=args.threads, timeout_s=args.timeout)
    if not (args.model / "MLmodel").is_file():
        raise SystemExit(f"{args.model}: not a model folder (no MLmodel)")
    build_server(str(args.model.resolve()), config).run(host=args.host, port=args.port, num_api_servers=1,
                                                        generate_client_file=False)


if __name__ == "__main__":
    main()
