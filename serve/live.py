"""Run an ASGI app on uvicorn in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp


@contextmanager
def serve_in_thread(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0
) -> Iterator[str]:
    """Serve ``app`` on ``host:port`` (0 = a free port) and yield its base URL.

    Startup (the app's lifespan included) has finished when the URL is yielded; the server
    stops, running its shutdown, when the block exits.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped during startup (see its log)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"uvicorn did not start within {timeout_s} s")
            time.sleep(0.01)
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
