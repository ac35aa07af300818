"""DenseCL's pieces (Wang et al., CVPR 2021; WXinlong/DenseCL ``openselfsup/models/densecl.py``):
InfoNCE against a queue of negatives, the queue itself, and the dense correspondence.

The queue is a ring buffer of L2-normalised keys. Enqueueing gathers the keys of every rank
first (MoCo's ``concat_all_gather``) so that all ranks hold the same queue, and wraps around the
end of the buffer, so the queue length need not be a multiple of the (global) batch (MoCo and
DenseCL assert that it is).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from densedino.checks import check_temperature

__all__ = ["KeyQueue", "concat_all_gather", "dense_correspondence", "info_nce"]


def info_nce(query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """MoCo's contrastive loss ``-log(exp(q.k+ / T) / (exp(q.k+ / T) + sum_n exp(q.n / T)))``,
    averaged over the rows (DenseCL's ``ContrastiveHead``: cross-entropy with label 0).

    Args:
        query: [M, C] (L2-normalised by the caller).
        positive: [M, C], the positive key of each query row.
        negatives: [K, C], shared by every row (the queue; a detached copy is used).
        temperature: T (DenseCL: 0.2).
    """
    check_temperature(temperature, "info_nce: temperature")
    if query.ndim != 2 or query.shape != positive.shape:
        raise ValueError(
            f"info_nce: query and positive must both be [M, C], got {tuple(query.shape)} and "
            f"{tuple(positive.shape)}"
        )
    if negatives.ndim != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"info_nce: negatives must be [K, {query.shape[1]}], got {tuple(negatives.shape)}"
        )
    query, positive = query.float(), positive.float()
    # A copy: autograd keeps it for the backward pass, and the queue is updated in place
    # before that (MoCo's ``queue.clone().detach()``).
    negatives = negatives.detach().to(torch.float32, copy=True)
    l_pos = (query * positive).sum(dim=1, keepdim=True)  # [M, 1]
    l_neg = query @ negatives.t()  # [M, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


def dense_correspondence(query_feats: Tensor, key_feats: Tensor) -> Tensor:
    """For each query location, the key location whose backbone feature is most similar.

    DenseCL: ``argmax_j cos(f_q(i), f_k(j))`` on the backbone features (not the projections).

    Args:
        query_feats: [B, Nq, D] backbone features of the query view.
        key_feats: [B, Nk, D] backbone features of the key view.

    Returns:
        [B, Nq] (long) indices into the key locations.
    """
    if query_feats.ndim != 3 or key_feats.ndim != 3:
        raise ValueError(
            f"dense_correspondence: expected [B, N, D] features, got {tuple(query_feats.shape)} "
            f"and {tuple(key_feats.shape)}"
        )
    if query_feats.shape[0] != key_feats.shape[0] or query_feats.shape[2] != key_feats.shape[2]:
        raise ValueError(
            f"dense_correspondence: batch or width differ: {tuple(query_feats.shape)} vs "
            f"{tuple(key_feats.shape)}"
        )
    q = F.normalize(query_feats.detach().float(), dim=-1)
    k = F.normalize(key_feats.detach().float(), dim=-1)
    return (q @ k.transpose(1, 2)).argmax(dim=2)


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Rows of ``tensor`` [n, ...] from every rank, in rank order (no gradient).

    Ranks may hold different numbers of rows: sizes are exchanged first and rows padded to the
    largest, so the collective never mismatches. Without an initialised process group, the
    tensor itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)])


class KeyQueue(nn.Module):
    """Ring buffer of ``size`` L2-normalised keys of width ``dim`` (MoCo's queue).

    Buffers: ``keys`` [size, dim], initialised with random unit vectors as MoCo does, and
    ``ptr``, the slot the next key goes to. Both live in the state dict (checkpoint and resume).
    """

    keys: Tensor
    ptr: Tensor

    def __init__(self, dim: int, size: int = 65536) -> None:
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"KeyQueue: dim and size must be >= 1, got dim={dim}, size={size}")
        self.dim = dim
        self.size = size
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the keys [n, dim] of every rank after the pointer, wrapping around; when
        more keys than slots arrive, the last ``size`` of them are kept."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"KeyQueue.enqueue expects [n, {self.dim}], got {tuple(keys.shape)}")
        keys = concat_all_gather(keys.detach().to(self.keys.dtype))
        total = keys.shape[0]
        start = int(self.ptr)
        if total > self.size:
            start = (start + total - self.size) % self.size
            keys = keys[-self.size :]
        slots = (start + torch.arange(keys.shape[0], device=self.keys.device)) % self.size
        self.keys[slots] = keys
        self.ptr.fill_((int(self.ptr) + total) % self.size)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"
