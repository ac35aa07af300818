"""Request decoding and validation, image preprocessing and response encoding for the HTTP API.

Everything a client can get wrong ends here as an :class:`ApiError` with a 4xx status and a
reason: 400 malformed (corrupt or truncated image, bad JSON or base64), 413 too large (bytes,
pixels, image count), 415 unsupported type (checked by magic bytes, never by the file name),
422 invalid options (including a query point outside the image).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import safetensors.numpy
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator
from torch import Tensor

from densedino.data.eval_transform import model_input

NPY_MEDIA_TYPE = "application/x-npy"
SAFETENSORS_MEDIA_TYPE = "application/octet-stream"


class ApiError(Exception):
    """A request the server refuses: HTTP status, a human-readable reason, extra headers."""

    def __init__(
        self, status: int, reason: str | list[Any], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 4096 * 4096
    max_images: int = 16
    max_side: int = 1024  # longest side of the resized model input, in pixels


# ------------------------------------------------------------------------------------ options
Resize = Literal["fixed", "keep_aspect"]
_RESIZE_HELP = (
    "'fixed': resize to size x size; 'keep_aspect': scale the shorter side to size, then round "
    "both sides to the nearest multiple of the patch size"
)
_SIZE_HELP = "model input size in pixels (default: the model's img_size)"


class FeatureOptions(BaseModel):
    """What `/v1/features` returns and how it resizes the inputs."""

    model_config = ConfigDict(extra="forbid")

    output: Literal["cls", "patch", "both"] = Field("both", description="features to return")
    resize: Resize = Field("fixed", description=_RESIZE_HELP)
    size: int | None = Field(None, ge=1, le=8192, description=_SIZE_HELP)
    normalize: bool = Field(False, description="L2-normalise every returned feature vector")
    format: Literal["json", "npy", "safetensors"] = Field(
        "json",
        description="'json' (nested lists with shapes), 'npy' (one array: output must be cls or "
        "patch) or 'safetensors' (tensors 'cls' and/or 'patch'); binary bodies need images of "
        "one grid size",
    )

    @model_validator(mode="after")
    def _one_array_for_npy(self) -> FeatureOptions:
        if self.format == "npy" and self.output == "both":
            raise ValueError("format 'npy' holds one array: set output to 'cls' or 'patch'")
        return self


class FeaturesJSON(FeatureOptions):
    """JSON body of `/v1/features`: base64 images (data URLs accepted) and the options."""

    images: list[str] = Field(min_length=1, description="base64-encoded JPEG/PNG/WebP images")


class AttentionOptions(BaseModel):
    """Input resizing and the optional query point of `/v1/attention`."""

    model_config = ConfigDict(extra="forbid")

    resize: Resize = Field("fixed", description=_RESIZE_HELP)
    size: int | None = Field(None, ge=1, le=8192, description=_SIZE_HELP)
    x: FiniteFloat | None = Field(
        None, description="query point x in pixels of the uploaded image (0 = left edge)"
    )
    y: FiniteFloat | None = Field(
        None, description="query point y in pixels of the uploaded image (0 = top edge)"
    )

    @model_validator(mode="after")
    def _both_or_neither(self) -> AttentionOptions:
        if (self.x is None) != (self.y is None):
            raise ValueError("give both x and y for a query point, or neither")
        return self


class AttentionJSON(AttentionOptions):
    """JSON body of `/v1/attention`: one base64 image and the options."""

    image: str = Field(description="base64-encoded JPEG/PNG/WebP image")


def validate_options(model: type[BaseModel], fields: Mapping[str, Any]) -> Any:
    """Validate request fields into ``model``; invalid ones raise ApiError 422 with details."""
    try:
        return model.model_validate(dict(fields))
    except ValidationError as exc:
        raise ApiError(
            422, exc.errors(include_url=False, include_input=False, include_context=False)
        ) from None


def parse_json_body(body: bytes) -> dict[str, Any]:
    """A JSON object from a request body (ApiError 400 when it is not one)."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(value).__name__}")
    return value


def decode_base64(text: str, what: str) -> bytes:
    """Bytes of a base64 string or ``data:...;base64,`` URL (ApiError 400 when malformed)."""
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{what}: a data URL must be 'data:<type>;base64,<data>'")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"{what}: invalid base64 ({exc})") from None


# ------------------------------------------------------------------------------------- images
def sniff_format(data: bytes) -> str | None:
    """PIL format name of JPEG / PNG / WebP data from its magic bytes, None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Decode JPEG/PNG/WebP bytes into a loaded RGB image, enforcing the byte and pixel limits.

    The pixel count is read from the header and checked before any pixel is decoded.
    """
    if not data:
        raise ApiError(400, f"{what}: empty")
    if len(data) > limits.max_body_bytes:
        raise ApiError(413, f"{what}: {len(data)} bytes, the limit is {limits.max_body_bytes}")
    kind = sniff_format(data)
    if kind is None:
        raise ApiError(415, f"{what}: not a JPEG, PNG or WebP image (checked by content)")
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{what}: {exc}") from None
    # Decoders raise many types on hostile input (OSError, SyntaxError, struct.error,
    # zlib.error, ...); any of them means the bytes are not a readable image.
    except Exception as exc:
        raise ApiError(400, f"{what}: unreadable {kind} data ({exc})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(400, f"{what}: empty {width}x{height} image")
    if width * height > limits.max_pixels:
        raise ApiError(
            413, f"{what}: {width}x{height} pixels, the limit is {limits.max_pixels} pixels"
        )
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # same reason as above: truncated or corrupt pixel data
        raise ApiError(400, f"{what}: truncated or corrupt {kind} data ({exc})") from None


def input_size(
    width: int, height: int, resize: Resize, size: int, patch_size: int, limits: Limits
) -> tuple[int, int]:
    """Model input (height, width) for an image, both multiples of the patch size.

    ApiError 422 when a fixed size is not a multiple of the patch or the result exceeds
    ``limits.max_side``.
    """
    if resize == "fixed":
        if size % patch_size:
            raise ApiError(
                422, f"size {size} is not a multiple of the patch size {patch_size} (resize=fixed)"
            )
        out_h = out_w = size
    else:
        scale = size / min(width, height)
        out_h = max(patch_size, round(height * scale / patch_size) * patch_size)
        out_w = max(patch_size, round(width * scale / patch_size) * patch_size)
    if max(out_h, out_w) > limits.max_side:
        raise ApiError(
            422,
            f"the model input would be {out_w}x{out_h} pixels; the limit is {limits.max_side} "
            "per side (use a smaller size, or resize=fixed)",
        )
    return out_h, out_w


def preprocess(image: Image.Image, height: int, width: int) -> Tensor:
    """RGB image -> model input [3, height, width] (see
    :func:`densedino.data.eval_transform.model_input`)."""
    return model_input(image, height, width)


@dataclass(frozen=True)
class PreparedImage:
    """A decoded, resized and normalised input with the size of the uploaded image."""

    pixels: Tensor  # [3, h, w]
    width: int
    height: int

    @property
    def input_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


def prepare_image(
    data: bytes, resize: Resize, size: int, patch_size: int, limits: Limits, what: str
) -> PreparedImage:
    """Decode, check and preprocess one uploaded image."""
    image = decode_image(data, limits, what)
    height, width = input_size(image.width, image.height, resize, size, patch_size, limits)
    return PreparedImage(preprocess(image, height, width), image.width, image.height)


def normalized_point(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """A point in pixels of the uploaded image -> (x, y) in [-1, 1] of the model input frame.

    Pixel coordinates are continuous (pixel i spans [i, i+1]), so the image spans [0, width] x
    [0, height]; resizing keeps relative positions, hence the input frame needs no other term.
    """
    if not (0 <= x <= width and 0 <= y <= height):
        raise ApiError(
            422, f"point ({x}, {y}) is outside the {width}x{height} image ([0, W] x [0, H])"
        )
    return 2 * x / width - 1, 2 * y / height - 1


# ---------------------------------------------------------------------------------- responses
def _array_json(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "data": array.tolist()}


def feature_arrays(
    outputs: Sequence[Mapping[str, Tensor]], output: str, normalize: bool
) -> list[dict[str, np.ndarray]]:
    """Per image: the requested float32 arrays ``cls`` [D] and/or ``patch`` [h, w, D]."""
    names = ("cls", "patch") if output == "both" else (output,)
    arrays = []
    for out in outputs:
        picked = {}
        for name in names:
            value = out[name].float()
            if normalize:
                value = torch.nn.functional.normalize(value, dim=-1)
            picked[name] = value.numpy()
        arrays.append(picked)
    return arrays


@dataclass(frozen=True)
class Encoded:
    """A response body with its media type and headers."""

    body: bytes
    media_type: str
    headers: dict[str, str]


def _shape(array: np.ndarray) -> str:
    return "x".join(str(n) for n in array.shape)


def encode_features(
    images: Sequence[PreparedImage],
    arrays: Sequence[Mapping[str, np.ndarray]],
    options: FeatureOptions,
    patch_size: int,
) -> Encoded:
    """The `/v1/features` body in the requested format; shapes in the body or the headers."""
    grids = [(h // patch_size, w // patch_size) for h, w in (im.input_hw for im in images)]
    if options.format == "json":
        results = []
        for image, grid, picked in zip(images, grids, arrays, strict=True):
            entry: dict[str, Any] = {
                "image_size": {"width": image.width, "height": image.height},
                "input_size": {"height": image.input_hw[0], "width": image.input_hw[1]},
                "grid": {"h": grid[0], "w": grid[1]},
            }
            entry.update({name: _array_json(value) for name, value in picked.items()})
            results.append(entry)
        payload = {
            "dtype": "float32",
            "patch_size": patch_size,
            "normalized": options.normalize,
            "results": results,
        }
        return Encoded(json.dumps(payload).encode(), "application/json", {})
    # Binary bodies stack the images, so they must share one grid (checked before inference).
    stacked = {name: np.stack([a[name] for a in arrays]) for name in arrays[0]}
    headers = {
        "X-DenseDINO-Dtype": "float32",
        "X-DenseDINO-Shape": ";".join(f"{k}={_shape(v)}" for k, v in stacked.items()),
        "X-DenseDINO-Patch-Size": str(patch_size),
        "X-DenseDINO-Grid": f"{grids[0][0]}x{grids[0][1]}",
        "X-DenseDINO-Normalized": str(options.normalize).lower(),
    }
    if options.format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, next(iter(stacked.values())), allow_pickle=False)
        return Encoded(buffer.getvalue(), NPY_MEDIA_TYPE, headers)
    metadata = {
        "patch_size": str(patch_size),
        "grid": headers["X-DenseDINO-Grid"],
        "normalized": headers["X-DenseDINO-Normalized"],
    }
    body = safetensors.numpy.save(stacked, metadata=metadata)
    return Encoded(body, SAFETENSORS_MEDIA_TYPE, headers)


def encode_attention(
    image: PreparedImage,
    outputs: Mapping[str, Tensor],
    patch_size: int,
    point: tuple[float, float] | None,
    ref_point: tuple[float, float] | None,
) -> Encoded:
    """The `/v1/attention` JSON body: per-head CLS maps and, with a point, the reference maps."""
    height, width = image.input_hw
    payload: dict[str, Any] = {
        "dtype": "float32",
        "patch_size": patch_size,
        "image_size": {"width": image.width, "height": image.height},
        "input_size": {"height": height, "width": width},
        "grid": {"h": height // patch_size, "w": width // patch_size},
        "cls_attention": _array_json(outputs["cls_attention"].float().numpy()),
    }
    if point is not None and ref_point is not None:
        payload["point"] = {
            "x": point[0],
            "y": point[1],
            "ref_point": list(ref_point),
            "attention": _array_json(outputs["ref_attention"].float().numpy()),
            "similarity": _array_json(outputs["ref_similarity"].float().numpy()),
        }
    return Encoded(json.dumps(payload).encode(), "application/json", {})
