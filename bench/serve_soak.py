"""A bounded soak of `kvretrieve serve`: many requests from concurrent clients, then the server's memory.

Starts a server (the default model unless --model), warms it with --warm requests sent the same way
(so threads, allocator arenas and caches exist), records its resident memory, then sends --requests requests from --clients threads: a mix of chat and text
completions, streamed and not, streams dropped after a few chunks, and malformed or oversized
requests. Afterwards: the status counts, latency p50/p99 of the answered requests, throughput, the
resident memory again (flat = no leak), and that the server still answers.

    python bench/serve_soak.py --requests 500 --clients 8
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, add_provenance_args, provenance, stamp, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["requests", "clients", "answered", "dropped_streams", "errors_4xx", "other", "seconds", "requests_per_s",
           "latency_p50_s", "latency_p99_s", "rss_before_mb", "rss_after_mb", "rss_growth_mb", "alive_after"]
QUESTIONS = ["Name three rivers.", "Who was Ada Lovelace?", "Write a haiku about tea.", "What is 2 + 2?",
             "Give me a word that rhymes with light.", "What colour is the sky?"]


def post(port: int, path: str, body: bytes, stream: bool = False, drop_after: int | None = None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            if stream:
                for i, _ in enumerate(r):
                    if drop_after is not None and i >= drop_after:
                        return -1  # the connection closes here, mid-stream
            else:
                r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def one(port: int, rng: random.Random) -> tuple[str, float]:
    kind = rng.random()
    question = rng.choice(QUESTIONS)
    t = time.perf_counter()
    if kind < 0.08:
        status = post(port, "/v1/chat/completions", b"{not json")
    elif kind < 0.12:
        status = post(port, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "tide " * 5000}]}).encode())
    elif kind < 0.22:
        status = post(port, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": question}], "max_tokens": 200, "stream": True}).encode(),
            stream=True, drop_after=3)
    elif kind < 0.6:
        status = post(port, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0.7,
             "stream": kind < 0.4}).encode(), stream=kind < 0.4)
    else:
        status = post(port, "/v1/completions", json.dumps(
            {"prompt": question, "max_tokens": 8, "temperature": 0}).encode())
    outcome = "dropped" if status == -1 else "answered" if status == 200 else "4xx" if 400 <= status < 500 else "other"
    return outcome, time.perf_counter() - t


def soak(port: int, n: int, clients: int, seed: int = 0) -> tuple[dict, list[float], float]:
    """n requests from `clients` threads -> (outcome counts, latencies of the answered, seconds)."""
    outcomes, latencies, lock, left = {}, [], threading.Lock(), [n]

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            outcome, seconds = one(port, rng)
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "answered":
                    latencies.append(seconds)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, latencies, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the default model)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--warm", type=int, default=100, help="requests sent the same way before memory is read")
    ap.add_argument("--out", default=os.environ.get("OUT", str(RESULTS)))
    add_provenance_args(ap)
    args = ap.parse_args()
    meta = provenance("cpu", args.allow_dirty)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kvretrieve", "serve", "--port", str(port), "--device", "cpu", "--max-context", "2048",
           "--max-waiting", str(2 * args.clients)] + (["--model", args.model] if args.model else [])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    raise SystemExit(f"error: the server did not start: {proc.stderr.read()[-2000:]}")
                time.sleep(0.3)
        server = psutil.Process(proc.pid)
        soak(port, args.warm, args.clients, seed=1000)  # the same concurrency first: threads, arenas, caches
        before = server.memory_info().rss
        outcomes, latencies, seconds = soak(port, args.requests, args.clients)
        time.sleep(1)
        after = server.memory_info().rss
        alive = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read())["status"]
    finally:
        proc.terminate()
        proc.wait(60)
    lat = sorted(latencies)
    row = {"requests": args.requests, "clients": args.clients, "answered": outcomes.get("answered", 0),
           "dropped_streams": outcomes.get("dropped", 0), "errors_4xx": outcomes.get("4xx", 0),
           "other": outcomes.get("other", 0), "seconds": round(seconds, 1),
           "requests_per_s": round(args.requests / seconds, 2), "latency_p50_s": round(statistics.median(lat), 3),
           "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
           "rss_before_mb": round(before / 1e6), "rss_after_mb": round(after / 1e6),
           "rss_growth_mb": round((after - before) / 1e6), "alive_after": alive == "ok",
           "server_exit": proc.returncode}
    print(row)
    write_results("serve_soak_cpu", meta, stamp([row], meta), COLUMNS,
                  "Latency: answered requests only, from the client's send to the end of the answer (streams: the "
                  "last event), with every client's requests queued behind the others'. 4xx: the malformed and "
                  "oversized requests the mix sends on purpose.", Path(args.out))


if __name__ == "__main__":
    main()
