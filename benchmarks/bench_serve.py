"""Serving throughput and latency: requests/s and time to first token at 1, 4 and 16 clients.

Starts `luca serve RUN` twice in subprocesses — `--scheduler batch` (continuous batching) and its
peer `--scheduler queue` (the same kernels, one request at a time, first come first served) — and
drives each with closed-loop streaming clients over HTTP on 127.0.0.1: every client sends its next
request as soon as the previous one finishes (at least `--min-requests` per cell). Rounds alternate
between the two servers so that drifting machine load hits both; the median round is shown. The
requests are greedy completions of a fixed prompt set, so both schedulers do the same work token
for token. Prints one table.

    python benchmarks/bench_serve.py [RUN] [--requests-per-client 3] [--max-tokens 64] [--rounds 3]

RUN defaults to runs/nano-n1 when it holds a model, else a quick model is trained into
/tmp/serverun (`luca run --train.max_steps 60 --out /tmp/serverun`).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "def fibonacci(n):\n", "import os\n\n\ndef main():\n", "class Stack:\n    def __init__(self):\n",
    "The quick brown fox", "for i in range(10):\n", "def read_file(path):\n    with open(path) as f:\n",
    "# Sort a list of numbers\n", "try:\n    import json\nexcept ImportError:\n",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def start_server(run: str, scheduler: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "luca.cli", "serve", run, "--port", str(port), "--scheduler", scheduler,
           "--max-batch", str(max_batch)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            get_json(port, "/health")
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in 180 s")


def one_request(port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; returns ttft, total seconds and completion tokens."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        for raw in r:  # parse as little as possible: the clients share the server's two cores
            if ttft is None and b'"text": "' in raw and b'"text": ""' not in raw:
                ttft = time.perf_counter() - t0
            elif b'"usage"' in raw:
                tokens = json.loads(raw[6:])["usage"]["completion_tokens"]
    finally:
        c.close()
    total = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else total, "seconds": total, "tokens": tokens}


def drive(port: int, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(k: int) -> None:
        barrier.wait()
        for j in range(per_client):
            r = one_request(port, model, PROMPTS[(k * per_client + j) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    return {"requests": len(results), "wall": wall, "rps": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "ttft_p50": statistics.median(ttfts), "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
            "latency_p50": statistics.median(r["seconds"] for r in results)}


def ensure_run(run: str | None) -> str:
    if run:
        return run
    nano = Path("runs/nano-n1")
    if (nano / "model.safetensors").is_file():
        return str(nano)
    quick = Path("/tmp/serverun")
    if not (quick / "model.safetensors").is_file():
        print("training a quick model into /tmp/serverun (luca run --train.max_steps 60) ...", flush=True)
        subprocess.run([sys.executable, "-m", "luca.cli", "run", "--train.max_steps", "60", "--out", str(quick),
                        "--samples", "0"], check=True)
    return str(quick)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", nargs="?")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--min-requests", type=int, default=8, help="requests per cell at least")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    p.add_argument("--rounds", type=int, default=3, help="runs per cell, alternating schedulers (median shown)")
    a = p.parse_args()
    run = ensure_run(a.run)
    levels = [int(x) for x in a.clients.split(",")]
    scheds = ("batch", "queue")
    servers = {}
    try:
        for sched in scheds:  # both up at once (an idle server costs nothing), so runs can alternate
            servers[sched] = start_server(run, sched, a.max_batch, a.threads)
        model = get_json(servers["batch"][1], "/v1/models")["data"][0]["id"]
        for sched in scheds:
            one_request(servers[sched][1], model, PROMPTS[0], 8)  # warm-up
        runs: dict[tuple[str, int], list[dict]] = {}
        for c in levels:
            for rnd in range(a.rounds):  # alternate the schedulers so drifting machine load hits both
                for sched in (scheds if rnd % 2 == 0 else scheds[::-1]):
                    per = max(a.requests_per_client, -(-a.min_requests // c))
                    r = drive(servers[sched][1], model, c, per, a.max_tokens)
                    runs.setdefault((sched, c), []).append(r)
                    print(f"  {sched:5s} {c:2d} clients, round {rnd + 1}: {r['rps']:.2f} req/s, "
                          f"TTFT p50 {r['ttft_p50'] * 1000:.0f} ms", file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    # Per cell, the round with the median requests/s.
    rows = {k: sorted(v, key=lambda r: r["rps"])[len(v) // 2] for k, v in runs.items()}

    from rich.console import Console
    from rich.table import Table
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t = Table(title=f"luca serve on {run}: greedy completions of {a.max_tokens} tokens, "
                    f"≥{a.requests_per_client} per client and ≥{a.min_requests} per cell, median of {a.rounds} rounds (load average {load:.1f})")
    for col in ("clients", "scheduler", "requests/s", "tokens/s", "TTFT p50 ms", "TTFT p90 ms", "latency p50 s",
                "req/s vs queue", "TTFT p50 vs queue"):
        t.add_column(col, justify="right")
    for c in levels:
        q = rows[("queue", c)]
        for sched in ("batch", "queue"):
            r = rows[(sched, c)]
            t.add_row(str(c), sched, f"{r['rps']:.2f}", f"{r['tok_s']:.0f}", f"{r['ttft_p50'] * 1000:.0f}",
                      f"{r['ttft_p90'] * 1000:.0f}", f"{r['latency_p50']:.2f}", f"{r['rps'] / q['rps']:.2f}×",
                      f"{r['ttft_p50'] / q['ttft_p50']:.2f}×")
    Console(width=160).print(t)
    same = all(rows[("batch", c)]["tokens"] == rows[("queue", c)]["tokens"] for c in levels)
    print(f"same completion tokens under both schedulers: {same}")


if __name__ == "__main__":
    main()
