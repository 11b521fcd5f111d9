"""Endpoint benchmark: the served model over HTTP, by `mlflow models serve` and by the batching
server, against the raw model in-process, same images, same run.

    .venv/bin/python benchmarks/endpoint.py --duration 30 --clients 8 --repeats 3 \\
        --out benchmarks/results/endpoint-cpu-2core.json

1. Setup. A model (fast_net with random weights by default: throughput does not depend on what
   the weights learned; `--weights DIR` serves a trained weights folder) is logged with
   log_pyfunc_model into a SQLite store in a scratch folder and served on 127.0.0.1 by each of
   `--servers` in turn, one at a time (benchmarks/_server.py): `mlflow` is a real
   `mlflow models serve --env-manager local`, `batching` the batching server
   (cifar_models/server.py) on the downloaded model folder. The images are CIFAR-10 test
   images from the shared JPEG archive (or synthetic ones), sent as PNGs.
2. In-process, the raw model on the same images: the pyfunc's own `CifarClassifier.predict`
   on a DataFrame of PNG bytes (decode + preprocess + forward + result frame), and the bare
   forward `predict_logits` on uint8 arrays, at batch 1 and 64, at 1 torch thread, at the
   server's thread count and at one per core, and batch 64 from one Python thread per core
   (one torch thread each, as the server runs concurrent requests); the best is the baseline. Then the server's path piece
   by piece on one batch: parse the request (JSON, base64, DataFrame), decode, preprocess,
   forward, result frame, serialise the response, and MLflow's whole `invocations` function.
3. Over HTTP, from a separate client process (benchmarks/_load.py): one client alone
   (latency), then N concurrent keep-alive clients for D seconds (throughput and latency),
   at batch 1 and batch 64, and last the largest requests allowed (MAX_IMAGES) from every
   client, while the server's memory (resident, and proportional: a page shared by N
   processes counts 1/N in each, so that forked processes are not counted twice) and threads
   are sampled from /proc. Each server is started for its phases and stopped after them.
4. The ratios the issue sets as targets, a table, and JSON with the machine, date and command.

Steps 2-3 are repeated (`--repeats`); every figure is reported per repeat and as the median
over repeats, and each ratio is taken within one repeat before the median is taken. The raw
baseline runs while the server is idle and the HTTP phases while this process is idle, but
the client process shares the cores with the server, as a client on the same host would.
"""

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from unittest import mock
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on sys.path, the repository not
    sys.path.insert(0, str(REPO))

import base64  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
from mlflow.pyfunc.scoring_server import (  # noqa: E402
    _SERVER_MODEL_PATH, _parse_json_data, invocations, predictions_to_json,
)
from PIL import Image  # noqa: E402

import cifar_models  # noqa: E402,F401  (registers the architectures)
from benchmarks import _load, _server  # noqa: E402
from cifar_models.inference import ModelSpec, load_network, predict_logits, save_network  # noqa: E402
from cifar_models.preprocess import CIFAR10_MEAN, CIFAR10_STD, CLASSES, normalize, to_nchw  # noqa: E402
from cifar_models.pyfunc import MAX_IMAGES, images_from_input, predictions_frame, serving_threads  # noqa: E402
from cifar_models.registry import create_model  # noqa: E402

SHARED_ARCHIVE = Path("/work/shared/data/cifar10-jpeg.tar.gz")  # test/<class>/NNNN.jpg
BATCHES = (1, 64)
LARGEST = MAX_IMAGES  # images per request in the memory phase: the most a request may carry
POOL = 512  # distinct images; requests cycle through them
SAMPLE_EVERY_S = 0.25  # memory sampling period
CONTENT_TYPE = "application/json"


# --- setup ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fast_net", help="architecture, random weights (default fast_net)")
    parser.add_argument("--weights", type=Path, help="a trained weights folder (state_dict.pt + model_config.json)")
    parser.add_argument("--images", default=str(SHARED_ARCHIVE) if SHARED_ARCHIVE.exists() else "synthetic",
                        help="CIFAR-10 JPEG archive (test/<class>/*.jpg) or 'synthetic' (default: the shared archive)")
    parser.add_argument("--duration", type=float, default=30, help="seconds of each concurrent phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--single-requests", type=int, default=200,
                        help="requests of the one-client phase at batch 1 (batch 64: a fifth)")
    parser.add_argument("--single-seconds", type=float, default=20, help="time limit of each one-client phase")
    parser.add_argument("--largest-seconds", type=float, default=15,
                        help=f"seconds of a last phase of {LARGEST}-image requests from all clients, for the "
                             "server's peak memory (0: skip)")
    parser.add_argument("--raw-repeats", type=int, default=30, help="timed calls per in-process measurement")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the in-process and HTTP measurements")
    parser.add_argument("--servers", default="mlflow,batching",
                        help="comma-separated, measured in this order: mlflow, batching (default both)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (MLFLOW_MODELS_WORKERS)")
    parser.add_argument("--torch-threads", type=int,
                        help="torch threads per worker in the server (CIFAR_SERVE_TORCH_THREADS; "
                             "default: the served model's own choice)")
    parser.add_argument("--batching-options", default="",
                        help="options for the batching server, e.g. '--max-batch-size 16 --batch-timeout 0.001'")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser


def load_images(source: str, count: int = POOL) -> np.ndarray:
    """(count, 32, 32, 3) uint8: CIFAR-10 test images from the JPEG archive, classes taken in
    turn, or synthetic ones."""
    if source == "synthetic":
        from steps.data import synthetic
        return synthetic(n_train=0, n_test=count)[2]
    wanted = {f"test/{CLASSES[i % len(CLASSES)]}/{i // len(CLASSES):04d}.jpg": i for i in range(count)}
    images = np.zeros((count, 32, 32, 3), dtype=np.uint8)
    found = 0
    with tarfile.open(source, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                with Image.open(tar.extractfile(member)) as image:
                    images[wanted[member.name]] = np.asarray(image.convert("RGB"))
                found += 1
                if found == count:
                    break
    if found != count:
        raise SystemExit(f"{source}: found {found} of the {count} test images wanted")
    return images


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def request_body(pngs: list[bytes]) -> bytes:
    data = [[base64.b64encode(p).decode()] for p in pngs]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def weights_folder(args: argparse.Namespace, root: Path) -> Path:
    if args.weights:
        return args.weights
    torch.manual_seed(0)
    spec = ModelSpec(model=args.model, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    return save_network(create_model(args.model), spec, root / "weights")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gb": round(
            int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1),
        "gpu": None, "python": platform.python_version(), "torch": torch.__version__,
        "mlflow": mlflow.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[3].strip(),
    }


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "cifar_models", "benchmarks", "steps"))}


# --- in-process -----------------------------------------------------------------------------

def median_s(call: Callable[[], object], repeats: int, max_s: float = 20) -> float:
    """Median wall time of call() over `repeats` timed calls after one untimed one; stops early
    (with at least three) once max_s has passed."""
    call()
    times: list[float] = []
    end = time.perf_counter() + max_s
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() < end):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def parallel_images_per_s(predict: Callable[[pd.DataFrame], object], frames: list[pd.DataFrame],
                          streams: int, calls: int) -> float:
    """Images/s of `streams` Python threads each calling predict `calls` times on the frames in
    turn, with one torch thread each: the raw model using every core the way the server does."""
    torch.set_num_threads(1)  # read by each new thread at its first parallel region
    start = threading.Barrier(streams + 1)

    def work(index: int) -> None:
        start.wait()
        for k in range(calls):
            predict(frames[(index + k) % len(frames)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return streams * calls * sum(map(len, frames)) / len(frames) / (time.perf_counter() - began)


def forward_only(network: torch.nn.Module, images: np.ndarray, spec: ModelSpec) -> torch.Tensor:
    x = normalize(to_nchw(images), spec.mean, spec.std)
    with torch.inference_mode():
        return network(x)


def measure_in_process(pyfunc, pixels: np.ndarray, pngs: list[bytes], bodies: dict[int, bytes],
                       thread_counts: list[int], parallel_streams: list[int], server_threads: int,
                       repeats: int) -> dict:
    """Raw model (best over thread counts) and the server's path stage by stage, in ms."""
    classifier = pyfunc.unwrap_python_model()
    network, spec = classifier.network, classifier.spec
    schema = pyfunc.metadata.get_input_schema()
    raw: dict = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for batch in BATCHES:
            frame = pd.DataFrame({"image": pngs[:batch]})
            calls = repeats * (5 if batch == 1 else 1)
            raw[f"predict_b{batch}_t{threads}_ms"] = 1e3 * median_s(
                lambda: classifier.predict(None, frame), calls)
            raw[f"forward_b{batch}_t{threads}_ms"] = 1e3 * median_s(
                lambda: predict_logits(network, pixels[:batch], spec.mean, spec.std), calls)
    for batch in BATCHES:
        for what in ("predict", "forward"):
            best = min(thread_counts, key=lambda t: raw[f"{what}_b{batch}_t{t}_ms"])
            raw[f"{what}_b{batch}_ms"] = raw[f"{what}_b{batch}_t{best}_ms"]
            raw[f"{what}_b{batch}_threads"] = best
        raw[f"predict_b{batch}_images_per_s"] = batch / raw[f"predict_b{batch}_ms"] * 1e3
    # Batch 64 from concurrent streams: one per core, and one per HTTP client (on a shared host
    # more threads also win a larger share of the cores, as the server's thread pool does).
    # The throughput baseline is the best of these and the best single stream.
    frames = [pd.DataFrame({"image": pngs[i:i + 64]}) for i in range(0, len(pngs), 64)]
    for streams in parallel_streams:
        raw[f"predict_b64_x{streams}_images_per_s"] = statistics.median(
            parallel_images_per_s(lambda f: classifier.predict(None, f), frames, streams,
                                  max(2, 4 * repeats // streams)) for _ in range(3))
    raw["predict_b64_images_per_s"] = max(raw["predict_b64_images_per_s"],
                                          *(raw[f"predict_b64_x{n}_images_per_s"] for n in parallel_streams))
    # The single-image forward, the more demanding of predict_logits and the bare network call.
    raw["forward_b1_server_threads_ms"] = raw[f"forward_b1_t{server_threads}_ms"]
    # One stream at every core: what a lone client's 64-image requests could get.
    cores = len(os.sched_getaffinity(0))
    raw["predict_b64_full_threads_images_per_s"] = 64e3 / raw[f"predict_b64_t{cores}_ms"]
    torch.set_num_threads(raw["forward_b1_threads"])
    raw["forward_b1_network_ms"] = 1e3 * median_s(lambda: forward_only(network, pixels[:1], spec), 5 * repeats)
    raw["forward_b1_ms"] = min(raw["forward_b1_ms"], raw["forward_b1_network_ms"])

    torch.set_num_threads(server_threads)  # the stages as the server runs them
    stages: dict = {}
    for batch in BATCHES:
        body = bodies[batch]
        frame = _parse_json_data(body, pyfunc.metadata, schema).data
        images = images_from_input(frame)
        x = normalize(to_nchw(images), spec.mean, spec.std)
        with torch.inference_mode():
            logits = network(x).float()
        result = predictions_frame(logits, spec.classes)

        def forward() -> None:
            with torch.inference_mode():
                network(x)

        timed = {
            "parse_request": lambda: _parse_json_data(body, pyfunc.metadata, schema),
            "decode": lambda: images_from_input(frame),
            "preprocess": lambda: normalize(to_nchw(images), spec.mean, spec.std),
            "forward": forward,
            "result_frame": lambda: predictions_frame(logits, spec.classes),
            "serialise_response": lambda: predictions_to_json(result, io.StringIO()),
            "classifier_predict": lambda: classifier.predict(None, frame),
            "pyfunc_predict": lambda: pyfunc.predict(frame),
            "invocations": lambda: invocations(body, CONTENT_TYPE, pyfunc, schema),
        }
        ms = {name: 1e3 * median_s(call, repeats * (5 if batch == 1 else 1)) for name, call in timed.items()}
        # What MLflow's pyfunc wrapper adds around predict: schema enforcement, copies.
        ms["pyfunc_wrapper"] = ms["pyfunc_predict"] - ms["classifier_predict"]
        stages[f"b{batch}"] = ms
    return {"raw": raw, "stages_ms": stages}


# --- over HTTP ------------------------------------------------------------------------------

class MemorySampler:
    """Peak resident memory (and thread count) of the server's processes, sampled from /proc
    while it runs, and each process's own peak (VmHWM) at the end."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.peak_total_kb = 0
        self.peak_total_pss_kb = 0
        self.processes: dict[int, dict] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the sampling thread and report() both sample
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        total = total_pss = 0
        for depth, pid in enumerate(_server.process_tree(self.root_pid)):
            if info := _server.process_status(pid):
                total += info["rss_kb"]
                total_pss += _server.pss_kb(pid)
                seen = self.processes.setdefault(pid, {"command": info["command"], "peak_rss_kb": 0,
                                                       "peak_threads": 0})
                if info["rss_kb"] >= seen["peak_rss_kb"]:  # the split of the peak sample
                    seen.update(anon_kb=info["anon_kb"], file_kb=info["file_kb"])
                seen["peak_rss_kb"] = max(seen["peak_rss_kb"], info["rss_kb"])
                seen["peak_threads"] = max(seen["peak_threads"], info["threads"])
                seen["hwm_kb"] = info["hwm_kb"]
                seen["root"] = depth == 0
        self.peak_total_kb = max(self.peak_total_kb, total)
        self.peak_total_pss_kb = max(self.peak_total_pss_kb, total_pss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict:
        self._sample()
        mb = 1 / 1024
        processes = [{"pid": pid, "command": p["command"], "peak_rss_mb": p["peak_rss_kb"] * mb,
                      "vmhwm_mb": p["hwm_kb"] * mb, "anon_mb_at_peak": p["anon_kb"] * mb,
                      "file_mb_at_peak": p["file_kb"] * mb, "peak_threads": p["peak_threads"],
                      "role": "main" if p["root"] else "child"}
                     for pid, p in sorted(self.processes.items())]
        workers = [p for p in processes if p["role"] == "child"]
        return {"processes": processes, "peak_total_rss_mb": self.peak_total_kb * mb,
                "peak_total_pss_mb": self.peak_total_pss_kb * mb,
                "worker_peak_mb": max((p["vmhwm_mb"] for p in workers), default=float("nan"))}


def http_phase(url: str, bodies: list[bytes], images: int, clients: int, duration_s: float,
               max_requests: int, server_pids: list[int], warmup: int = 3) -> dict:
    """One load phase; with the cores the server used and the whole host was busy, on average
    over the phase (a shared host's other work shows in the difference)."""
    plan = {"url": url, "kinds": {f"b{images}": {"images": images, "bodies": bodies, "weight": 1}},
            "clients": clients, "duration_s": duration_s, "max_requests": max_requests,
            "warmup": warmup, "timeout_s": 60, "seed": 0}
    cpu, busy, began = _server.cpu_seconds(server_pids), _server.host_busy_seconds(), time.perf_counter()
    result = _load.run_load(plan)
    elapsed = time.perf_counter() - began
    summary = _load.summarise(result)["all"]
    summary["server_cores"] = (_server.cpu_seconds(server_pids) - cpu) / elapsed
    summary["host_busy_cores"] = (_server.host_busy_seconds() - busy) / elapsed
    summary["wall_s"] = result["wall_s"]
    summary["error_samples"] = result["errors"]
    return summary


def measure_http(url: str, bodies: dict[int, list[bytes]], args: argparse.Namespace,
                 worker_peak_mb: Callable[[], float], server_pids: list[int]) -> dict:
    out = {}
    for batch in BATCHES:
        count = args.single_requests if batch == 1 else max(10, args.single_requests // 5)
        out[f"single_b{batch}"] = http_phase(url, bodies[batch], batch, 1, args.single_seconds, count, server_pids)
    for batch in reversed(BATCHES):
        out[f"concurrent_b{batch}"] = http_phase(url, bodies[batch], batch, args.clients, args.duration,
                                                 int(args.duration * 2000), server_pids)
    out["worker_peak_mb_before_largest"] = worker_peak_mb()
    if args.largest_seconds > 0:
        out[f"concurrent_b{LARGEST}"] = http_phase(url, bodies[LARGEST], LARGEST, args.clients,
                                                   args.largest_seconds, int(args.largest_seconds * 100), server_pids,
                                                   warmup=1)
    return out


# --- report ---------------------------------------------------------------------------------

def derive(repeat: dict) -> dict:
    """The issue's targets, per server and between them, and the time breakdown, from one
    repeat's figures."""
    raw, stages = repeat["in_process"]["raw"], repeat["in_process"]["stages_ms"]
    single_limit = 2 * raw["forward_b1_ms"] + 5
    out: dict = {"single_b1_limit_ms": single_limit,
                 # The same with the forward timed at mlflow's server's own thread count.
                 "single_b1_limit_server_threads_ms": 2 * raw["forward_b1_server_threads_ms"] + 5}
    for kind, http in repeat["http"].items():
        d = {
            "throughput_ratio_b64": http["concurrent_b64"]["images_per_s"] / raw["predict_b64_images_per_s"],
            "single_client_ratio_b64": http["single_b64"]["images_per_s"] / raw["predict_b64_images_per_s"],
            "single_client_ratio_b64_full_threads": (http["single_b64"]["images_per_s"]
                                                     / raw["predict_b64_full_threads_images_per_s"]),
            "single_b1_p50_ms": http["single_b1"]["p50_ms"],
            "single_b1_within": http["single_b1"]["p50_ms"] <= single_limit,
            "single_b1_within_server_threads": (http["single_b1"]["p50_ms"]
                                                <= out["single_b1_limit_server_threads_ms"]),
            "peak_total_pss_mb": repeat["memory"][kind]["peak_total_pss_mb"],
        }
        for batch in BATCHES:
            d[f"http_overhead_b{batch}_ms"] = http[f"single_b{batch}"]["p50_ms"] - stages[f"b{batch}"]["classifier_predict"]
            d[f"transport_b{batch}_ms"] = http[f"single_b{batch}"]["p50_ms"] - stages[f"b{batch}"]["invocations"]
        out[kind] = d
    if {"mlflow", "batching"} <= set(repeat["http"]):
        out["batching_over_mlflow_concurrent_b1"] = (repeat["http"]["batching"]["concurrent_b1"]["images_per_s"]
                                                     / repeat["http"]["mlflow"]["concurrent_b1"]["images_per_s"])
    return out


def median_tree(values: list):
    """The median of each number across a list of like-shaped dicts (other values: the first)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: median_tree([v[k] for v in values]) for k in first}
    if isinstance(first, bool):
        return sum(values) * 2 > len(values)
    if isinstance(first, (int, float)):
        return statistics.median(values)
    return first



def print_report(result: dict) -> None:
    s = result["summary"]
    raw, stages, d = s["in_process"]["raw"], s["in_process"]["stages_ms"], s["derived"]
    n, clients = result["config"]["repeats"], result["config"]["clients"]
    print(f"\n{result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']}, "
          f"mlflow {result['machine']['mlflow']}; {result['config']['model']}; medians of {n} repeat(s); "
          f"load average {result['loadavg_start']} -> {result['loadavg_end']}")
    print(f"mlflow: {result['config']['workers']} worker(s), {result['config']['server_torch_threads']} torch "
          f"thread(s) each; batching: {result['config']['batching_options'] or 'defaults'}")
    print("\nraw, in-process          batch 1          batch 64")
    for what, label in (("predict", "CifarClassifier.predict"), ("forward", "predict_logits (uint8)")):
        print(f"  {label:24s}{raw[f'{what}_b1_ms']:7.2f} ms (t{raw[f'{what}_b1_threads']})"
              f"{raw[f'{what}_b64_ms']:9.1f} ms (t{raw[f'{what}_b64_threads']})  "
              f"= {64e3 / raw[f'{what}_b64_ms']:.0f} images/s")
    for streams in result["config"]["in_process_streams"]:
        print(f"  {streams} threads of CifarClassifier.predict at batch 64, 1 torch thread each: "
              f"{raw[f'predict_b64_x{streams}_images_per_s']:.0f} images/s")
    print(f"  throughput baseline (the best raw figure at batch 64): {raw['predict_b64_images_per_s']:.0f} images/s; "
          f"one stream at every core: {raw['predict_b64_full_threads_images_per_s']:.0f} images/s")
    print("\nwhere the time goes (ms, in-process, mlflow's server's thread count)")
    names = ("parse_request", "pyfunc_wrapper", "decode", "preprocess", "forward", "result_frame",
             "serialise_response", "invocations")
    for batch in BATCHES:
        print(f"  batch {batch}: " + ", ".join(f"{k} {stages[f'b{batch}'][k]:.2f}" for k in names))
    for kind in result["config"]["servers"]:
        http, mem, dk = s["http"][kind], result["memory"][kind], d[kind]
        print(f"\n{kind} over HTTP     req/s   images/s    p50 ms    p99 ms  requests  errors   server/host cores")
        for phase in ("single_b1", "single_b64", "concurrent_b1", "concurrent_b64", f"concurrent_b{LARGEST}"):
            if phase in http:
                h = http[phase]
                print(f"  {phase:14s} x{1 if phase.startswith('single') else clients:<3d} {h['requests_per_s']:8.1f} "
                      f"{h['images_per_s']:9.0f} {h['p50_ms']:9.1f} {h['p99_ms']:9.1f} {h['requests']:9.0f} "
                      f"{h['errors']:7.0f}   {h['server_cores']:.2f} / {h['host_busy_cores']:.2f}")
        print(f"  memory, the whole server over all repeats: peak {mem['peak_total_pss_mb']:.0f} MB proportional "
              f"(shared pages split among processes), {mem['peak_total_rss_mb']:.0f} MB resident summed; "
              f"largest process {mem['worker_peak_mb']:.0f} MB")
        print(f"  one client: HTTP p50 - classifier predict = {dk['http_overhead_b1_ms']:.2f} ms (batch 1), "
              f"{dk['http_overhead_b64_ms']:.2f} ms (batch 64)")
    print("\ntargets (each ratio taken within a repeat, then the median)")
    for kind in result["config"]["servers"]:
        dk = d[kind]
        within = sum(r["derived"][kind]["single_b1_within"] for r in result["repeats"])
        print(f"  {kind}: one client at batch 64 / raw at every core {dk['single_client_ratio_b64_full_threads']:.2f} "
              f"(>= 0.8); {clients} clients at batch 64 / best raw {dk['throughput_ratio_b64']:.2f} (>= 0.9); "
              f"single-image p50 {dk['single_b1_p50_ms']:.1f} ms vs 2 x forward + 5 = {d['single_b1_limit_ms']:.1f} ms "
              f"(within in {within} of {n}); peak memory {dk['peak_total_pss_mb']:.0f} MB (< 1536)")
    if "batching_over_mlflow_concurrent_b1" in d:
        print(f"  {clients} clients of one image: batching / mlflow images/s {d['batching_over_mlflow_concurrent_b1']:.2f} "
              f"(>= 3); p99 {s['http']['batching']['concurrent_b1']['p99_ms']:.0f} ms against "
              f"{s['http']['mlflow']['concurrent_b1']['p99_ms']:.0f} ms")


# --- main -----------------------------------------------------------------------------------

def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_server(kind: str, logged: _server.LoggedModel, root: Path, args: argparse.Namespace,
                 server_env: dict[str, str]) -> _server.Server:
    if kind == "mlflow":
        return _server.start(logged, root / kind, workers=args.workers, extra_env=server_env)
    model_dir = root / "model"
    if not (model_dir / "MLmodel").exists():
        model_dir = _server.download(logged, model_dir)
    return _server.start_batching(model_dir, root / kind, logged.tracking_uri, tuple(args.batching_options.split()))


def main(args: argparse.Namespace) -> dict:
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date":
              datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "git": git_state(), "loadavg_start": loadavg()}
    servers = [kind.strip() for kind in args.servers.split(",") if kind.strip()]
    if not servers or set(servers) - {"mlflow", "batching"}:
        raise SystemExit(f"--servers: mlflow and/or batching, not {args.servers!r}")
    pixels = load_images(args.images)
    pngs = [png(p) for p in pixels]
    bodies = {batch: [request_body(pngs[i:i + batch]) for i in range(0, len(pngs), batch)]
              for batch in (*BATCHES, LARGEST)}
    server_env = {"MLFLOW_MODELS_WORKERS": str(args.workers)}
    if args.torch_threads:
        server_env["CIFAR_SERVE_TORCH_THREADS"] = str(args.torch_threads)
    # The thread count the served model will choose in mlflow's server, where this variable is set.
    with mock.patch.dict(os.environ, {**server_env, _SERVER_MODEL_PATH: "-"}):
        server_threads = serving_threads()
    result["config"] = {
        "model": args.model if not args.weights else f"{load_network(args.weights)[1].model} ({args.weights})",
        "images": args.images, "mean_png_bytes": statistics.mean(map(len, pngs)),
        "request_bytes_b1": statistics.mean(map(len, bodies[1])), "request_bytes_b64": statistics.mean(map(len, bodies[64])),
        "clients": args.clients, "duration_s": args.duration, "repeats": args.repeats, "workers": args.workers,
        "servers": servers, "server_torch_threads": server_threads, "batching_options": args.batching_options,
        # This process's and both servers' (the batching server's streams have one thread each).
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "in_process_threads": sorted({1, server_threads, len(os.sched_getaffinity(0))}),
        "in_process_streams": sorted({len(os.sched_getaffinity(0)), args.clients}),
    }
    memory: dict[str, list[dict]] = {kind: [] for kind in servers}
    with tempfile.TemporaryDirectory(prefix="endpoint-bench-") as scratch:
        root = Path(scratch)
        logged = _server.log_model(root, weights_folder(args, root))
        mlflow.set_tracking_uri(logged.tracking_uri)
        pyfunc = mlflow.pyfunc.load_model(logged.model_uri)
        mlflow.set_tracking_uri(None)
        repeats = []
        for index in range(args.repeats):
            print(f"repeat {index + 1}/{args.repeats}: in-process ...", flush=True)
            in_process = measure_in_process(pyfunc, pixels, pngs, {b: bodies[b][0] for b in BATCHES},
                                            result["config"]["in_process_threads"],
                                            result["config"]["in_process_streams"], server_threads,
                                            args.raw_repeats)
            repeat = {"in_process": in_process, "http": {}, "memory": {}}
            for kind in servers:
                print(f"repeat {index + 1}/{args.repeats}: {kind} over HTTP ...", flush=True)
                (root / kind).mkdir(exist_ok=True)
                server = start_server(kind, logged, root, args, server_env)
                try:
                    with MemorySampler(server.process.pid) as sampler:
                        repeat["http"][kind] = measure_http(server.url, bodies, args,
                                                            lambda: sampler.report()["worker_peak_mb"],
                                                            _server.process_tree(server.process.pid))
                    repeat["http"][kind]["ping_after"] = _server.ping(server.url)
                finally:
                    _server.stop(server)
                repeat["memory"][kind] = sampler.report()
                memory[kind].append(repeat["memory"][kind])
            repeat["loadavg"] = loadavg()
            repeat["derived"] = derive(repeat)
            repeats.append(repeat)
    # Peaks over the whole run: the largest of the repeats'.
    result["memory"] = {kind: {key: max(r[key] for r in reports) for key in
                               ("peak_total_pss_mb", "peak_total_rss_mb", "worker_peak_mb")} | {
                                   "processes": reports[-1]["processes"]}
                        for kind, reports in memory.items()}
    result["repeats"] = repeats
    result["summary"] = median_tree(repeats)
    result["loadavg_end"] = loadavg()
    return result


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    arguments = build_parser().parse_args()
    outcome = main(arguments)
    print_report(outcome)
    if arguments.out:
        arguments.out.parent.mkdir(parents=True, exist_ok=True)
        arguments.out.write_text(json.dumps(outcome, indent=2) + "\n")
        print(f"\nwrote {arguments.out}")
