"""Throughput and latency of `densedino-serve` vs the raw batched model (prints figures).

Usage: python benchmarks/bench_serve.py [--arch vit_tiny] [--depth 12] [--size 112]
       [--max-batch 16] [--max-delay-ms 5] [--concurrency 1 8 32] [--duration 8] [--threads 1]

The server runs as a subprocess (the real CLI, a checkpoint saved for the run) and clients are
asyncio keep-alive connections posting one JPEG each (multipart, output=cls) in a closed loop.
The raw figure is ``forward_features`` on preprocessed batches of ``--max-batch`` images in
this process, timed between the slices of each load level (the mean is reported); each level
runs on both servers in ``--rounds`` interleaved slices, so that background load on a shared
machine hits the compared figures alike. Targets (issue 18, continuous batching): at
concurrency 1 the batching server >= 0.95 x the --max-batch 1 server (a lone request must not
wait for a batch); at the highest concurrency the server >= 0.90 x raw, and micro-batching
>= 1.3 x --max-batch 1.
``--json PATH`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from densedino.models.vit import build_backbone
from densedino.weights import save_backbone


@dataclass
class LoadResult:
    concurrency: int
    completed: int
    errors: int
    seconds: float
    latencies: list[float]
    mean_batch: float
    raw: float = float("nan")  # raw batched img/s measured just before and after this level

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def jpeg(size: int) -> bytes:
    """A smooth random colour image as JPEG (decodes like a photo, not like noise)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def features_request(host: str, port: int, image: bytes, size: int) -> bytes:
    """A complete keep-alive HTTP/1.1 multipart POST /v1/features, built once."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (("output", "cls"), ("size", str(size)))
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST /v1/features HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def client(
    host: str, port: int, request: bytes, stop_at: float, latencies: list[float]
) -> int:
    """Post ``request`` in a closed loop on one connection until ``stop_at``; errors count."""
    reader, writer = await asyncio.open_connection(host, port)
    errors = 0
    try:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1
    finally:
        writer.close()
    return errors


def batch_stats(base: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()

    def value(name: str) -> float:
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    return value("densedino_batch_size_sum"), value("densedino_batch_size_count")


def run_load(
    host: str, port: int, request: bytes, concurrency: int, duration: float, warmup: bool = True
) -> LoadResult:
    base = f"http://{host}:{port}"
    if warmup:
        warm: list[float] = []
        asyncio.run(_clients(host, port, request, concurrency, min(2.0, duration / 4), warm))
    before = batch_stats(base)
    latencies: list[float] = []
    start = time.perf_counter()
    errors = asyncio.run(_clients(host, port, request, concurrency, duration, latencies))
    seconds = time.perf_counter() - start
    after = batch_stats(base)
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else float("nan")
    return LoadResult(concurrency, len(latencies), errors, seconds, latencies, mean_batch)


def merge(parts: list[LoadResult]) -> LoadResult:
    """One result from the rounds of a level (throughput over their summed time)."""
    batches = [p.completed / p.mean_batch for p in parts if p.mean_batch == p.mean_batch]
    images = sum(p.completed for p in parts if p.mean_batch == p.mean_batch)
    return LoadResult(
        parts[0].concurrency,
        sum(p.completed for p in parts),
        sum(p.errors for p in parts),
        sum(p.seconds for p in parts),
        [x for p in parts for x in p.latencies],
        images / sum(batches) if batches else float("nan"),
    )


async def _clients(
    host: str, port: int, request: bytes, concurrency: int, duration: float, out: list[float]
) -> int:
    stop_at = time.perf_counter() + duration
    tasks = [client(host, port, request, stop_at, out) for _ in range(concurrency)]
    return sum(await asyncio.gather(*tasks))


def raw_throughput(model: torch.nn.Module, batch: int, size: int, duration: float) -> float:
    """Images per second of forward_features on preprocessed [batch, 3, size, size] inputs."""
    images = torch.randn(batch, 3, size, size)
    done = 0
    with torch.inference_mode():
        model.forward_features(images)
        start = time.perf_counter()
        while time.perf_counter() - start < duration:
            model.forward_features(images)
            done += batch
        return done / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    checkpoint: Path, port: int, max_batch: int, max_delay_ms: float
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "densedino.serve.cli", "--checkpoint", str(checkpoint),
        "--port", str(port), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
        "--max-queue", "256", "--threads", str(torch.get_num_threads()), "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DENSEDINO_API_KEY"}
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError("the server never became ready") from None
            time.sleep(0.2)


def load_both(
    checkpoint: Path, model: torch.nn.Module, image: bytes, args: argparse.Namespace
) -> tuple[list[LoadResult], list[LoadResult]]:
    """Each load level on the batching server and on a --max-batch 1 server, interleaved in
    ``--rounds`` short slices (order alternating) with timings of the raw model between them,
    so that background load on a shared machine hits the compared figures alike. Both servers
    run at once; the idle one costs nothing."""
    ports = {max_batch: free_port() for max_batch in (args.max_batch, 1)}
    processes = [start_server(checkpoint, p, b, args.max_delay_ms) for b, p in ports.items()]
    rounds = max(1, args.rounds)
    raw_slice = args.duration / 3 / (rounds + 1)
    results: dict[int, list[LoadResult]] = {max_batch: [] for max_batch in ports}
    try:
        for concurrency in args.concurrency:
            requests = {
                b: features_request("127.0.0.1", p, image, args.size) for b, p in ports.items()
            }
            for b, p in ports.items():  # warm-up, not counted
                run_load("127.0.0.1", p, requests[b], concurrency, 1.0, warmup=False)
            raws = [raw_throughput(model, args.max_batch, args.size, raw_slice)]
            parts: dict[int, list[LoadResult]] = {b: [] for b in ports}
            for i in range(rounds):
                order = list(ports.items())
                for b, p in order if i % 2 == 0 else order[::-1]:
                    parts[b].append(
                        run_load(
                            "127.0.0.1", p, requests[b], concurrency, args.duration / rounds,
                            warmup=False,
                        )
                    )  # fmt: skip
                raws.append(raw_throughput(model, args.max_batch, args.size, raw_slice))
            for b in ports:
                level = merge(parts[b])
                level.raw = float(np.mean(raws))
                results[b].append(level)
        return results[args.max_batch], results[1]
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--size", type=int, default=112, help="square input side in pixels")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per load level")
    parser.add_argument(
        "--rounds", type=int, default=4, help="slices per level, alternating the two servers"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the raw model and the server (1 suits a small, shared machine: "
        "more intra-op threads than free cores stall at every barrier)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_backbone(args.arch, 16, depth=args.depth, img_size=args.size).eval()
    image = jpeg(args.size)
    print(
        f"model {args.arch} depth {args.depth}, input {args.size}x{args.size}, "
        f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_backbone(model, Path(tmp) / "backbone.safetensors")
        raw_one = raw_throughput(model, 1, args.size, args.duration / 3)
        batched, single = load_both(checkpoint, model, image, args)

    print(f"raw forward_features, batch 1: {raw_one:.1f} img/s")
    print(
        f"{'server':<14}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}"
        f"{'errors':>8}{f'raw b{args.max_batch}':>9}{'/raw':>7}"
    )
    for label, results in ((f"max-batch {args.max_batch}", batched), ("max-batch 1", single)):
        for r in results:
            print(
                f"{label:<14}{r.concurrency:>5}{r.throughput:>9.1f}{r.percentile(50) * 1e3:>9.1f}"
                f"{r.percentile(99) * 1e3:>9.1f}{r.mean_batch:>7.1f}{r.errors:>8}{r.raw:>9.1f}"
                f"{r.throughput / r.raw:>7.2f}"
            )
    low, low_single = batched[0], single[0]
    top, top_single = batched[-1], single[-1]
    ratios = {
        f"batching / max-batch 1 at concurrency {low.concurrency}": (
            low.throughput / low_single.throughput,
            0.95,
        ),
        f"server / raw at concurrency {top.concurrency}": (top.throughput / top.raw, 0.90),
        f"micro-batching / max-batch 1 at concurrency {top.concurrency}": (
            top.throughput / top_single.throughput,
            1.3,
        ),
    }
    for name, (ratio, target) in ratios.items():
        verdict = "met" if ratio >= target else "MISSED"
        print(f"{name}: {ratio:.2f} (target >= {target}: {verdict})")
    if args.json is not None:
        rows = [
            {
                "server": label,
                "concurrency": r.concurrency,
                "req_per_s": r.throughput,
                "p50_ms": r.percentile(50) * 1e3,
                "p99_ms": r.percentile(99) * 1e3,
                "mean_batch": r.mean_batch,
                "errors": r.errors,
                "raw_img_per_s": r.raw,
            }
            for label, results in (("batched", batched), ("max_batch_1", single))
            for r in results
        ]
        summary = {name: {"ratio": r, "target": t} for name, (r, t) in ratios.items()}
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "rows": rows,
                    "ratios": summary,
                    "raw_batch1": raw_one,
                },
                indent=2,
            )
        )
    if any(r.errors for r in batched + single):
        print("note: some requests failed (non-200); see the errors column")


if __name__ == "__main__":
    main()
