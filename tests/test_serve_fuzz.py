"""Property-based fuzzing of the HTTP API from its OpenAPI schema: no request gets a 5xx.

Schemathesis generates valid (positive) and invalid (negative) requests for every operation and
body media type of the live server's schema, a bounded number of examples each.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from densedino.models.vit import build_backbone
from densedino.serve.app import ServeSettings, create_app
from densedino.serve.codec import Limits
from densedino.serve.live import serve_in_thread

MAX_EXAMPLES = 30
BODY_TYPES = ("application/json", "multipart/form-data")
OPERATIONS = [
    ("POST", "/v1/features", BODY_TYPES),
    ("POST", "/v1/attention", BODY_TYPES),
    ("GET", "/v1/model", (None,)),
    ("GET", "/healthz", (None,)),
    ("GET", "/readyz", (None,)),
    ("GET", "/metrics", (None,)),
]
CASES = [
    pytest.param(method, path, media, mode, id=f"{method} {path} {media or ''} {mode.value}")
    for method, path, media_types in OPERATIONS
    for media in media_types
    # Operations without parameters or body have no invalid (negative) requests to generate.
    for mode in (GenerationMode if media else [GenerationMode.POSITIVE])
]


@pytest.fixture(scope="module")
def api_schema() -> Iterator[schemathesis.BaseSchema]:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, depth=2, img_size=32).eval()
    limits = Limits(max_body_bytes=256 * 1024, max_pixels=256 * 256, max_images=4, max_side=128)
    app = create_app(model, settings=ServeSettings(max_delay_ms=1, max_queue=16, limits=limits))
    with serve_in_thread(app) as url:
        httpx.get(f"{url}/healthz", timeout=30).raise_for_status()
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema):
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == {(method, path) for method, path, _ in OPERATIONS}


@pytest.mark.parametrize(("method", "path", "media_type", "mode"), CASES)
def test_no_server_errors(api_schema, method, path, media_type, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=mode, media_type=media_type)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(checks=[not_a_server_error], timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert response.json()["detail"], "an error without a reason"

    statuses: list[int] = []
    check()
    assert statuses, "no request was generated"
