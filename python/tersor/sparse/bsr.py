"""Block-sparse (BSR) weights: ``to_bsr`` / :class:`BSRWeight` and ``bsr_linear`` (``x @ Wᵀ + bias``).

Format (docs/formats.md, "BSR v1"): ``W [N, K]`` cut into ``bs x bs`` blocks (``bs`` in 16, 32, 64), the
all-zero blocks dropped; ``crow_indices`` int32 ``[N/bs + 1]``, ``col_indices`` int32 ``[nnz_blocks]``
(ascending within a block row), ``values [nnz_blocks, bs, bs]`` (W's dtype, row-major blocks) and
``schedule`` int32, the CUDA kernel's work list (:func:`bsr_schedule`). :func:`load_bsr` is the one
validator/loader of the format.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch

from .. import ops as _ops  # also registers the fake kernels

BSR_FORMAT_VERSION = 1
BLOCKSIZES = (16, 32, 64)


def default_chunk_blocks(blocksize: int) -> int:
    """Blocks per split work item: 32 KiB of 16-bit weights (twin of ``bsr_default_chunk_blocks``)."""
    return 16384 // (blocksize * blocksize)


def bsr_schedule(crow_indices: torch.Tensor, blocksize: int, chunk_blocks: Optional[int] = None) -> torch.Tensor:
    """The CUDA kernel's work list for a BSR row structure (int32, 1-d, CPU; layout in csrc/sparse/bsr_format.h).

    ``[row items: Mb x 4][split items: S x 4][partial_ptr: Mb + 1]``; an item is ``(block_row, first, end,
    slot)``. Row items cover each block row whole, longest rows first (used for many tokens). Split items cut
    rows into chunks of at most ``chunk_blocks`` blocks (used for few tokens); a row cut into several chunks
    writes fp32 partials to slots ``partial_ptr[r] .. partial_ptr[r+1]`` that a second pass sums in order, so
    results are deterministic. A row that fits one chunk (or is empty) has one item with slot -1.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    chunk = default_chunk_blocks(blocksize) if chunk_blocks is None else int(chunk_blocks)
    if chunk < 1:
        raise ValueError(f"chunk_blocks must be positive, got {chunk}")
    crow = crow_indices.detach().to("cpu", torch.int64)
    mb = crow.numel() - 1
    nnz = crow[1:] - crow[:-1]
    order = torch.sort(nnz, descending=True, stable=True).indices
    row_items = torch.stack([order, crow[order], crow[order + 1], torch.full_like(order, -1)], dim=1)
    n_chunks = ((nnz + chunk - 1) // chunk).clamp(min=1)
    partials = torch.where(n_chunks > 1, n_chunks, torch.zeros_like(n_chunks))
    partial_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), partials.cumsum(0)])
    item_row = torch.repeat_interleave(torch.arange(mb), n_chunks)
    first_item = torch.cat([torch.zeros(1, dtype=torch.int64), n_chunks.cumsum(0)[:-1]])
    k = torch.arange(item_row.numel()) - first_item[item_row]
    begin = crow[item_row] + k * chunk
    end = torch.minimum(begin + chunk, crow[item_row + 1])
    slot = torch.where(n_chunks[item_row] > 1, partial_ptr[item_row] + k, torch.full_like(k, -1))
    split_items = torch.stack([item_row, begin, end, slot], dim=1)
    return torch.cat([row_items.reshape(-1), split_items.reshape(-1), partial_ptr]).to(torch.int32)


@dataclass(frozen=True)
class BSRWeight:
    """A block-sparse weight ``[N, K]`` (BSR v1). Build with :func:`to_bsr` / :meth:`from_dense`, load
    with :func:`load_bsr`, multiply with :func:`bsr_linear`."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    schedule: torch.Tensor
    shape: tuple[int, int]

    @property
    def blocksize(self) -> int:
        return int(self.values.shape[1])

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of the blocks that are stored."""
        n, k = self.shape
        return self.nnz_blocks * self.blocksize**2 / max(1, n * k)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @classmethod
    def from_dense(cls, W: torch.Tensor, blocksize: int = 64, chunk_blocks: Optional[int] = None) -> "BSRWeight":
        return to_bsr(W, blocksize, chunk_blocks=chunk_blocks)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight (zeros where no block is stored)."""
        n, k = self.shape
        bs = self.blocksize
        mb, kb = n // bs, k // bs
        crow = self.crow_indices.to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(mb, device=crow.device), crow[1:] - crow[:-1],
                                       output_size=self.nnz_blocks)
        blocks = self.values.new_zeros((mb, kb, bs, bs))
        blocks[rows.to(self.device), self.col_indices.to(torch.int64)] = self.values
        return blocks.permute(0, 2, 1, 3).reshape(n, k)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "BSRWeight":
        """Moves all tensors to ``device``; ``dtype`` converts the values only."""
        return BSRWeight(self.crow_indices.to(device), self.col_indices.to(device),
                         self.values.to(device=device, dtype=dtype), self.schedule.to(device), self.shape)

    def state_dict(self) -> dict:
        """Plain tensors + ints (for ``torch.save``); :func:`load_bsr` reads it back."""
        return {"format": "tersor.bsr", "version": BSR_FORMAT_VERSION, "shape": list(self.shape),
                "crow_indices": self.crow_indices, "col_indices": self.col_indices, "values": self.values,
                "schedule": self.schedule}


def load_bsr(state: dict) -> BSRWeight:
    """The validator/loader of BSR v1: checks version, shapes, dtypes and every index (crow non-decreasing from
    0 to nnz_blocks, columns in range and ascending within a row, the schedule exactly covering the rows),
    raising ``ValueError``/``TypeError``; returns the weight on the device its tensors are on."""
    if not isinstance(state, dict):
        raise TypeError(f"load_bsr: expected a state dict, got {type(state).__name__}")
    if state.get("format") != "tersor.bsr" or state.get("version") != BSR_FORMAT_VERSION:
        raise ValueError(f"not a tersor BSR v{BSR_FORMAT_VERSION} state: format={state.get('format')!r} "
                         f"version={state.get('version')!r}")
    missing = [key for key in ("shape", "crow_indices", "col_indices", "values", "schedule") if key not in state]
    if missing:
        raise ValueError(f"BSR state has no {', '.join(map(repr, missing))} (docs/formats.md, BSR v1)")
    shape = state["shape"]
    try:
        n, k = (operator.index(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"BSR state: shape must be [N, K] (two ints), got {shape!r:.100}") from None
    crow, col, values, schedule = (state[key] for key in ("crow_indices", "col_indices", "values", "schedule"))
    for key, t in zip(("crow_indices", "col_indices", "values", "schedule"), (crow, col, values, schedule)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"BSR state: {key} must be a tensor, got {type(t).__name__}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"BSR values must be [nnz_blocks, bs, bs], got {tuple(values.shape)}")
    bs = int(values.shape[1])
    if bs not in BLOCKSIZES:
        raise ValueError(f"BSR blocksize must be one of {BLOCKSIZES}, got {bs}")
    if n <= 0 or k <= 0 or n % bs or k % bs:
        raise ValueError(f"BSR shape {(n, k)} is not a positive multiple of the blocksize {bs}")
    if n >= 2**63 or k >= 2**63:  # the ops take int64 sizes (and refuse weights past int32 indexing)
        raise ValueError(f"BSR shape {(n, k)} is outside int64")
    if crow.numel() != n // bs + 1:
        raise ValueError(f"crow_indices has {crow.numel()} entries, expected {n // bs + 1}")
    # The C++ check (metadata, index ranges, schedule coverage), then column order within rows.
    # (values' data is never read: a zero-stride CPU stand-in carries its shape and dtype)
    values_meta = torch.empty_strided(tuple(values.shape), (0, 0, 0), dtype=values.dtype)
    _ops.lib._bsr_check(crow.cpu(), col.cpu(), values_meta, schedule.cpu(), k)
    c64, r64 = col.cpu().to(torch.int64), crow.cpu().to(torch.int64)
    if c64.numel() > 1:
        same_row = torch.repeat_interleave(torch.arange(n // bs), r64[1:] - r64[:-1])
        bad = (same_row[1:] == same_row[:-1]) & (c64[1:] <= c64[:-1])
        if bool(bad.any()):
            raise ValueError("col_indices must be strictly ascending within each block row")
    return BSRWeight(crow, col, values, schedule, (n, k))


def to_bsr(W: torch.Tensor, blocksize: Optional[int] = None, chunk_blocks: Optional[int] = None) -> BSRWeight:
    """``W [N, K]`` (dense, or a torch sparse BSR tensor from ``W.to_sparse_bsr(bs)``) as a :class:`BSRWeight`
    with ``bs x bs`` blocks (default 64, or the BSR tensor's own blocksize), all-zero blocks dropped. ``N`` and
    ``K`` must be multiples of the blocksize. ``chunk_blocks`` sets the split items' length (see
    :func:`bsr_schedule`)."""
    if W.layout == torch.sparse_bsr:
        own = tuple(W.values().shape[1:])
        if blocksize is None or own == (blocksize, blocksize):
            if own[0] != own[1]:
                raise ValueError(f"only square blocks are supported, got {own}")
            n, k = W.shape
            bs = own[0]
            _check_dims(n, k, bs)
            values = W.values()
            keep = values.reshape(values.shape[0], -1).ne(0).any(dim=1)
            crow = W.crow_indices().to(torch.int64)
            rows = torch.repeat_interleave(torch.arange(n // bs, device=crow.device), crow[1:] - crow[:-1],
                                           output_size=values.shape[0])
            kept_per_row = torch.zeros(n // bs, dtype=torch.int64, device=crow.device).index_add_(
                0, rows, keep.to(torch.int64))
            new_crow = torch.cat([kept_per_row.new_zeros(1), kept_per_row.cumsum(0)])
            return _make(new_crow, W.col_indices()[keep], values[keep], (n, k), chunk_blocks)
        W = W.to_dense()
    if W.layout != torch.strided:
        raise ValueError(f"to_bsr takes a dense or sparse-BSR tensor, got layout {W.layout}")
    bs = 64 if blocksize is None else int(blocksize)
    if W.dim() != 2:
        raise ValueError(f"to_bsr: W must be 2-d, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"to_bsr: W must be floating point, got {W.dtype}")
    n, k = W.shape
    _check_dims(n, k, bs)
    blocks = W.detach().reshape(n // bs, bs, k // bs, bs).transpose(1, 2)  # [Mb, Kb, bs, bs]
    keep = blocks.ne(0).any(dim=3).any(dim=2)  # [Mb, Kb]
    crow = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.sum(1).cumsum(0)])
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: columns ascending within a row
    return _make(crow, cols, blocks[rows, cols].contiguous(), (n, k), chunk_blocks)


def prune_blocks(W: torch.Tensor, blocksize: int = 64, density: float = 0.1, method: str = "magnitude",
                 act_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A copy of ``W [N, K]`` keeping the ``round(density * n_blocks)`` ``bs x bs`` blocks of highest score (at
    least one) and zeroing the others, ready for :func:`to_bsr`:

    * ``method="magnitude"``: score = the block's squared Frobenius norm ``sum w^2``;
    * ``method="wanda"``: score = ``sum (|w| * act_norm[k])^2`` (Wanda's ``|w| * ||x_k||`` aggregated over the
      block), ``act_norm [K]`` the per-input-channel L2 norms of calibration activations.

    One budget for the whole matrix (rows may keep different numbers of blocks). Scores are float32; **ties**
    keep the block that comes first in row-major block order (stable sort), so the result is deterministic.
    """
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"prune_blocks: W must be a floating-point tensor, got {getattr(W, 'dtype', type(W))}")
    if W.dim() != 2:
        raise ValueError(f"prune_blocks: W must be 2-d [out, in], got shape {tuple(W.shape)}")
    n, k = W.shape
    bs = int(blocksize)
    _check_dims(n, k, bs)
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"prune_blocks: density must be in (0, 1], got {density}")
    score = W.detach().float()
    if method == "magnitude":
        if act_norm is not None:
            raise ValueError("prune_blocks: act_norm is only used by method='wanda'")
    elif method == "wanda":
        if act_norm is None or act_norm.dim() != 1 or act_norm.shape[0] != k:
            raise ValueError(f"prune_blocks: method='wanda' needs act_norm of shape [{k}]")
        a = act_norm.detach().to(device=W.device, dtype=torch.float32)
        if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
            raise ValueError("prune_blocks: act_norm must be finite and non-negative")
        score = score * a
    else:
        raise ValueError(f"prune_blocks: method must be 'magnitude' or 'wanda', got {method!r}")
    block_score = score.square().reshape(n // bs, bs, k // bs, bs).sum(dim=(1, 3)).reshape(-1)
    n_keep = max(1, round(float(density) * block_score.numel()))
    order = torch.sort(block_score, descending=True, stable=True).indices
    keep = torch.zeros_like(block_score, dtype=torch.bool).scatter_(0, order[:n_keep], True)
    mask = keep.reshape(n // bs, 1, k // bs, 1).expand(n // bs, bs, k // bs, bs).reshape(n, k)
    return torch.where(mask, W.detach(), torch.zeros((), dtype=W.dtype, device=W.device))


def _check_dims(n, k, bs):
    if bs not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {bs}")
    if n <= 0 or k <= 0 or n % bs or k % bs:
        raise ValueError(f"W's shape {(n, k)} must be positive multiples of the blocksize {bs}")


def _make(crow, cols, values, shape, chunk_blocks):
    bs = int(values.shape[1])
    device = values.device
    crow32 = crow.to(device=device, dtype=torch.int32)
    schedule = bsr_schedule(crow, bs, chunk_blocks).to(device)
    return BSRWeight(crow32, cols.to(device=device, dtype=torch.int32), values.contiguous(), schedule,
                     (int(shape[0]), int(shape[1])))


def bsr_linear(x: torch.Tensor, bsr: BSRWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a :class:`BSRWeight` ``W [N, K]`` and ``x [..., K]`` of W's dtype (float32,
    float16, bfloat16): fp32 accumulation, rounded once to x's dtype; empty block rows give ``bias`` (or 0).
    CUDA: a tensor-core kernel (fp16/bf16) that skips the absent blocks; deterministic. The CUDA op reads the
    index arrays on the host on every call (one stream sync) to validate them before the kernel uses them; inside
    a CUDA-graph capture it accepts only index tensors an earlier uncaptured call validated (warm up first)."""
    return _ops.lib.bsr_linear(x, bsr.crow_indices, bsr.col_indices, bsr.values, bsr.schedule, bsr.shape[1], bias)
