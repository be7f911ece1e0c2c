"""Requests per second and latency of a served model under 1, 2 and 4 concurrent clients.

    .venv/bin/python benchmarks/serving_throughput.py [--requests 48] [--clients 1 2 4]
        [--workers 1 2] [--model URI ...] [--json FILE]

For each model the pipeline logged (reports/<model>/mlflow.json after `dvc repro`: the
champion of each model type, frame_cnn, cnn3d and cnn_gru), or each `--model` URI, a real
`mlflow models serve --env-manager local` on a free port of 127.0.0.1 with each `--workers`
count, as the serving image runs it. Each client posts one test clip per request (its bytes,
base64, as docs/predict.md's curl does), cycling through the test split, and sends the next once
answered. Per model x workers x clients: requests per second, p50 and p95 latency, failed
requests, and the resident memory of the server's processes after the run. The first row of
each model (1 worker, 1 client) is the reference the speed-ups are against. The CPU's model
and flags are printed first: compare figures from one run, not across machines. The rows and
the machine go to `--json` (default `benchmarks/results/serving_throughput.json`, from which
the docs' table is rendered).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu import cpu_description  # noqa: E402  (benchmarks/cpu.py, beside this script)
from results import Column, default_path, save_results  # noqa: E402

COLUMNS = [
    Column("model", "model"),
    Column("workers", "workers"),
    Column("clients", "clients"),
    Column("requests_per_s", "answered requests/s", ".1f"),
    Column("speed_up", "speed-up", ".2f"),
    Column("p50_ms", "p50 latency, ms", ".0f"),
    Column("p95_ms", "p95 latency, ms", ".0f"),
    Column("failed", "failed requests"),
    Column("server_rss_mb", "server memory, MB", ".0f"),
]
NOTES = (
    "answered requests/s: requests answered 200 per second over the timed requests; speed-up: "
    "against the model's first row (1 worker, 1 client); p50/p95: latency of one request, "
    "client side; server memory: resident memory of all the server's processes after the row."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, float]:
    """(HTTP status, seconds) of one request."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.perf_counter() - start


def serve(uri: str, workers: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` of `uri` with `workers` processes, once it answers /ping."""
    from pipeline.tracking import tracking_uri

    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",  # its uvicorn
        "MLFLOW_TRACKING_URI": tracking_uri(),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    cmd = [f"{venv_bin}/mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    with open(log, "w") as out:
        server = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop(server)
            sys.exit(f"{' '.join(cmd)} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def server_rss_mb(server: subprocess.Popen) -> float:
    import psutil

    process = psutil.Process(server.pid)
    processes = [process, *process.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes) / 2**20


def load(url: str, bodies: list[bytes], clients: int, requests: int) -> dict:
    """`requests` requests from `clients` clients, each waiting for its answer; one warm-up
    request per client first (not timed: each worker's first request per thread)."""
    invocations = f"{url}/invocations"
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda i: post(invocations, bodies[i % len(bodies)]), range(clients)))
        start = time.perf_counter()
        results = list(
            pool.map(lambda i: post(invocations, bodies[i % len(bodies)]), range(requests))
        )
        wall = time.perf_counter() - start
    seconds = sorted(s for _, s in results)
    answered = sum(status == 200 for status, _ in results)
    return {
        "clients": clients,
        "requests_per_s": answered / wall,
        "p50_ms": 1000 * statistics.median(seconds),
        "p95_ms": 1000 * seconds[max(0, round(0.95 * len(seconds)) - 1)],
        "failed": requests - answered,
    }


def main() -> None:
    from pipeline.tensorflow_start import prepare_tensorflow

    prepare_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="timed requests per level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clips", type=int, default=8, help="test clips the clients cycle")
    parser.add_argument("--model", action="append", help="MLflow model URI (repeatable)")
    parser.add_argument("--json", type=Path, default=default_path("serving_throughput"))
    args = parser.parse_args()
    args.json = args.json.resolve()  # before the benchmark changes directory
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)

    import pandas as pd

    from pipeline.config import load_params, resolve

    params = load_params()
    reports = resolve(params["paths"]["reports"])
    models = {
        m: json.loads((reports / m / "mlflow.json").read_text())["model_uri"]
        for m in params["models"]
        if (reports / m / "mlflow.json").is_file()
    }
    if args.model:
        models = {uri: uri for uri in args.model}
    if not models:
        sys.exit("no logged models: run `dvc repro` first or pass --model URI")
    test = pd.read_csv(resolve(params["paths"]["clean"]) / "splits.csv").query("split == 'test'")
    clips = [resolve(params["paths"]["raw"]) / p for p in test["path"].head(args.clips)]
    bodies = [
        json.dumps(
            {"dataframe_records": [{"video": base64.b64encode(c.read_bytes()).decode()}]}
        ).encode()
        for c in clips
    ]
    mean_kb = sum(map(len, bodies)) / len(bodies) / 1024
    width = max(12, *map(len, models))
    print(f"CPU: {cpu_description()}")
    print(
        f"{len(clips)} test clips ({mean_kb:.0f} kB per request), {args.requests} timed "
        f"requests per row, mlflow models serve --env-manager local on 127.0.0.1"
    )
    print(
        f"{'model':{width}} {'workers':>7} {'clients':>7} {'req/s':>7} {'speed-up':>8} "
        f"{'p50':>8} {'p95':>8} {'failed':>6} {'server RSS':>10}"
    )
    rows = []
    for name, uri in models.items():
        reference = None
        for workers in args.workers:
            log = Path(tempfile.mkdtemp(prefix="serving-benchmark-")) / "serve.log"
            server, url = serve(uri, workers, log)
            try:
                for clients in args.clients:
                    row = {
                        "model": name,
                        "workers": workers,
                        **load(url, bodies, clients, args.requests),
                    }
                    row["server_rss_mb"] = server_rss_mb(server)
                    reference = reference or row["requests_per_s"]
                    row["speed_up"] = row["requests_per_s"] / reference if reference else 0.0
                    rows.append(row)
                    print(
                        f"{name:{width}} {workers:7d} {clients:7d} {row['requests_per_s']:7.1f} "
                        f"{row['speed_up']:7.2f}x {row['p50_ms']:6.0f}ms {row['p95_ms']:6.0f}ms "
                        f"{row['failed']:6d} {row['server_rss_mb']:7.0f} MB",
                        flush=True,
                    )
            finally:
                stop(server)
                log.unlink(missing_ok=True)
                log.parent.rmdir()
    print(NOTES)
    save_results(
        args.json,
        "serving_throughput",
        f"`mlflow models serve --env-manager local` on 127.0.0.1, {len(clips)} test clips "
        f"({mean_kb:.0f} kB per request) cycled by each client, {args.requests} timed "
        "requests per row, each client sending its next request once answered",
        COLUMNS,
        rows,
        NOTES,
    )


if __name__ == "__main__":
    main()
