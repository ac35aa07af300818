"""The HTTP API on a real uvicorn server (loopback, free port): results, batching, errors, auth."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from densedino.data.constants import IMAGENET_MEAN, IMAGENET_STD
from densedino.models.vit import VisionTransformer, build_backbone
from densedino.serve.app import ServeSettings, create_app
from densedino.serve.cli import main as cli_main
from densedino.serve.codec import Limits
from densedino.serve.live import serve_in_thread
from densedino.serve.loading import describe, load_model
from densedino.weights import save_backbone

ATOL = 1e-5
LIMITS = Limits(max_body_bytes=64 * 1024, max_pixels=512 * 512, max_images=4, max_side=256)


# ------------------------------------------------------------------------------------ helpers
def tiny_model() -> VisionTransformer:
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16, depth=2, img_size=64).eval()


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def noise_image(width: int = 80, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


PNG = encode(noise_image(), "PNG")


def reference_input(data: bytes, height: int, width: int) -> torch.Tensor:
    """The documented preprocessing, written with torchvision: [1, 3, height, width]."""
    transform = transforms.Compose(
        [
            transforms.Resize((height, width), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)


def wait_ready(client: httpx.Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.05)


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def multipart(*blobs: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes]]]:
    return [(field, (f"image{i}.png", blob)) for i, blob in enumerate(blobs)]


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    return tiny_model()


@pytest.fixture(scope="module")
def client(model: VisionTransformer) -> Iterator[httpx.Client]:
    settings = ServeSettings(max_batch=16, max_delay_ms=50, max_queue=64, limits=LIMITS)
    with (
        serve_in_thread(create_app(model, settings=settings)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        wait_ready(http)
        yield http


# ------------------------------------------------------------------------------------ results
@pytest.mark.parametrize(
    ("options", "input_hw"),
    [
        ({"size": "64"}, (64, 64)),  # fixed square
        ({"resize": "keep_aspect", "size": "32"}, (32, 48)),  # 80x48 -> 53.3x32 -> 48x32
        ({}, (64, 64)),  # default: the model's img_size
    ],
)
def test_features_equal_direct_forward(client, model, options, input_hw):
    response = client.post("/v1/features", files=multipart(PNG), data=options)
    assert response.status_code == 200, response.text
    body = response.json()
    (result,) = body["results"]
    grid = (input_hw[0] // 16, input_hw[1] // 16)
    assert (body["dtype"], body["patch_size"], body["normalized"]) == ("float32", 16, False)
    assert result["grid"] == {"h": grid[0], "w": grid[1]}
    assert result["image_size"] == {"width": 80, "height": 48}
    assert result["cls"]["shape"] == [192]
    assert result["patch"]["shape"] == [*grid, 192]
    with torch.no_grad():
        expected = model.forward_features(reference_input(PNG, *input_hw))
    torch.testing.assert_close(
        torch.tensor(result["cls"]["data"]), expected["cls"][0], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(result["patch"]["data"]), expected["patch"][0], atol=ATOL, rtol=0
    )


def test_json_base64_several_images_and_binary_formats(client, model):
    blobs = [
        PNG,
        encode(noise_image(seed=1), "JPEG", quality=90),
        encode(noise_image(seed=2), "WEBP"),
    ]
    images = [base64.b64encode(b).decode() for b in blobs]
    images[2] = "data:image/webp;base64," + images[2]
    request = {"images": images, "size": 64, "output": "patch", "normalize": True}
    as_json = client.post("/v1/features", json=request)
    assert as_json.status_code == 200, as_json.text
    results = as_json.json()["results"]
    patches = np.stack([np.asarray(r["patch"]["data"], dtype=np.float32) for r in results])
    assert [set(r) & {"cls", "patch"} for r in results] == [{"patch"}] * 3
    np.testing.assert_allclose(np.linalg.norm(patches, axis=-1), 1.0, atol=1e-5)
    with torch.no_grad():
        direct = model.forward_features(torch.cat([reference_input(b, 64, 64) for b in blobs]))
    np.testing.assert_allclose(patches, F.normalize(direct["patch"], dim=-1).numpy(), atol=ATOL)

    as_npy = client.post("/v1/features", json={**request, "format": "npy"})
    assert as_npy.status_code == 200, as_npy.text
    assert as_npy.headers["content-type"] == "application/x-npy"
    assert as_npy.headers["x-densedino-shape"] == "patch=3x4x4x192"
    assert as_npy.headers["x-densedino-grid"] == "4x4"
    assert as_npy.headers["x-densedino-patch-size"] == "16"
    np.testing.assert_allclose(np.load(io.BytesIO(as_npy.content)), patches, atol=1e-6)

    as_st = client.post("/v1/features", json={**request, "format": "safetensors", "output": "both"})
    assert as_st.status_code == 200, as_st.text
    tensors = safetensors.numpy.load(as_st.content)
    assert tensors["cls"].shape == (3, 192) and tensors["cls"].dtype == np.float32
    np.testing.assert_allclose(tensors["patch"], patches, atol=1e-6)


def test_attention_maps_and_reference_point(client, model):
    x, y = 10.0, 20.0  # pixels of the 80x48 upload
    response = client.post(
        "/v1/attention", files=multipart(PNG, field="image"), data={"size": "64", "x": x, "y": y}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["grid"] == {"h": 4, "w": 4}
    assert body["point"]["ref_point"] == pytest.approx([2 * x / 80 - 1, 2 * y / 48 - 1])
    images = reference_input(PNG, 64, 64)
    ref = torch.tensor([[body["point"]["ref_point"]]], dtype=torch.float32)
    with torch.no_grad():
        cls_maps = model.cls_attention_maps(images)[0]  # no reference token at all
        attn = model.get_last_selfattention(images, ref)[0]
        feats = model.forward_features(images, ref)
    ref_maps = attn[:, 1, 2:].reshape(3, 4, 4)
    similarity = F.cosine_similarity(feats["ref"][0, 0].view(1, 1, -1), feats["patch"][0], dim=-1)
    got = {k: torch.tensor(body["point"][k]["data"]) for k in ("attention", "similarity")}
    torch.testing.assert_close(
        torch.tensor(body["cls_attention"]["data"]), cls_maps, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(got["attention"], ref_maps, atol=ATOL, rtol=0)
    torch.testing.assert_close(got["similarity"], similarity, atol=ATOL, rtol=0)
    assert body["cls_attention"]["shape"] == [3, 4, 4]

    plain = client.post("/v1/attention", json={"image": base64.b64encode(PNG).decode(), "size": 64})
    assert plain.status_code == 200, plain.text
    assert "point" not in plain.json()
    np.testing.assert_allclose(plain.json()["cls_attention"]["data"], cls_maps.numpy(), atol=ATOL)


def test_concurrent_clients_succeed_and_are_batched(client):
    def batched_forward_passes() -> float:
        text = client.get("/metrics").text
        return metric(text, "densedino_batch_size_count") - metric(
            text, "densedino_batch_size_bucket", '{le="1"}'
        )

    before = batched_forward_passes()

    def one(i: int) -> int:
        blob = encode(noise_image(seed=i), "PNG")
        with httpx.Client(base_url=str(client.base_url), timeout=60) as http:
            return http.post(
                "/v1/features", files=multipart(blob), data={"output": "cls"}
            ).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(16)))
    assert statuses == [200] * 16
    assert batched_forward_passes() > before
    text = client.get("/metrics").text
    assert (
        metric(
            text, "densedino_requests_total", '{route="/v1/features",method="POST",status="200"}'
        )
        >= 16
    )


# ------------------------------------------------------------------------------------- errors
def _truncated_jpeg() -> bytes:
    data = encode(noise_image(64, 64), "JPEG", quality=95)
    return data[: len(data) // 2]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_REQUESTS: list[tuple[str, dict[str, Any], int]] = [
    ("non-image bytes", {"files": multipart(b"hello, this is text")}, 415),
    ("gif named .png", {"files": multipart(encode(noise_image(), "GIF"))}, 415),
    ("truncated jpeg", {"files": multipart(_truncated_jpeg())}, 400),
    ("corrupt png", {"files": multipart(PNG[:40] + b"\x00" * 200)}, 400),
    ("oversized body", {"files": multipart(os.urandom(100 * 1024))}, 413),
    (
        "oversized chunked body",
        {"content": iter([b"x" * 50_000] * 3), "headers": {"content-type": "application/json"}},
        413,
    ),
    ("too many pixels", {"files": multipart(encode(Image.new("RGB", (600, 600)), "PNG"))}, 413),
    ("too many images", {"files": multipart(*[PNG] * 5)}, 413),
    ("wrong content type", {"content": PNG, "headers": {"content-type": "image/png"}}, 415),
    ("no content type", {"content": b"{}"}, 415),
    (
        "bad json",
        {"content": b'{"images": [', "headers": {"content-type": "application/json"}},
        400,
    ),
    ("json not an object", {"json": [_b64(PNG)]}, 400),
    ("bad base64", {"json": {"images": ["not base64!!"]}}, 400),
    ("bad data url", {"json": {"images": ["data:image/png," + _b64(PNG)]}}, 400),
    ("empty image list", {"json": {"images": []}}, 422),
    ("no image part", {"files": [("other", ("a.txt", b"x"))], "data": {"size": "64"}}, 422),
    ("image as text field", {"data": {"images": "abc"}, "files": [("x", ("x", b""))]}, 422),
    ("bad output option", {"files": multipart(PNG), "data": {"output": "everything"}}, 422),
    ("unknown option", {"files": multipart(PNG), "data": {"colour": "red"}}, 422),
    ("size not multiple of patch", {"files": multipart(PNG), "data": {"size": "50"}}, 422),
    ("size not a number", {"json": {"images": [_b64(PNG)], "size": "big"}}, 422),
    ("npy with both outputs", {"json": {"images": [_b64(PNG)], "format": "npy"}}, 422),
    (
        "input over max_side",
        {
            "files": multipart(encode(Image.new("RGB", (400, 20)), "PNG")),
            "data": {"resize": "keep_aspect", "size": "32"},
        },
        422,
    ),
    (
        "npy of mixed grids",
        {
            "json": {
                "images": [_b64(PNG), _b64(encode(noise_image(48, 48), "PNG"))],
                "resize": "keep_aspect",
                "size": 32,
                "format": "npy",
                "output": "cls",
            }
        },
        422,
    ),
]


@pytest.mark.parametrize(
    ("case", "kwargs", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_feature_requests_get_their_4xx(client, case, kwargs, status):
    response = client.post("/v1/features", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"], f"{case}: no reason given"


BAD_ATTENTION: list[tuple[str, dict[str, Any], int]] = [
    ("point right of image", {"x": 80.5, "y": 10}, 422),
    ("point above image", {"x": 10, "y": -1}, 422),
    ("x without y", {"x": 10}, 422),
    ("nan point", {"x": "nan", "y": 3}, 422),
    ("two images", {"size": 64, "__two": True}, 422),
]


@pytest.mark.parametrize(
    ("case", "data", "status"), BAD_ATTENTION, ids=[c[0] for c in BAD_ATTENTION]
)
def test_bad_attention_requests_get_their_4xx(client, case, data, status):
    data = dict(data)
    files = (
        multipart(PNG, PNG, field="image")
        if data.pop("__two", False)
        else multipart(PNG, field="image")
    )
    response = client.post("/v1/attention", files=files, data={k: str(v) for k, v in data.items()})
    assert response.status_code == status, response.text
    assert response.json()["detail"]


def test_point_on_the_border_is_inside(client):
    response = client.post("/v1/attention", json={"image": _b64(PNG), "size": 64, "x": 80, "y": 0})
    assert response.status_code == 200, response.text
    assert response.json()["point"]["ref_point"] == [1.0, -1.0]


# --------------------------------------------------------------------------- load and health
class Gate:
    """Wraps a model method so that a test can hold the worker thread inside it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        assert self.open.wait(60), "gate never opened"
        return self.fn(*args, **kwargs)


def test_health_answers_while_busy_and_full_queue_is_503():
    model = tiny_model()
    gate = Gate(model.forward_features)
    model.forward_features = gate  # type: ignore[method-assign]
    limits = Limits(max_images=1)
    settings = ServeSettings(max_batch=1, max_delay_ms=0, max_queue=2, limits=limits)
    with (
        serve_in_thread(create_app(model, settings=settings)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        wait_ready(http)
        gate.open.clear()
        gate.entered.clear()

        def post() -> int:
            with httpx.Client(base_url=url, timeout=60) as own:
                return own.post(
                    "/v1/features", files=multipart(PNG), data={"output": "cls"}
                ).status_code

        with ThreadPoolExecutor(3) as pool:
            running = pool.submit(post)
            assert gate.entered.wait(30), "the first request never reached the model"
            queued = [pool.submit(post), pool.submit(post)]
            deadline = time.monotonic() + 30
            while metric(http.get("/metrics").text, "densedino_queue_depth") < 2:
                assert time.monotonic() < deadline, "requests never queued"
                time.sleep(0.02)
            # The model is blocked: the event loop must still answer.
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.get("/readyz").status_code == 200
            refused = http.post("/v1/features", files=multipart(PNG))
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            gate.open.set()
            assert [running.result(), *(f.result() for f in queued)] == [200, 200, 200]


# ---------------------------------------------------------------------------------------- auth
def test_api_key_required_except_health(model):
    settings = ServeSettings(api_key="s3cret", limits=LIMITS, max_queue=8)
    with (
        serve_in_thread(create_app(model, settings=settings)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        wait_ready(http)  # /readyz is public
        assert http.get("/healthz").status_code == 200
        for path in ("/v1/model", "/metrics", "/openapi.json"):
            missing = http.get(path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = http.post(
            "/v1/features", files=multipart(PNG), headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert http.get("/v1/model", headers={"Authorization": "Basic s3cret"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert http.get("/v1/model", headers=good).status_code == 200
        response = http.post("/v1/features", files=multipart(PNG), headers=good)
        assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- model and CLI
def test_random_weights_only_on_request_and_reported():
    with pytest.raises(ValueError, match="random weights"):
        load_model(None)
    model, info = load_model(None, random_weights=True, arch="vit_tiny")
    described = describe(model, info)
    assert described["random_weights"] is True and described["warning"]
    assert described["checkpoint_sha256"] is None and described["arch"] == "vit_tiny"


def test_cli_refuses_to_start_without_weights(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([])
    assert exit_info.value.code == 2
    assert cli_main(["--checkpoint", "/nonexistent/backbone.safetensors"]) == 2
    assert "no checkpoint file" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_a_checkpoint_with_api_key_from_env(tmp_path: Path):
    path = save_backbone(
        tiny_model(),
        tmp_path / "export" / "backbone.safetensors",
        {"method": "DenseDINO", "epoch": 3},
    )
    port = _free_port()
    env = {**os.environ, "DENSEDINO_API_KEY": "k3y"}
    command = [
        sys.executable,
        "-m",
        "densedino.serve.cli",
        "--checkpoint",
        str(path),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the CLI server never became ready"
                time.sleep(0.2)
            assert http.get("/v1/model").status_code == 401
            info = http.get("/v1/model", headers={"Authorization": "Bearer k3y"}).json()
            assert info["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert (info["method"], info["epoch"], info["random_weights"]) == (
                "DenseDINO",
                "3",
                False,
            )
            assert (info["arch"], info["patch_size"], info["depth"]) == ("vit_tiny", 16, 2)
            response = http.post(
                "/v1/features",
                json={"images": [_b64(PNG)], "output": "cls", "size": 32},
                headers={"Authorization": "Bearer k3y"},
            )
            assert response.status_code == 200, response.text
            assert json.loads(response.content)["results"][0]["cls"]["shape"] == [192]
    finally:
        process.terminate()
        process.wait(30)


def test_client_hanging_up_mid_upload_is_499_not_500(model):
    """A disconnect during the upload is the client's doing: no 500 in /metrics, no traceback."""
    app = create_app(model, settings=ServeSettings(limits=LIMITS))
    sent: list[dict] = []
    messages = iter(
        [
            {"type": "http.request", "body": PNG[:100], "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/features",
        "raw_path": b"/v1/features",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 499
    text = app.state.server.metrics.render(queue_depth=0)
    assert (
        metric(
            text, "densedino_requests_total", '{route="/v1/features",method="POST",status="499"}'
        )
        == 1
    )
    assert 'status="500"' not in text
