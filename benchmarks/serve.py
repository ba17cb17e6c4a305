"""`retrac serve` under load: latency and throughput at 1, 4 and 16 clients against a cold `retrac query`.

A `retrac serve` subprocess (loopback only, ``--cache-queries 0`` so that every request computes its
query gradients) serves the demo's TracIn and ReTrac indexes. Client threads send single held-out
digits (``.npy`` uploads, both methods, ``k = 10``), each client one request after another, a
bounded number of requests per setting. Measured:

* ``p50_ms_C`` / ``p99_ms_C`` / ``qps_C`` at C = 1, 4, 16 concurrent clients (latency of a whole
  request as the client sees it; queries per second = requests / wall time of the setting);
* ``cold_query_s``: wall time of ``retrac query --json`` for one digit in a fresh process (imports,
  model, checkpoints and index loading, gradients, search), the median of ``--cold-runs`` runs, and
  ``cold_query_over_warm = cold_query_s / p50_ms_1`` (target >= 10);
* ``search_share``: from the server's ``Server-Timing`` header at one client, the median share of
  index search in (query gradients + index search) per request;
* batching: ``mean_batch_images_16`` (images per gradient batch at 16 clients),
  ``batch_cost_ratio_16`` (median gradient time of a request's batch at 16 clients over that of a
  one-image batch at 1 client: how much longer a batch takes than one image alone) and
  ``batching_speedup_16 = mean_batch_images_16 / batch_cost_ratio_16`` (images per second of
  gradients, batched over alone). Target: ``p99_ms_16 <= 4 * p50_ms_1 * batch_cost_ratio_16``
  (``p99_bound_ms_16``): a request waits for at most about one batch in progress and its own.

Every JSON line printed is one object; the last holds all figures, the machine's load average
before and after, and the settings. Usage::

    python benchmarks/serve.py                                # trains a quick demo in a temporary folder
    python benchmarks/serve.py --demo retrac-demo --threads 1 # an existing `retrac demo` output
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ensure_demo(demo: Path | None, threads: int) -> Path:
    """An existing demo output, or a quick demo trained into a temporary folder."""
    if demo is not None and (demo / "index-retrac").is_dir():
        return demo
    out = demo or Path(tempfile.mkdtemp(prefix="retrac-serve-bench-")) / "demo"
    started = time.perf_counter()
    command = [sys.executable, "-m", "retrac", "demo", "--quick", "--out", str(out), "--no-progress"]
    subprocess.run([*command, "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL)
    emit(stage="demo", out=str(out), seconds=round(time.perf_counter() - started, 1))
    return out


def npy_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, image[None].astype(np.float32))
    return buffer.getvalue()


def server_timing(header: str) -> dict[str, float]:
    """``{"queue": ms, "gradients": ms, "search": ms, "batch_images": n}`` from a Server-Timing header."""
    out = {name: float(ms) for name, ms in re.findall(r"(\w+);dur=([0-9.]+)", header)}
    batch = re.search(r'batch;desc="(\d+) images', header)
    out["batch_images"] = int(batch.group(1)) if batch else 0
    return out


def run_clients(url: str, images: np.ndarray, clients: int, requests: int, k: int, offset: int) -> dict:
    """``requests`` attribution requests from ``clients`` threads, each sending one after another."""
    import httpx

    latencies, timings, failures = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                image = images[(offset + i) % len(images)]
                started = time.perf_counter()
                response = http.post(
                    f"{url}/attribute", files={"files": (f"q{i}.npy", npy_bytes(image))}, data={"k": k}
                )
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if response.status_code != 200:
                        failures.append(response.status_code)
                    else:
                        latencies.append(elapsed)
                        timings.append(server_timing(response.headers.get("server-timing", "")))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    search_share = [
        t["search"] / (t["search"] + t["gradients"]) for t in timings if t["search"] + t["gradients"] > 0
    ]
    return {
        "clients": clients,
        "requests": requests,
        "failed": len(failures),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "qps": round(len(latencies) / wall, 3),
        "wall_s": round(wall, 2),
        "gradients_ms_median": round(statistics.median(t["gradients"] for t in timings), 2),
        "search_ms_median": round(statistics.median(t["search"] for t in timings), 3),
        "queue_ms_median": round(statistics.median(t["queue"] for t in timings), 2),
        "mean_batch_images": round(statistics.mean(t["batch_images"] for t in timings), 2),
        "search_share_median": round(statistics.median(search_share), 5),
    }


def cold_query(
    demo: Path, image: np.ndarray, events: str, threads: int, k: int, folder: Path
) -> tuple[float, dict]:
    """Wall seconds of one `retrac query --json` in a fresh process, and its JSON."""
    path = folder / "cold-query.npy"
    np.save(path, image[None].astype(np.float32))
    command = [sys.executable, "-m", "retrac", "query", "--index", str(demo / "index-tracin")]
    command += ["--index", str(demo / "index-retrac"), "--images", str(path), "--k", str(k)]
    command += ["--query-events", events, "--threads", str(threads), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - started, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--demo", type=Path, default=None, help="a `retrac demo` output (default: train a quick one)"
    )
    parser.add_argument("--query-events", default="default", choices=["default", "fast", "paper"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the server and the cold query"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--requests", default="16,32,64", help="requests at 1, 4 and 16 clients (default: %(default)s)"
    )
    parser.add_argument("--cold-runs", type=int, default=3, help="cold `retrac query` runs (median)")
    args = parser.parse_args()
    counts = [int(x) for x in args.requests.split(",")]
    if len(counts) != 3 or min(counts) < 1 or max(counts) > 1000:
        parser.error("--requests takes three counts in [1, 1000], for 1, 4 and 16 clients")
    load_before = load_average()
    demo = ensure_demo(args.demo, args.threads)
    from retrac.data import load_dataset

    heldout = load_dataset(demo / "heldout.npz").images.numpy()

    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "retrac", "serve", "--index", str(demo / "index-tracin")]
    command += ["--index", str(demo / "index-retrac"), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--query-events", args.query_events, "--threads", str(args.threads)]
    command += ["--cache-queries", "0", "--history", "0", "--max-pending", "64", "--log-level", "warning"]
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"retrac serve exited: {server.stderr.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 600:
                raise SystemExit("retrac serve did not start within 600 s")
            time.sleep(0.25)
        emit(stage="serve started", seconds=round(time.perf_counter() - started, 2), url=url)
        run_clients(url, heldout, 1, 2, args.k, offset=len(heldout) - 2)  # warm-up, not counted
        settings = {}
        offset = 0
        for clients, requests in zip((1, 4, 16), counts, strict=True):
            settings[clients] = run_clients(url, heldout, clients, requests, args.k, offset)
            offset += requests
            emit(stage=f"{clients} clients", **settings[clients])
        health = httpx.get(f"{url}/health").json()
        # The same digit through the CLI in a fresh process, and through the warm server.
        with tempfile.TemporaryDirectory() as folder:
            cold = [
                cold_query(demo, heldout[0], args.query_events, args.threads, args.k, Path(folder))
                for _ in range(args.cold_runs)
            ]
        cold_s = statistics.median(seconds for seconds, _ in cold)
        warm = httpx.post(
            f"{url}/attribute", files={"files": ("q.npy", npy_bytes(heldout[0]))}, data={"k": args.k}
        ).json()
        cli = cold[0][1]
        same_ids = all(cli["results"][m]["ids"] == warm["results"][m]["ids"] for m in cli["results"])
        emit(stage="cold query", seconds=[round(s, 2) for s, _ in cold], same_ids_as_server=same_ids)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    one, sixteen = settings[1], settings[16]
    batch_cost_ratio = sixteen["gradients_ms_median"] / one["gradients_ms_median"]
    bound = 4 * one["p50_ms"] * batch_cost_ratio
    summary = {
        "p50_ms_1": one["p50_ms"],
        "p99_ms_1": one["p99_ms"],
        "qps_1": one["qps"],
        "p50_ms_4": settings[4]["p50_ms"],
        "p99_ms_4": settings[4]["p99_ms"],
        "qps_4": settings[4]["qps"],
        "p50_ms_16": sixteen["p50_ms"],
        "p99_ms_16": sixteen["p99_ms"],
        "qps_16": sixteen["qps"],
        "cold_query_s": round(cold_s, 3),
        "cold_query_over_warm": round(cold_s * 1000 / one["p50_ms"], 2),
        "search_share": one["search_share_median"],
        "gradients_ms_1": one["gradients_ms_median"],
        "search_ms_1": one["search_ms_median"],
        "mean_batch_images_16": sixteen["mean_batch_images"],
        "batch_cost_ratio_16": round(batch_cost_ratio, 3),
        "batching_speedup_16": round(sixteen["mean_batch_images"] / batch_cost_ratio, 3),
        "p99_bound_ms_16": round(bound, 2),
        "p99_16_within_bound": sixteen["p99_ms"] <= bound,
        "qps_16_over_qps_1": round(sixteen["qps"] / one["qps"], 3),
        "failed_requests": sum(s["failed"] for s in settings.values()),
        "same_ids_cli_and_server": same_ids,
        "batcher": health["batcher"],
        "requests": dict(zip(("1", "4", "16"), counts, strict=True)),
        "query_events": args.query_events,
        "threads": args.threads,
        "k": args.k,
        "demo": str(demo),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
