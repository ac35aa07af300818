"""Weighted k-NN classification of frozen features (DINO's protocol), searched with FAISS.

DINO's vote: for each query, the k most cosine-similar training features vote for their class
with weight ``exp(sim / T)``; class scores are the sums of those weights. Here the scores are
normalised per query (divided by their sum, i.e. a softmax of ``sim / T`` over the k neighbours
summed per class): the ranking is DINO's, and small temperatures can neither overflow nor
underflow to all-zero rows.

Search is FAISS. Exact search on the CPU reads the bank where it lies (:class:`BankSearch`:
``faiss.knn`` on the array itself, or on float32 blocks of a float16 / strided bank merged in a
``ResultHeap``), so no second copy of the bank is ever made; an IVF index (approximate, for
large banks) and GPU indexes (``index_cpu_to_all_gpus``, the bank in GPU memory) are options.
Queries are streamed in chunks, so host memory is the bank plus a fixed working set of
``chunk_size x max(k)`` neighbours, ``chunk_size x num_classes`` scores and FAISS' BLAS tiles.

Several k are evaluated with ONE search at max(k): neighbours come back sorted by similarity,
so the k' nearest for k' < max(k) are a prefix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from densedino.checks import check_temperature

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

Features = np.ndarray | torch.Tensor
DEFAULT_CHUNK_SIZE = 4096
DEFAULT_TEMPERATURE = 0.07
MAX_GPU_K = 2048  # FAISS GPU indexes cannot return more neighbours than this
_ADD_CHUNK = 65536  # bank rows cast to float32 and added to the index at a time
BANK_BLOCK_ROWS = 65536  # rows of a non-float32 bank cast to float32 at a time by BankSearch
_NORM_SAMPLE = 1024  # rows checked for unit norm (a cheap guard, not a full pass)
_NORM_TOLERANCE = 1e-2  # loose enough for features cached in float16


def import_faiss() -> Any:
    """The faiss module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "k-NN search needs FAISS: pip install 'densedino[knn]' (faiss-gpu) or faiss-cpu"
        ) from error
    return faiss


# ------------------------------------------------------------------------------ validation
def as_numpy(x: Features) -> np.ndarray:
    """A numpy view of features or labels (torch tensors are moved to the CPU first)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_features(name: str, x: np.ndarray, dim: int | None = None) -> None:
    """Raise ValueError unless `x` is a non-empty [N, D] float array of unit-norm rows."""
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, the training bank {dim}")
    rows = np.linspace(0, x.shape[0] - 1, min(_NORM_SAMPLE, x.shape[0])).astype(np.int64)
    norms = np.linalg.norm(np.asarray(x[rows], dtype=np.float32), axis=1)
    if not np.all(np.abs(norms - 1.0) < _NORM_TOLERANCE):
        worst = float(norms[np.argmax(np.abs(norms - 1.0))])
        raise ValueError(
            f"{name} must be L2-normalised (cosine similarity = inner product); found a row of "
            f"norm {worst:.4g}. Normalise them first, e.g. torch.nn.functional.normalize(x, dim=1)"
        )


def check_labels(name: str, labels: np.ndarray, count: int, num_classes: int) -> None:
    """Raise ValueError unless `labels` is [count] integers in [0, num_classes)."""
    if labels.shape != (count,):
        raise ValueError(f"{name} must have shape ({count},), got {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got {labels.dtype}")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )


def check_k(ks: Sequence[int], bank_size: int) -> list[int]:
    """The sorted distinct k values, or ValueError if one is < 1 or larger than the bank."""
    if not ks:
        raise ValueError("give at least one k")
    values = sorted({int(k) for k in ks})
    if values[0] < 1:
        raise ValueError(f"k must be >= 1, got {values[0]}")
    if values[-1] > bank_size:
        raise ValueError(f"k={values[-1]} is larger than the training bank ({bank_size} features)")
    return values


# ---------------------------------------------------------------------------------- index
class BankSearch:
    """Exact inner-product k-NN over a bank [N, D] searched where it lies: no index, no copy.

    A C-contiguous float32 bank (numpy, a memory map, or a CPU tensor's buffer) is handed to
    ``faiss.knn`` as is; any other bank (float16, strided) is cast to float32 one block of
    ``block_rows`` rows at a time and the per-block top-k merged with ``faiss.ResultHeap``.
    Results equal ``IndexFlatIP.search`` (the same FAISS kernel). Quacks like a FAISS index
    for what this module uses: ``ntotal``, ``d`` and ``search(queries, k)``.
    """

    def __init__(self, bank: np.ndarray, *, block_rows: int = BANK_BLOCK_ROWS) -> None:
        if bank.ndim != 2:
            raise ValueError(f"the bank must be [N, D], got shape {tuple(bank.shape)}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.bank = bank
        self.ntotal, self.d = int(bank.shape[0]), int(bank.shape[1])
        self.block_rows = block_rows
        self.direct = bank.dtype == np.float32 and bank.flags.c_contiguous

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims [n, k], ids [n, k]), sorted by decreasing similarity."""
        faiss = import_faiss()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k > self.ntotal:
            raise ValueError(f"k={k} is larger than the training bank ({self.ntotal} features)")
        if self.direct:
            return faiss.knn(queries, self.bank, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)
        for start in range(0, self.ntotal, self.block_rows):
            block = np.ascontiguousarray(self.bank[start : start + self.block_rows], np.float32)
            sims, ids = faiss.knn(
                queries, block, min(k, block.shape[0]), metric=faiss.METRIC_INNER_PRODUCT
            )
            heap.add_result(sims, ids + start)
        heap.finalize()
        return heap.D, heap.I


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS index to build over the training bank.

    ``kind`` is ``"flat"`` (exact inner product) or ``"ivf"`` (inverted lists: approximate,
    faster on large banks). ``nlist`` defaults to about 4 sqrt(N), ``nprobe`` to 1/8 of the
    lists; ``nprobe == nlist`` is exact. ``gpu`` None uses every GPU FAISS sees, if any.
    ``gpu_fp16`` stores the bank in float16 on the GPUs (half the memory, slightly approximate).
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int | None = None
    gpu: bool | None = None
    gpu_fp16: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf"):
            raise ValueError(f"index kind must be 'flat' or 'ivf', got {self.kind!r}")
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            if value is not None and self.kind != "ivf":
                raise ValueError(f"{name} is only meaningful for an 'ivf' index")


def default_nlist(bank_size: int) -> int:
    """About 4 sqrt(N) lists, but at least 39 training points per list (FAISS' minimum)."""
    return max(1, min(round(4 * math.sqrt(bank_size)), bank_size // 39))


def resolved_ivf_params(spec: IndexSpec, bank_size: int) -> tuple[int, int]:
    """(nlist, nprobe) of an IVF spec for a bank of `bank_size`, checked."""
    nlist = spec.nlist or default_nlist(bank_size)
    if nlist > bank_size:
        raise ValueError(f"nlist={nlist} is larger than the training bank ({bank_size})")
    nprobe = spec.nprobe or max(1, nlist // 8)
    if nprobe > nlist:
        raise ValueError(f"nprobe={nprobe} is larger than nlist={nlist}")
    return nlist, nprobe


def _uses_gpu(spec: IndexSpec) -> bool:
    faiss = import_faiss()
    available = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if spec.gpu and not available:
        raise ValueError("a GPU index was asked for but FAISS sees no GPU")
    return bool(available) if spec.gpu is None else spec.gpu


def _to_all_gpus(index: faiss.Index, fp16: bool) -> faiss.Index:
    faiss = import_faiss()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = False  # replicate: each GPU holds the bank and answers part of the queries
    options.useFloat16 = fp16
    return faiss.index_cpu_to_all_gpus(index, co=options)


def _set_nprobe(index: faiss.Index, nprobe: int, on_gpu: bool) -> None:
    faiss = import_faiss()
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)


def _ivf_training_sample(bank: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    # FAISS' k-means uses at most 256 points per centroid; sampling them ourselves keeps a
    # memory-mapped bank from being read (and cast) in full.
    count = min(bank.shape[0], 256 * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(bank.shape[0], count, replace=False))
    return np.ascontiguousarray(bank[rows], dtype=np.float32)


def build_index(
    bank: Features, spec: IndexSpec | None = None, *, progress: bool = False
) -> faiss.Index:
    """An inner-product search over `bank` ([N, D], L2-normalised), row i = id i.

    Exact search on the CPU is a :class:`BankSearch` over the bank itself (no copy). A GPU or
    IVF index gets the bank added in float32 chunks, so a float16 or memory-mapped bank is
    never copied whole on the host.
    """
    faiss = import_faiss()
    spec = spec or IndexSpec()
    array = as_numpy(bank)
    check_features("training features", array)
    size, dim = array.shape
    on_gpu = _uses_gpu(spec)
    if spec.kind == "flat" and not on_gpu:
        return BankSearch(array)
    if spec.kind == "flat":
        index = _to_all_gpus(faiss.IndexFlatIP(dim), spec.gpu_fp16)
    else:
        nlist, nprobe = resolved_ivf_params(spec, size)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(_ivf_training_sample(array, nlist))
        if on_gpu:
            index = _to_all_gpus(index, spec.gpu_fp16)
        _set_nprobe(index, nprobe, on_gpu)
    starts = range(0, size, _ADD_CHUNK)
    for start in tqdm(starts, desc="index", unit="chunk", disable=not progress or len(starts) < 2):
        index.add(np.ascontiguousarray(array[start : start + _ADD_CHUNK], dtype=np.float32))
    return index


def index_on_gpu(index: faiss.Index) -> bool:
    """Whether `index` lives on GPUs (one GPU index, or replicas over several)."""
    name = type(index).__name__
    return name.startswith("Gpu") or name in ("IndexReplicas", "IndexShards")


def describe_index(index: faiss.Index) -> str:
    """A short human-readable description, e.g. 'IndexIVFFlat(nlist=64, nprobe=8) on CPU'."""
    if isinstance(index, BankSearch):
        how = (
            "faiss.knn on the bank"
            if index.direct
            else f"faiss.knn on {index.block_rows}-row blocks"
        )
        return f"exact search ({how}, no copy) on CPU"
    faiss = import_faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
        detail = f"(nlist={ivf.nlist}, nprobe={ivf.nprobe})"
    except (RuntimeError, TypeError):  # not an IVF index, or a GPU one FAISS cannot unwrap
        detail = ""
    return f"{type(index).__name__}{detail} on {'GPU' if index_on_gpu(index) else 'CPU'}"


# ---------------------------------------------------------------------------------- search
def search(
    index: faiss.Index | BankSearch,
    queries: Features,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    desc: str = "search",
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, sims [n, k], ids [n, k])`` for consecutive chunks of `queries`.

    Neighbours are sorted by decreasing similarity; FAISS pads with id -1 (similarity -inf)
    when an approximate index finds fewer than k.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if k > index.ntotal:
        raise ValueError(f"k={k} is larger than the training bank ({index.ntotal} features)")
    if k > MAX_GPU_K and index_on_gpu(index):
        raise ValueError(f"FAISS GPU indexes return at most {MAX_GPU_K} neighbours, k={k}")
    array = as_numpy(queries)
    total = array.shape[0]
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, total, chunk_size):
            chunk = np.ascontiguousarray(array[start : start + chunk_size], dtype=np.float32)
            sims, ids = index.search(chunk, k)
            bar.update(chunk.shape[0])
            yield start, sims, ids


def vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores [n, C]: DINO's exp(sim / T) vote, normalised to sum to 1 per query.

    ``neighbour_labels`` [n, k] may hold -1 for missing neighbours; they get no weight.
    """
    valid = neighbour_labels >= 0
    logits = (sims.float() / temperature).masked_fill(~valid, float("-inf"))
    # The max-shifted softmax is DINO's weights divided by their sum: overflow-free.
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a row with no neighbour -> 0
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float32, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels.clamp_min(0).long(), weights)


def _neighbour_labels(train_labels: torch.Tensor, ids: np.ndarray) -> torch.Tensor:
    ids_t = torch.from_numpy(ids)
    labels = train_labels[ids_t.clamp_min(0)]
    return labels.masked_fill(ids_t < 0, -1)


def _prepare(
    train_features: Features | None,
    train_labels: Features,
    query_features: Features,
    num_classes: int | None,
    index: faiss.Index | IndexSpec | None,
    progress: bool,
) -> tuple[faiss.Index, torch.Tensor, np.ndarray, int]:
    """Checked inputs: (index over the bank, train labels, queries, num_classes)."""
    labels = as_numpy(train_labels)
    queries = as_numpy(query_features)
    if index is None or isinstance(index, IndexSpec):
        if train_features is None:
            raise ValueError("train_features are needed unless a built index is given")
        bank = as_numpy(train_features)
        check_features("training features", bank)
        built = build_index(bank, index, progress=progress)
    else:
        built = index
        if train_features is not None and len(train_features) != built.ntotal:
            raise ValueError(
                f"the index holds {built.ntotal} features, the bank {len(train_features)}"
            )
    check_features("query features", queries, dim=built.d)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_labels("train labels", labels, built.ntotal, num_classes)
    return built, torch.from_numpy(labels.astype(np.int64)), queries, num_classes


def knn_predict(
    train_features: Features | None,
    train_labels: Features,
    query_features: Features,
    k: int,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    index: faiss.Index | IndexSpec | None = None,
    progress: bool = False,
) -> Features:
    """Class scores [Q, C] of DINO's weighted k-NN vote (see the module docstring).

    Features are [N, D] / [Q, D], already L2-normalised, numpy (memory maps welcome) or torch.
    The result is float32, of the same kind as `query_features`: a numpy array, or a torch
    tensor on the queries' device. Rows sum to 1; argmax is DINO's prediction.

    `index` is a FAISS index already holding `train_features` (reused as is; then
    `train_features` may be None), an :class:`IndexSpec` to build, or None for an exact one.
    `num_classes` defaults to max(train_labels) + 1.
    """
    temperature = check_temperature(temperature)
    built, labels, queries, num_classes = _prepare(
        train_features, train_labels, query_features, num_classes, index, progress
    )
    (k,) = check_k([k], built.ntotal)
    scores = torch.empty(queries.shape[0], num_classes, dtype=torch.float32)
    for start, sims, ids in search(built, queries, k, chunk_size=chunk_size, progress=progress):
        chunk = vote(
            torch.from_numpy(sims), _neighbour_labels(labels, ids), num_classes, temperature
        )
        scores[start : start + chunk.shape[0]] = chunk
    if isinstance(query_features, torch.Tensor):
        return scores.to(query_features.device)
    return scores.numpy()


@dataclass(frozen=True)
class KnnAccuracy:
    """Top-1 / top-5 accuracy (percent) of the k-NN vote for one k."""

    k: int
    top1: float
    top5: float


def count_hits(scores: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of class scores [n, C] against labels [n].

    Only classes that received votes count, so with k < 5 neighbours top-5 looks at the k
    voted classes, as DINO's ``min(5, k)`` does, and zero-score ties never score a hit.
    """
    values, predicted = scores.topk(min(5, scores.shape[1]), dim=1)
    hit = (predicted == targets[:, None]) & (values > 0)
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def knn_evaluate(
    train_features: Features | None,
    train_labels: Features,
    query_features: Features,
    query_labels: Features,
    ks: Sequence[int],
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    index: faiss.Index | IndexSpec | None = None,
    progress: bool = False,
) -> dict[int, KnnAccuracy]:
    """Top-1/top-5 accuracy of the weighted k-NN vote for every k, from ONE search at max(k).

    Arguments as :func:`knn_predict`; `query_labels` [Q] are the true classes.
    """
    temperature = check_temperature(temperature)
    built, labels, queries, num_classes = _prepare(
        train_features, train_labels, query_features, num_classes, index, progress
    )
    ks = check_k(ks, built.ntotal)
    targets_all = as_numpy(query_labels)
    check_labels("query labels", targets_all, queries.shape[0], num_classes)
    targets_all = torch.from_numpy(targets_all.astype(np.int64))
    hits = {k: [0, 0] for k in ks}
    for start, sims, ids in search(
        built, queries, ks[-1], chunk_size=chunk_size, progress=progress
    ):
        sims_t, neighbours = torch.from_numpy(sims), _neighbour_labels(labels, ids)
        targets = targets_all[start : start + sims.shape[0]]
        for k in ks:  # sorted neighbours: the k nearest are a prefix of the max(k) nearest
            top1, top5 = count_hits(
                vote(sims_t[:, :k], neighbours[:, :k], num_classes, temperature), targets
            )
            hits[k][0] += top1
            hits[k][1] += top5
    total = queries.shape[0]
    return {
        k: KnnAccuracy(k, 100.0 * h1 / total, 100.0 * h5 / total) for k, (h1, h5) in hits.items()
    }


# ---------------------------------------------------------------------------------- recall
def exact_neighbours(
    bank: Features, queries: Features, k: int, *, block_rows: int = BANK_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner-product neighbours (sims, ids), scanning the bank block by block.

    Memory: one float32 bank block plus the queries' results, never a second whole bank.
    """
    bank_np = as_numpy(bank)
    check_k([k], bank_np.shape[0])
    searcher = BankSearch(bank_np, block_rows=block_rows)
    searcher.direct = False  # always the block scan: the reference the recall test relies on
    return searcher.search(as_numpy(queries), k)


def neighbour_recall(
    approx_ids: np.ndarray, exact_ids: np.ndarray, ks: Sequence[int]
) -> dict[int, float]:
    """recall@k: mean share of the exact k nearest neighbours that the approximate search found.

    Both id arrays are [Q, >= max(k)], sorted by decreasing similarity.
    """
    recall = {}
    for k in sorted(set(ks)):
        found = [
            len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approx_ids, exact_ids, strict=True)
        ]
        recall[k] = float(np.mean(found)) / k
    return recall


def index_recall(
    index: faiss.Index,
    bank: Features,
    queries: Features,
    ks: Sequence[int],
    *,
    max_queries: int | None = 1000,
    seed: int = 0,
) -> dict[int, float]:
    """recall@k of `index` against an exact search, on up to `max_queries` random queries."""
    queries_np = as_numpy(queries)
    ks = check_k(ks, index.ntotal)
    rows = np.arange(queries_np.shape[0])
    if max_queries is not None and max_queries < rows.size:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_queries, replace=False))
    subset = np.ascontiguousarray(queries_np[rows], dtype=np.float32)
    _, approx = index.search(subset, ks[-1])
    _, exact = exact_neighbours(bank, subset, ks[-1])
    return neighbour_recall(approx, exact, ks)


def accuracies_to_json(accuracies: Mapping[int, KnnAccuracy]) -> dict[str, dict[str, float]]:
    """{"k": {"top1": ..., "top5": ...}} with string keys, for JSON."""
    return {str(k): {"top1": a.top1, "top5": a.top5} for k, a in sorted(accuracies.items())}
