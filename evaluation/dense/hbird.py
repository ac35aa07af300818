"""Hummingbird retrieval segmentation (Balazevic et al. 2023; open-hummingbird-eval's protocol).

A memory bank of training patch features with soft labels (the fraction of each class among a
patch's labelled pixels) is built over E augmented passes of the training split; with a
bounded memory each image contributes a fixed number of patches drawn class-balanced (patches
holding classes that are rare in the image first). Each test patch retrieves its k nearest
memory patches (cosine, exact FAISS search on the bank where it lies, queries in chunks); its
label is the softmax(sim / T)-weighted mean of their soft labels; the label map is upsampled
bilinearly to the image and its argmax scored by one confusion matrix over the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from densedino.evaluation.dense.metrics import IGNORE_INDEX, ConfusionMatrix, iou_per_class, miou
from densedino.evaluation.knn import BankSearch, IndexSpec, build_index, describe_index

DEFAULT_K = 30
DEFAULT_TEMPERATURE = 0.02

PatchFn = Callable[[Tensor], Tensor]  # images [B, 3, H, W] -> unit features [B, h, w, D]
Batches = Iterable[tuple[Tensor, Tensor, Any]]  # (images, masks [B, H, W], ids)


@dataclass(frozen=True)
class HbirdPreset:
    """Sizes of one run: input side, augmented passes, memory size (None = every patch)."""

    size: int
    epochs: int
    memory: int | None
    scale: tuple[float, float] = (0.25, 1.0)  # random-resized-crop area of the passes


# open-hummingbird-eval: VOC trainaug -> val at 512 px, memories of 102,400 / 1,024,000 /
# 10,240,000 patches. demo: the built-in data (128 px, 1,600 trainaug images; 16 x 16 patches
# for the demo's ViT-T/8): one pass (the CPU budget of `make demo`), 32 patches per image.
PRESETS: dict[str, HbirdPreset] = {
    "voc-small": HbirdPreset(512, 2, 102_400),
    "voc": HbirdPreset(512, 2, 1_024_000),
    "voc-large": HbirdPreset(512, 2, 10_240_000),
    "demo": HbirdPreset(128, 1, 51_200),
}


# ------------------------------------------------------------------------------- core
def patch_label_fractions(
    masks: Tensor, patch: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Soft labels [B, h, w, C]: each class' share of a patch's labelled pixels.

    ``masks`` [B, H, W] integers (H, W multiples of `patch`); pixels equal to `ignore_index`
    count for no class, so a patch of ignored pixels only gets an all-zero row.
    """
    if masks.ndim != 3 or masks.shape[1] % patch or masks.shape[2] % patch:
        raise ValueError(f"masks must be [B, H, W] with sides divisible by {patch}")
    valid = masks != ignore_index
    labels = torch.where(valid, masks, torch.zeros_like(masks)).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"mask values must lie in [0, {num_classes}) or be {ignore_index}")
    onehot = F.one_hot(labels, num_classes).float() * valid[..., None]
    b, height, width, _ = onehot.shape
    h, w = height // patch, width // patch
    counts = onehot.reshape(b, h, patch, w, patch, num_classes).sum(dim=(2, 4))
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def balanced_patch_scores(fractions: Tensor) -> Tensor:
    """Sampling scores [n] of one image's patches (lower = kept first), before the noise.

    The reference's class balancing: a patch scores the sum, over the classes it holds, of the
    number of patches of the image holding that class; patches with no labelled pixel score inf.
    """
    present = fractions > 0  # [n, C]
    frequency = present.sum(0).float()  # patches holding each class
    scores = (present.float() * frequency).sum(1)
    return torch.where(present.any(1), scores, torch.full_like(scores, float("inf")))


def balanced_patch_sample(fractions: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Indices of `count` patches of one image ([n, C] soft labels), class-balanced at random.

    Scores are multiplied by uniform noise and the `count` lowest kept (the reference's rule).
    """
    if not 0 < count <= fractions.shape[0]:
        raise ValueError(f"count must be in [1, {fractions.shape[0]}], got {count}")
    noise = torch.rand(fractions.shape[0], generator=generator)
    scores = balanced_patch_scores(fractions) * noise
    return scores.topk(count, largest=False).indices


def transfer_labels(
    sims: Tensor, ids: Tensor, bank_labels: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """Soft labels [n, C]: softmax(sims / T) over the k neighbours, times their labels [N, C]."""
    weights = torch.softmax(sims.float() / temperature, dim=1)  # [n, k]
    return torch.einsum("nk,nkc->nc", weights, bank_labels[ids].float())


# ------------------------------------------------------------------------------ memory
@dataclass
class MemoryBank:
    """Features [N, D] (unit rows) and soft labels [N, C] of the training patches."""

    features: np.ndarray
    labels: Tensor
    images: int = 0
    passes: int = 0

    def __len__(self) -> int:
        return int(self.features.shape[0])


def build_memory(
    patch_fn: PatchFn,
    passes: Iterable[Batches],
    patch: int,
    num_classes: int,
    *,
    per_image: int | None,
    capacity: int,
    seed: int = 0,
    dtype: np.dtype | type = np.float32,
    progress: bool = False,
) -> MemoryBank:
    """Fill a bank of `capacity` rows from the batches of every pass (`per_image` None = all
    patches of an image). The bank is preallocated once: no copy is made later."""
    generator = torch.Generator().manual_seed(seed)
    features: np.ndarray | None = None
    labels: Tensor | None = None
    row = images = count_passes = 0
    for batches in passes:
        count_passes += 1
        for views, masks, _ in tqdm(
            batches, desc=f"memory pass {count_passes}", disable=not progress
        ):
            feats = patch_fn(views)  # [B, h, w, D]
            fractions = patch_label_fractions(masks, patch, num_classes)
            if features is None:
                features = np.zeros((capacity, feats.shape[-1]), dtype=dtype)
                labels = torch.zeros(capacity, num_classes)
            for f, y in zip(feats.flatten(1, 2), fractions.flatten(1, 2), strict=True):
                keep = (
                    torch.arange(f.shape[0])
                    if per_image is None
                    else balanced_patch_sample(y, per_image, generator)
                )
                take = min(len(keep), capacity - row)
                features[row : row + take] = f[keep[:take]].numpy()
                labels[row : row + take] = y[keep[:take]]  # type: ignore[index]
                row += take
                images += 1
    if features is None or labels is None or row == 0:
        raise ValueError("the memory bank is empty: no training image was read")
    return MemoryBank(features[:row], labels[:row], images, count_passes)


# -------------------------------------------------------------------------------- eval
@dataclass
class HbirdResult:
    """mIoU (percent) and the confusion matrix; a few predictions kept for the figure."""

    miou: float
    iou: np.ndarray
    confusion: np.ndarray
    index: str = ""
    examples: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    def to_json(self, classes: tuple[str, ...]) -> dict[str, Any]:
        return {
            "mIoU": self.miou,
            "IoU": {
                n: (None if np.isnan(v) else 100 * float(v))
                for n, v in zip(classes, self.iou, strict=True)
            },
            "pixel_accuracy": 100 * float(np.trace(self.confusion) / max(self.confusion.sum(), 1)),
        }


def predict(
    features: Tensor,
    searcher: Any,
    bank_labels: Tensor,
    size: tuple[int, int],
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 4096,
) -> Tensor:
    """Label maps [B, H, W] of test patch features [B, h, w, D] (bilinear upsampling, argmax).

    `searcher`: a :class:`BankSearch` or FAISS index over the memory features.
    """
    b, h, w, d = features.shape
    queries = features.reshape(-1, d).numpy()
    soft = torch.empty(queries.shape[0], bank_labels.shape[1])
    for start in range(0, queries.shape[0], chunk_size):
        sims, ids = searcher.search(queries[start : start + chunk_size], k)
        soft[start : start + len(sims)] = transfer_labels(
            torch.from_numpy(sims), torch.from_numpy(ids).long(), bank_labels, temperature
        )
    maps = soft.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).argmax(1)


def evaluate(
    patch_fn: PatchFn,
    memory: MemoryBank,
    batches: Batches,
    num_classes: int,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 4096,
    index: IndexSpec | None = None,
    keep_examples: int = 0,
    progress: bool = False,
) -> HbirdResult:
    """Retrieval segmentation of the test `batches` against `memory`.

    `index`: None = exact search on the bank where it lies (:class:`BankSearch`); an
    :class:`IndexSpec` for a GPU / IVF index (see :func:`densedino.evaluation.knn.build_index`).
    """
    if not 1 <= k <= len(memory):
        raise ValueError(f"k must be in [1, {len(memory)}] (the memory size), got {k}")
    searcher = BankSearch(memory.features) if index is None else build_index(memory.features, index)
    confusion = ConfusionMatrix(num_classes)
    examples: list[tuple[Tensor, Tensor, Tensor]] = []
    for views, masks, _ in tqdm(batches, desc="hbird eval", disable=not progress):
        labels = predict(
            patch_fn(views),
            searcher,
            memory.labels,
            tuple(masks.shape[-2:]),
            k=k,
            temperature=temperature,
            chunk_size=chunk_size,
        )
        confusion.update(masks.numpy(), labels.numpy())
        for i in range(min(len(views), keep_examples - len(examples))):
            examples.append((views[i], masks[i], labels[i]))
    return HbirdResult(
        miou(confusion.matrix),
        iou_per_class(confusion.matrix),
        confusion.matrix,
        describe_index(searcher),
        examples,
    )
