"""Serving over HTTP against serving in process: bench_serve.py's KV-bound workload sent to serve.py (§6.1).

    python bench/bench_http.py [--requests 32] [--scale 0.03125] [--clients 32] [--pool 4] [--shape 512x4] [--rounds 2]

The bench model of bench_serve.py (a random fp32 Qwen3, byte-level vocabulary) is saved as a
checkpoint in a temporary directory and served by serve.py, started here on a free 127.0.0.1
port with the engine options serving_cases.serve uses (every request may run at once, page size
16, a KV pool of --pool x the longest request). serving_cases.workload's requests, each a prompt
and an OpenMementos-shaped response teacher-forced through the `memento_replay` extension, go
out as streaming completions from --clients concurrent clients (asyncio + httpx, loopback only,
every request and the whole run under a time limit). For each mode (`memento_mode` memento and
full), in rounds that alternate which mode goes first: response tokens per second (all tokens
/ wall time from the first request sent to the last stream ended), and time to first token
(request sent to its first token's chunk) and inter-token latency (between token chunks),
median and p90, measured by the clients. Beside them, in the same run, the same workload
through an engine.Engine in this process (serving_cases.serve; its TTFT counts from Engine.add),
and the ratio in-process / HTTP tok/s: what the server costs (HTTP, JSON, server-sent events,
the thread hand-offs; and on a small CPU the clients themselves, which share its cores).
Writes bench/results/http_cpu.txt.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_cases import build_model, quantile, serve, workload  # noqa: E402
from engine import Mode  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The machine in words: CPU model and cores, GPU or none, torch build."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
    return f"{os.cpu_count()}-core CPU ({cpu}), {gpu}, torch {torch.__version__.split('+')[0]} {build}"


def start_server(ckpt: Path, pool: int, n: int, page: int, threads: int, log: Path, timeout: float = 120.0):
    """serve.py on a free loopback port with serving_cases.serve's engine options and `threads`
    torch threads; (Popen, url). Raises RuntimeError if it is not healthy within `timeout` s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "serve.py"), "--checkpoint", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", "--dtype", "float32", "--kv-cache-tokens", str(pool), "--page-size", str(page),
           "--max-num-seqs", str(n), "--max-num-batched-tokens", str(max(2048, n)), "--uvicorn-log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's thread count, as in this process
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"serve.py did not become healthy: {log.read_text()[-1000:]}")


def stop_server(proc) -> None:
    """SIGTERM to the server's PID, SIGKILL if it has not ended 10 s later."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


async def _one(http: httpx.AsyncClient, tok, prompt: list[int], response: list[int], mode: str) -> dict:
    """One streaming request; client-side times (seconds) and the tokens it reported. Raises
    RuntimeError for an HTTP error or a trace not returned whole."""
    body = {"prompt": prompt, "memento_replay": response, "memento_mode": mode, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, tokens = [], None
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if any(c.get("text") for c in event["choices"]):
                arrivals.append(time.perf_counter())
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens != len(response):
        raise RuntimeError(f"a request returned {tokens} tokens of its {len(response)}-token trace")
    return {"ttft": arrivals[0] - t0, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens}


async def _http_run(url: str, tok, reqs, mode: str, clients: int, limit: float) -> dict:
    """The workload from `clients` concurrent clients, each taking the next request when done."""
    todo = list(reqs)
    results = []

    async def client(http):
        while todo:
            prompt, response = todo.pop(0)
            results.append(await _one(http, tok, prompt, response, mode))

    async with httpx.AsyncClient(base_url=url, timeout=limit, limits=httpx.Limits(max_connections=clients)) as http:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(clients))), limit)
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"tok_per_s": tokens / wall, "tokens": tokens, "ttft": [r["ttft"] for r in results],
            "itl": [x for r in results for x in r["itl"]]}


def main(argv=None):
    """The command line: run both paths in rounds, print the table, write --out (paper §6.1)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--scale", type=float, default=1 / 32, help="OpenMementos lengths are multiplied by this")
    ap.add_argument("--clients", type=int, default=None, help="concurrent HTTP clients (default: --requests)")
    ap.add_argument("--pool", type=float, default=4.0, help="KV pool as a multiple of the longest request")
    ap.add_argument("--shape", default="512x4", help="model shape, hidden x layers (64-wide heads, 4 q per kv head)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per mode, alternating which mode runs first")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the server and of the in-process engine (the clients need a core too)")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds any one HTTP run may take")
    ap.add_argument("--quick", action="store_true", help="a tiny run to check the script: nothing is written")
    ap.add_argument("--out", default=str(RESULTS / "http_cpu.txt"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.scale, args.rounds, args.shape = 6, 1 / 64, 1, "64x1"
    clients = args.clients or args.requests
    torch.set_num_threads(args.threads)
    tok = Tokenizer.byte_level()
    reqs = workload(tok, args.requests, args.scale)
    longest = max(len(p) + len(r) for p, r in reqs)
    pool = int(args.pool * longest) // args.page_size * args.page_size
    hidden, layers = map(int, args.shape.split("x"))
    heads = max(1, hidden // 64)
    model = build_model(hidden, layers, heads, max(1, heads // 4))
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    say(f"# python bench/bench_http.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    say(f"# {time.strftime('%Y-%m-%d')}, {machine()}, torch threads: {args.threads} in the server, "
        f"{torch.get_num_threads()} in process")
    say(f"workload (serving_cases.workload): {args.requests} requests, OpenMementos shape x {args.scale:g}, "
        f"{sum(len(r) for _, r in reqs):,} response tokens teacher-forced (memento_replay), longest request {longest} "
        f"tokens; model: random Qwen3 {layers} layers x hidden {hidden}, {heads} q / {max(1, heads // 4)} kv heads, fp32; "
        f"KV pool {pool:,} tokens ({args.pool:g}x the longest), page size {args.page_size}; {clients} concurrent "
        f"streaming HTTP clients on 127.0.0.1")
    runs = {(m, path): [] for m in ("memento", "full") for path in ("in-process", "HTTP")}
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "bench-model"
        model.save_pretrained(ckpt)
        tok.save(ckpt)
        proc, url = start_server(ckpt, pool, args.requests, args.page_size, args.threads, Path(d) / "server.log")
        try:
            for r in range(args.rounds):
                for mode in ("memento", "full") if r % 2 == 0 else ("full", "memento"):
                    x = serve(model, tok, reqs, mode=Mode(mode), pool_tokens=pool, page_size=args.page_size)
                    runs[mode, "in-process"].append(x)
                    h = asyncio.run(_http_run(url, tok, reqs, mode, clients, args.time_limit))
                    if h["tokens"] != x["tokens"]:
                        raise RuntimeError(f"{mode}: HTTP returned {h['tokens']} tokens, in-process {x['tokens']}")
                    runs[mode, "HTTP"].append(h)
                    say(f"round {r + 1} {mode:8} in-process {x['tok_per_s']:7.1f} tok/s ({x['preemptions']} preemptions),"
                        f" HTTP {h['tok_per_s']:7.1f} tok/s")
        finally:
            stop_server(proc)
    say()
    say(f"{'mode':8} {'path':10} {'tok/s (median of rounds)':>24} {'TTFT p50/p90 s':>15} {'ITL p50/p90 ms':>15}")
    for (mode, path), rs in runs.items():
        ttft, itl = [t for x in rs for t in x["ttft"]], [t for x in rs for t in x["itl"]]
        say(f"{mode:8} {path:10} {statistics.median(x['tok_per_s'] for x in rs):>24.1f} "
            f"{quantile(ttft, .5):>7.2f}/{quantile(ttft, .9):<7.2f} {1e3 * quantile(itl, .5):>7.1f}/{1e3 * quantile(itl, .9):<7.1f}")
    say()
    med = {k: statistics.median(x["tok_per_s"] for x in rs) for k, rs in runs.items()}
    for mode in ("memento", "full"):
        say(f"server overhead, {mode}: in-process / HTTP tok/s = {med[mode, 'in-process'] / med[mode, 'HTTP']:.2f}x")
    for path in ("in-process", "HTTP"):
        say(f"memento / full tok/s, {path}: {med['memento', path] / med['full', path]:.2f}x")
    say(f"wall {time.perf_counter() - t_start:.0f} s; every request returned its whole trace in both paths")
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
