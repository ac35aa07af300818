"""Views per second: densedino's MultiViewTransform vs DINO's torchvision-v1 PIL pipeline.

Both pipelines make 2 global 224 px + 8 local 96 px views (DINO's recipe) of the same images:
procedural 500 x 375 photos-like images (smooth colour fields, gradients, shapes and grain)
round-tripped through JPEG quality 90 once, up front. Decoding is excluded for both: each
pipeline receives the decoded PIL image (what an ImageFolder dataset hands to its transform);
ours is also timed on uint8 tensors. Single process; torch threads set by --threads (a data
loader worker uses 1). The two pipelines are timed in alternating rounds so that a varying
background load hits both alike; the best round of each is reported with the median.

    python benchmarks/bench_views.py [--images 64] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms.v2 import functional as TF

from densedino.data.view_config import ViewConfig
from densedino.data.views import MultiViewTransform


def procedural_photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like RGB image: smooth colour field, a gradient, a few shapes, sensor grain."""
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    ramp = np.linspace(0.6, 1.2, width)[None, :, None]
    pixels = np.asarray(field, dtype=np.float32) * ramp
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        x1, y1 = x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 150))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    grain = rng.normal(0, 6, size=(height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class _DinoGaussianBlur:
    """DINO's utils.GaussianBlur: PIL blur with radius U(0.1, 2) applied with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _DinoSolarization:
    """DINO's utils.Solarization: PIL solarize (threshold 128) with probability p."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DinoAugmentation:
    """DINO's DataAugmentationDINO written with torchvision.transforms v1 on PIL images."""

    def __init__(self, num_local: int = 8) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        self.global_1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                flip_and_jitter,
                _DinoGaussianBlur(1.0),
                normalize,
            ]
        )
        self.global_2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
                flip_and_jitter,
                _DinoGaussianBlur(0.1),
                _DinoSolarization(0.2),
                normalize,
            ]
        )
        self.local = transforms.Compose(
            [
                transforms.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
                flip_and_jitter,
                _DinoGaussianBlur(0.5),
                normalize,
            ]
        )
        self.num_local = num_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        views = [self.global_1(image), self.global_2(image)]
        return views + [self.local(image) for _ in range(self.num_local)]


def _time_round(fn: Callable[[object], object], images: list) -> float:
    """Seconds to run ``fn`` once on every image."""
    start = time.perf_counter()
    for image in images:
        fn(image)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)

    rng = np.random.default_rng(0)
    pil_images = [procedural_photo(rng) for _ in range(args.images)]
    tensor_images = [TF.pil_to_tensor(im).contiguous() for im in pil_images]

    ours = MultiViewTransform(ViewConfig.dino(num_local=8))
    dino = DinoAugmentation(num_local=8)
    views_per_image = 10
    assert len(ours(pil_images[0])["views"]) == len(dino(pil_images[0])) == views_per_image

    pipelines: dict[str, tuple[Callable[[object], object], list]] = {
        "dino (torchvision v1, PIL)": (dino, pil_images),
        "densedino (PIL input)": (ours, pil_images),
        "densedino (uint8 tensor input)": (ours, tensor_images),
    }
    for fn, images in pipelines.values():  # warm-up
        _time_round(fn, images[:4])
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name, (fn, images) in pipelines.items():
            times[name].append(_time_round(fn, images))

    print(
        f"{args.images} images 500x375 (decoded, decode excluded), 2x224 + 8x96 views, "
        f"torch threads {args.threads}, {args.rounds} alternating rounds"
    )
    print(f"{'pipeline':34s} {'views/s best':>13s} {'views/s median':>15s} {'ms/image':>9s}")
    total_views = args.images * views_per_image
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        print(
            f"{name:34s} {total_views / best:13.0f} {total_views / median:15.0f} "
            f"{1e3 * best / args.images:9.1f}"
        )
    ratio = statistics.median(times["dino (torchvision v1, PIL)"]) / statistics.median(
        times["densedino (PIL input)"]
    )
    print(f"speed-up (median, PIL input): {ratio:.2f}x")


if __name__ == "__main__":
    main()
