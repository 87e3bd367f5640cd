"""Independent pure-PyTorch references (float64), shared by tests. Nothing here calls tersor."""

import numpy as np
import torch


def sylvester(n: int) -> torch.Tensor:
    """Explicit n x n Sylvester Hadamard matrix (natural order), float64, entries +-1."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(base, h)
    assert h.shape[0] == n, "n must be a power of two"
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform over the last dim in float64 (reshape-based, O(n log n))."""
    x = x.to(torch.float64)
    lead, n = x.shape[:-1], x.shape[-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
        h *= 2
    return y.reshape(*lead, n)


def hadamard(x: torch.Tensor, had_k: np.ndarray | None, transpose: bool = False) -> torch.Tensor:
    """Unnormalised (H_K (x) H_m) x over the last dim, float64; had_k None means K = 1."""
    x = x.to(torch.float64)
    n = x.shape[-1]
    if had_k is None:
        return fwht(x)
    k = had_k.shape[0]
    hk = torch.from_numpy(np.asarray(had_k, dtype=np.float64))
    if transpose:
        hk = hk.T
    t = fwht(x.reshape(*x.shape[:-1], k, n // k))
    return torch.einsum("ab,...bm->...am", hk, t).reshape(x.shape)
