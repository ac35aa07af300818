"""Soak test of `densedino-serve`: mixed valid and invalid traffic for minutes (prints figures).

Usage: python benchmarks/soak_serve.py [--duration 300] [--concurrency 32] [--warmup 30]
       [--invalid-share 0.3] [--depth 4] [--url http://127.0.0.1:8000] [--json soak.json]

Without ``--url`` the server runs as a subprocess (the real CLI, a checkpoint saved for the run,
``--max-upload-mb 1`` unless told otherwise); with ``--url`` it soaks a running server instead
(e.g. a container: pass ``--pid`` of its process for the RSS figures, and its
``--max-upload-mb``). Only loopback URLs are accepted. ``--concurrency`` asyncio clients
send, in a closed loop, requests drawn at random (seeded) from these kinds:

- valid: ``features`` (multipart JPEG), ``attention`` (JSON, base64, with a point) -> 200;
- invalid: bad image bytes, bad base64, an oversize body (declared over the limit), too many
  pixels, too many images, wrong or missing fields, bad option values, an unknown route -> 4xx;
- ``disconnect``: a client that sends the headers and half of the body, then hangs up.

Each loop is bounded by ``--duration`` and by ``--max-requests``. Reported: requests/s, p50/p99
latency of the valid requests, counts per kind and status, every 5xx (goal 0), every invalid
request that was not answered with a 4xx (goal 0), and the server's resident memory (VmRSS) right
after the warm-up and at the end (goal: growth under 5 %), sampled every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SIZE = 64  # model input side of the valid requests (small: many requests per second)


# ------------------------------------------------------------------------------- requests
def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def photo(size: int, seed: int) -> bytes:
    """A smooth random colour JPEG (decodes like a photo, not like noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    return encode(image, "JPEG")


def multipart(fields: list[tuple[str, str]], files: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    for i, (name, blob) in enumerate(files):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="f{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + blob
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def http_request(
    host: str, path: str, content_type: str, body: bytes, *, length: int | None = None
) -> bytes:
    """A complete HTTP/1.1 POST; ``length`` overrides the declared Content-Length."""
    declared = len(body) if length is None else length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    return head.encode() + body


@dataclass(frozen=True)
class Kind:
    """One kind of request: bytes to send, the statuses that count as a correct answer."""

    name: str
    request: bytes
    valid: bool
    expect: Callable[[int], bool]
    disconnect: bool = False  # send half the request, then hang up: no answer expected


def kinds(host: str, max_upload_mb: float) -> list[Kind]:
    """Every request kind of the mix, built once."""
    jpeg = photo(96, 0)
    ok = lambda s: s == 200  # noqa: E731
    client_error = lambda s: 400 <= s < 500  # noqa: E731
    form = lambda fields, files: multipart(fields, files)  # noqa: E731

    def post(path: str, content: tuple[str, bytes]) -> bytes:
        return http_request(host, path, *content)

    def post_json(path: str, payload: object) -> bytes:
        return http_request(host, path, "application/json", json.dumps(payload).encode())

    def bad(name: str, request: bytes) -> Kind:
        return Kind(name, request, False, client_error)

    b64 = base64.b64encode(jpeg).decode()
    huge_pixels = encode(Image.new("RGB", (5000, 5000), (30, 60, 90)), "PNG")  # small bytes
    oversize = int(2 * max_upload_mb * 2**20)  # declared only: the server refuses it unread
    features = post(
        "/v1/features", form([("output", "cls"), ("size", str(SIZE))], [("images", jpeg)])
    )
    attention = {"image": b64, "size": SIZE, "x": 40, "y": 30}
    return [
        Kind("features", features, True, ok),
        Kind("attention", post_json("/v1/attention", attention), True, ok),
        bad("bad_bytes", post("/v1/features", form([], [("images", b"\x89PNG" + bytes(300))]))),
        bad("bad_base64", post_json("/v1/features", {"images": ["not base64!!"]})),
        bad("oversize_body", http_request(host, "/v1/features", "application/json", b"{}",
                                          length=oversize)),
        bad("too_many_pixels", post("/v1/features", form([], [("images", huge_pixels)]))),
        bad("too_many_images", post("/v1/features", form([], [("images", jpeg)] * 40))),
        bad("wrong_field", post_json("/v1/features", {"imagez": [b64]})),
        bad("bad_option", post("/v1/features", form([("size", "huge")], [("images", jpeg)]))),
        bad("no_file", post("/v1/attention", form([("x", "3")], []))),
        bad("unknown_route", post_json("/v1/nothing", {})),
        # Half of a valid upload, then the client hangs up: no answer is expected.
        Kind("disconnect", features[: len(features) // 2], False, lambda s: True, True),
    ]  # fmt: skip


# --------------------------------------------------------------------------------- clients
@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    wrong: Counter[tuple[str, int]] = field(default_factory=Counter)  # unexpected answers
    no_answer: Counter[str] = field(default_factory=Counter)  # connection closed, no status
    sent: int = 0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, server keeps the connection) of one HTTP/1.1 response; the body is drained."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before a status line")
    status = int(status_line.split()[1])
    length, chunked, keep = 0, False, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and value == "close":
            keep = False
    if chunked:
        while (size := int((await reader.readline()).strip() or b"0", 16)) > 0:
            await reader.readexactly(size + 2)
        await reader.readline()
    else:
        await reader.readexactly(length)
    return status, keep


async def one_client(
    host: str, port: int, mix: list[Kind], weights: list[float], seed: int,
    stop_at: float, budget: list[int], tally: Tally | None,
) -> None:  # fmt: skip
    """A closed loop of random requests; one keep-alive connection, reopened when needed."""
    rng = random.Random(seed)
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while time.perf_counter() < stop_at and budget[0] > 0:
            budget[0] -= 1
            kind = rng.choices(mix, weights)[0]
            if kind.disconnect or kind.name == "oversize_body":
                if conn is not None:  # its own connection: the server may close it early
                    conn[1].close()
                    conn = None
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            reader, writer = conn
            start = time.perf_counter()
            if tally is not None:
                tally.sent += 1
            if kind.disconnect:
                writer.write(kind.request)
                await writer.drain()
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                writer.transport.abort()  # hang up mid-upload
                conn = None
                if tally is not None:
                    tally.statuses[(kind.name, 0)] += 1
                continue
            try:
                writer.write(kind.request)
                await writer.drain()
            except ConnectionError:
                pass  # the server answered (e.g. 413) and closed before the body was sent
            try:
                status, keep = await asyncio.wait_for(read_response(reader), 120)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                writer.close()
                conn = None
                if tally is not None:
                    tally.no_answer[kind.name] += 1
                continue
            if tally is not None:
                tally.statuses[(kind.name, status)] += 1
                if not kind.expect(status):
                    tally.wrong[(kind.name, status)] += 1
                if kind.valid and status == 200:
                    tally.latencies.append(time.perf_counter() - start)
            if not keep or kind.name == "oversize_body":
                writer.close()
                conn = None
    finally:
        if conn is not None:
            conn[1].close()


async def load(
    host: str, port: int, mix: list[Kind], weights: list[float], concurrency: int,
    seconds: float, max_requests: int, tally: Tally | None, seed: int,
) -> None:  # fmt: skip
    stop_at = time.perf_counter() + seconds
    budget = [max_requests]
    await asyncio.gather(
        *(
            one_client(host, port, mix, weights, seed * 1000 + i, stop_at, budget, tally)
            for i in range(concurrency)
        )
    )


# ------------------------------------------------------------------------------ the server
def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(
    checkpoint: Path, port: int, threads: int, max_upload_mb: float
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "densedino.serve.cli", "--checkpoint", str(checkpoint),
        "--port", str(port), "--max-batch", "16", "--max-queue", "256",
        "--max-upload-mb", str(max_upload_mb), "--max-pixels", str(1024 * 1024),
        "--threads", str(threads), "--log-level", "warning",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DENSEDINO_API_KEY"}
    return subprocess.Popen(command, env=env)


def wait_ready(base: str, process: subprocess.Popen | None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError("the server never became ready") from None
            time.sleep(0.5)


def server_statuses(base: str) -> Counter[str]:
    """Requests by status as the server counts them (/metrics), disconnected clients included."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: Counter[str] = Counter()
    for match in re.finditer(
        r'^densedino_requests_total\{[^}]*status="(\d+)"[^}]*\} (\S+)$', text, re.M
    ):
        counts[match.group(1)] += int(float(match.group(2)))
    return counts


async def sample_rss(pid: int | None, every_s: float, out: list[tuple[float, float]]) -> None:
    start = time.perf_counter()
    while pid is not None:
        out.append((time.perf_counter() - start, rss_mb(pid)))
        await asyncio.sleep(every_s)


async def soak(args: argparse.Namespace, host: str, port: int, pid: int | None) -> dict:
    mix = kinds(f"{host}:{port}", args.max_upload_mb)
    weights = [
        (1 - args.invalid_share) / 2 if k.valid else args.invalid_share / (len(mix) - 2)
        for k in mix
    ]
    print(f"warm-up {args.warmup:.0f} s (not counted)", flush=True)
    await load(host, port, mix, weights, args.concurrency, args.warmup, 10**9, None, seed=1)
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_rss(pid, args.rss_every, samples))
    base = f"http://{host}:{port}"
    before = server_statuses(base)
    tally = Tally()
    print(f"soak {args.duration:.0f} s at concurrency {args.concurrency}", flush=True)
    start = time.perf_counter()
    await load(
        host, port, mix, weights, args.concurrency, args.duration, args.max_requests, tally, 2
    )
    seconds = time.perf_counter() - start
    sampler.cancel()
    server = server_statuses(base)
    server.subtract(before)
    end_rss = rss_mb(pid) if pid is not None else float("nan")
    answered = sum(n for (_, status), n in tally.statuses.items() if status)
    lat = np.array(tally.latencies) * 1e3
    start_rss = samples[0][1] if samples else float("nan")
    return {
        "seconds": seconds,
        "concurrency": args.concurrency,
        "sent": tally.sent,
        "answered": answered,
        "requests_per_s": answered / seconds,
        "valid_ok": len(tally.latencies),
        "valid_per_s": len(tally.latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "status_5xx": sum(n for (_, s), n in tally.statuses.items() if s >= 500),
        "server_status_counts": {k: n for k, n in sorted(server.items()) if n},
        "server_5xx": sum(n for k, n in server.items() if k.startswith("5")),
        "wrong_answers": {f"{k}:{s}": n for (k, s), n in sorted(tally.wrong.items())},
        "no_answer": dict(tally.no_answer),
        "by_kind": {f"{k}:{s}": n for (k, s), n in sorted(tally.statuses.items())},
        "rss_start_mb": start_rss,
        "rss_end_mb": end_rss,
        "rss_max_mb": max((r for _, r in samples), default=float("nan")),
        "rss_growth_pct": (end_rss / start_rss - 1) * 100,
        "rss_samples": samples,
    }


def report(result: dict) -> None:
    print(f"{'kind:status':<24}{'count':>8}")
    for key, n in result["by_kind"].items():
        print(f"{key:<24}{n:>8}")
    print(
        f"{result['answered']} answers in {result['seconds']:.0f} s: "
        f"{result['requests_per_s']:.1f} req/s ({result['valid_per_s']:.1f} valid req/s), "
        f"valid p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
    )
    print(f"5xx answers seen by the clients: {result['status_5xx']} (goal 0)")
    print(
        f"5xx counted by the server (/metrics, incl. disconnected clients): "
        f"{result['server_5xx']} of {result['server_status_counts']}"
    )
    wrong = result["wrong_answers"]
    print(f"answers not as expected (invalid not 4xx, valid not 200): {wrong or 0} (goal 0)")
    print(f"requests with no answer (connection dropped): {result['no_answer'] or 0}")
    print(
        f"server RSS after warm-up {result['rss_start_mb']:.0f} MiB, end "
        f"{result['rss_end_mb']:.0f} MiB, max {result['rss_max_mb']:.0f} MiB: growth "
        f"{result['rss_growth_pct']:+.1f} % (goal < 5 %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0, help="soak seconds (counted)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before counting")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=2_000_000, help="bound on requests")
    parser.add_argument("--invalid-share", type=float, default=0.3, help="share of bad requests")
    parser.add_argument("--arch", default="vit_tiny")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=1.0,
        help="the server's body limit (passed to the spawned server; with --url, state the "
        "running server's, 16 by default): the oversize request declares twice as much",
    )
    parser.add_argument("--url", default=None, help="soak this running server (loopback only)")
    parser.add_argument("--pid", type=int, default=None, help="its process id, for RSS")
    parser.add_argument("--rss-every", type=float, default=5.0, help="RSS sampling period (s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    process = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            parsed = urllib.parse.urlsplit(args.url)
            if parsed.hostname not in LOOPBACK:
                parser.error("--url must be a loopback address (load only to 127.0.0.1)")
            host, port, pid = parsed.hostname, parsed.port or 80, args.pid
        else:
            import socket

            import torch

            from densedino.models.vit import build_backbone
            from densedino.weights import save_backbone

            torch.manual_seed(0)
            model = build_backbone(args.arch, 16, depth=args.depth, img_size=SIZE)
            checkpoint = save_backbone(model, Path(tmp) / "backbone.safetensors")
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                host, port = "127.0.0.1", sock.getsockname()[1]
            process = start_server(checkpoint, port, args.threads, args.max_upload_mb)
            pid = process.pid
        try:
            wait_ready(f"http://{host}:{port}", process)
            result = asyncio.run(soak(args, host, port, pid))
        finally:
            if process is not None:
                process.terminate()
                process.wait(30)
    report(result)
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}, indent=2)
        )


if __name__ == "__main__":
    main()
