"""HTTP load from a separate client process: concurrent keep-alive clients posting prepared
request bodies to /invocations, every loop bounded in request count and in time.

`run_load(plan)` starts `python -m benchmarks._load` and hands it the plan on stdin; that process
imports only the standard library (no torch, no mlflow), so it is small and starts in a fraction
of a second, and its Python work (sending prepared bytes, reading the reply) never shares a GIL
with the code under test. Each client is a thread with its own `http.client.HTTPConnection`,
kept alive across requests as a real client library would; the threads spend their time blocked
on sockets, so one process drives many of them.

A plan is a plain dict:
    url           http://127.0.0.1:<port> (the client refuses anything but loopback)
    kinds         {name: {"images": n, "bodies": [JSON bytes, ...], "weight": w}}: each request
                  picks a kind at random in proportion to its weight, then the kind's next body
    clients       concurrent connections
    duration_s    time limit of the measured phase
    max_requests  request limit of the measured phase, over all clients
    warmup        requests per kind per client before the measured phase (not recorded)
    timeout_s     socket timeout of one request
    seed          seed of the kind choice

and the result is {"requests": [[kind, start_s, latency_s, status], ...], "errors": [first few
error descriptions], "wall_s": first start to last finish, "images": {kind: n}}, status 0 for a request that got no
HTTP reply, -1 for a 200 whose body did not hold one prediction per image.
"""

import http.client
import json
import pickle
import random
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEEP_ERRORS = 20  # error descriptions kept for the report


def run_load(plan: dict, extra_time_s: float = 60) -> dict:
    """Run plan in a child process and return its result; the child is killed if it overruns
    its own time limits by extra_time_s."""
    limit = plan["duration_s"] + plan["timeout_s"] + extra_time_s
    done = subprocess.run([sys.executable, "-m", "benchmarks._load"], input=pickle.dumps(plan),
                          capture_output=True, cwd=REPO, timeout=limit)
    if done.returncode != 0:
        raise RuntimeError(f"load client exited with {done.returncode}:\n{done.stderr.decode()[-3000:]}")
    return json.loads(done.stdout)


def _client(plan: dict, host: str, port: int, index: int, start: threading.Barrier,
            deadline: list[float], budget: list[int], lock: threading.Lock,
            records: list, errors: list) -> None:
    rng = random.Random(plan["seed"] * 1000 + index)
    kinds = list(plan["kinds"])
    weights = [plan["kinds"][k]["weight"] for k in kinds]
    next_body = {k: index for k in kinds}  # clients start at different bodies
    connection = http.client.HTTPConnection(host, port, timeout=plan["timeout_s"])
    headers = {"Content-Type": "application/json"}

    def post(kind: str) -> int:
        nonlocal connection
        spec = plan["kinds"][kind]
        body = spec["bodies"][next_body[kind] % len(spec["bodies"])]
        next_body[kind] += 1
        try:
            connection.request("POST", "/invocations", body=body, headers=headers)
            reply = connection.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()  # a fresh connection for the next request
            connection = http.client.HTTPConnection(host, port, timeout=plan["timeout_s"])
            with lock:
                if len(errors) < KEEP_ERRORS:
                    errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            return 0
        if reply.status != 200:
            with lock:
                if len(errors) < KEEP_ERRORS:
                    errors.append(f"{kind}: HTTP {reply.status}: {data[:300]!r}")
            return reply.status
        # One prediction per image; counting a key is enough and costs no JSON parse.
        if data.count(b'"class_id"') != spec["images"]:
            with lock:
                if len(errors) < KEEP_ERRORS:
                    errors.append(f"{kind}: 200 with a wrong number of predictions: {data[:300]!r}")
            return -1
        return 200

    try:
        for kind in kinds:
            for _ in range(plan["warmup"]):
                post(kind)
        try:
            start.wait(timeout=plan["timeout_s"] * max(1, plan["warmup"]) * len(kinds) + 30)
        except threading.BrokenBarrierError:  # another client failed: the errors say why
            return
        # A fresh connection for the measured phase: while this client waited for the others to
        # warm up, the server may have closed the idle one (uvicorn does after 5 s), and a
        # request on it would fail where a client library would quietly reconnect.
        connection.close()
        connection = http.client.HTTPConnection(host, port, timeout=plan["timeout_s"])
        mine = []
        while time.perf_counter() < deadline[0]:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            kind = rng.choices(kinds, weights)[0]
            began = time.perf_counter()
            status = post(kind)
            mine.append([kind, began, time.perf_counter() - began, status])
        with lock:
            records.extend(mine)
    finally:
        connection.close()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks, as numpy's default."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(result: dict) -> dict:
    """Per kind and over all: requests, errors (anything but a good 200), requests/s and
    images/s (answered ones) over the phase's wall time, and latency p50/p99/max in milliseconds."""
    wall = result["wall_s"] or float("nan")
    images = result.get("images", {})
    groups: dict[str, list] = {}
    for record in result["requests"]:
        groups.setdefault(record[0], []).append(record)
    groups["all"] = result["requests"]
    summary = {}
    for kind, records in groups.items():
        latencies = [r[2] for r in records if r[3] == 200]
        summary[kind] = {
            "requests": len(records),
            "errors": sum(r[3] != 200 for r in records),
            "requests_per_s": len(records) / wall,
            "images_per_s": sum(images[r[0]] for r in records if r[3] == 200) / wall,
            "p50_ms": percentile(latencies, 50) * 1e3,
            "p99_ms": percentile(latencies, 99) * 1e3,
            "max_ms": max(latencies, default=float("nan")) * 1e3,
        }
    return summary


def _main(plan: dict) -> dict:
    parsed = urllib.parse.urlparse(plan["url"])
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load {parsed.hostname}: loopback only")
    lock = threading.Lock()
    records: list = []
    errors: list = []
    budget = [plan["max_requests"]]
    deadline = [float("inf")]

    def begin() -> None:  # run by one thread when all have warmed up
        deadline[0] = time.perf_counter() + plan["duration_s"]

    start = threading.Barrier(plan["clients"], action=begin)
    threads = [threading.Thread(target=_client, daemon=True,
                                args=(plan, parsed.hostname, parsed.port, i, start, deadline, budget, lock,
                                      records, errors))
               for i in range(plan["clients"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records.sort(key=lambda r: r[1])
    wall = (max(r[1] + r[2] for r in records) - records[0][1]) if records else 0.0
    return {"requests": records, "errors": errors, "wall_s": wall,
            "images": {kind: spec["images"] for kind, spec in plan["kinds"].items()}}


if __name__ == "__main__":
    result = _main(pickle.loads(sys.stdin.buffer.read()))
    sys.stdout.write(json.dumps(result))
