"""QuIP#'s own Hadamard matrices ``H_K`` (its K * 2^k sizes) and QuIP#'s randomized-Hadamard rotation.

QuIP# rotates a dimension ``n = K * 2^k`` (K in 12, 20, ..., 172) with ``U_n = (H_K (x) S_{2^k}) / sqrt(n)``:
``S`` is the Sylvester matrix in natural order and ``H_K`` one of Sloane's published Hadamard matrices,
hard-coded in QuIP#'s ``lib/utils/matmul_had.py`` (``get_hadK``). The index is ``i = a * 2^k + b`` (the K
axis is the slow one), which is also tersor.hadamard_transform's convention, but tersor's own ``H_K``
(``scripts/gen_hadamard_tables.py``) are different matrices. A QuIP# checkpoint of such a size therefore
needs *QuIP#'s* ``H_K``, exactly: same rows, same order, same signs.

Where the matrices come from, in this order:

1. :func:`register_quipsharp_hadamard` (for a user who has QuIP#'s matrices, e.g. from its ``get_hadK``);
2. ``tersor/data/quipsharp_hadamard.json`` when it is shipped (format: docs/formats.md; written by
   ``scripts/gen_quipsharp_hadamard.py``; every matrix's sha256 is recorded there and checked at load).

tersor ships the file with QuIP#'s twelve matrices (read from quip-sharp's ``lib/utils/matmul_had.py`` at
1d8f873; docs/formats.md). Without a matrix for K, :func:`quipsharp_hadamard_k` raises
:class:`QuipSharpHadamardUnavailable` rather than substitute another one.

Which convention a state uses is part of the state (``state["hadamard"]``, docs/formats.md "An E8P state"):
``tersor.quant.dequantize_e8p`` and ``tersor.nn.E8PLinear`` apply this module's transform for ``"quipsharp"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from typing import Optional

import torch

# QuIP#'s get_hadK tries these K in this order (the first K with n % K == 0 and n / K a power of two).
QUIPSHARP_K_SIZES: tuple[int, ...] = (172, 156, 140, 124, 116, 108, 60, 52, 36, 28, 20, 12)

DATA_FORMAT = "tersor-quipsharp-hadamard"
DATA_VERSION = 1
DATA_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                         "quipsharp_hadamard.json")


class QuipSharpHadamardUnavailable(NotImplementedError, ValueError):
    """QuIP#'s ``H_K`` for this K is not available: neither registered nor shipped. A NotImplementedError
    (tersor cannot do this yet) and, for code written before it existed, a ValueError."""


_lock = threading.Lock()
_registered: dict[int, torch.Tensor] = {}
_shipped: Optional[dict[int, torch.Tensor]] = None


def quipsharp_factor(n: int) -> tuple[int, int]:
    """``(K, p)`` with ``n = K * p``, ``p`` a power of two and ``K`` the first of :data:`QUIPSHARP_K_SIZES` that
    fits (``K = 1`` when n is a power of two), as QuIP#'s ``get_hadK`` chooses; ValueError otherwise."""
    n = int(n)
    if n >= 1 and n & (n - 1) == 0:
        return 1, n
    for k in QUIPSHARP_K_SIZES:
        if n % k == 0 and (n // k) & (n // k - 1) == 0:
            return k, n // k
    raise ValueError(f"QuIP#'s Hadamard transform does not support n = {n}: it needs n = 2^k or K * 2^k with K in "
                     f"{sorted(QUIPSHARP_K_SIZES)}")


def matrix_sha256(h: torch.Tensor) -> str:
    """sha256 of the matrix as row-major int8 bytes (+1 -> 0x01, -1 -> 0xff): the hash the data file records."""
    a = h.detach().to("cpu", torch.int8).contiguous()
    return hashlib.sha256(a.numpy().tobytes()).hexdigest()


def check_hadamard(h: torch.Tensor, k: Optional[int] = None, what: str = "H") -> torch.Tensor:
    """``h`` as an fp32 CPU tensor after checking that it is a K x K matrix of +-1 with ``h h^T = K I``."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(h).__name__}")
    if h.dim() != 2 or h.shape[0] != h.shape[1] or (k is not None and h.shape[0] != k):
        want = f"[{k}, {k}]" if k is not None else "square"
        raise ValueError(f"{what} must be {want}, got shape {list(h.shape)}")
    hf = h.detach().to("cpu", torch.float64)
    if not bool(((hf == 1) | (hf == -1)).all()):
        raise ValueError(f"{what}: every entry must be +1 or -1")
    kk = hf.shape[0]
    if not torch.equal(hf @ hf.t(), kk * torch.eye(kk, dtype=torch.float64)):
        raise ValueError(f"{what} is not a Hadamard matrix (H H^T != {kk} I)")
    return hf.float()


def register_quipsharp_hadamard(k: int, h: torch.Tensor) -> None:
    """Makes ``h`` the QuIP# ``H_K`` for size K (overriding a shipped one). ``h`` must be exactly the matrix that
    QuIP#'s ``get_hadK(n)`` returns for an n with that K (the one ``matmul_hadU`` multiplies from the left);
    tersor can check that it is a +-1 Hadamard matrix of order K, not that it is QuIP#'s."""
    k = int(k)
    if k not in QUIPSHARP_K_SIZES:
        raise ValueError(f"register_quipsharp_hadamard: K = {k} is not one of QuIP#'s sizes {sorted(QUIPSHARP_K_SIZES)}")
    hf = check_hadamard(h, k, f"register_quipsharp_hadamard: H_{k}")
    with _lock:
        _registered[k] = hf


def unregister_quipsharp_hadamard(k: int) -> None:
    """Undoes :func:`register_quipsharp_hadamard` for K (no error if none was registered)."""
    with _lock:
        _registered.pop(int(k), None)


def parse_rows(rows: list[str], k: int, what: str) -> torch.Tensor:
    """``+``/``-`` strings (one per row, Sloane's text form) -> int8 [K, K]."""
    if len(rows) != k or any(len(r) != k or set(r) - {"+", "-"} for r in rows):
        raise ValueError(f"{what}: expected {k} rows of {k} '+'/'-' characters")
    return torch.tensor([[1 if c == "+" else -1 for c in r] for r in rows], dtype=torch.int8)


def load_data_file(path: str = DATA_FILE) -> dict[int, torch.Tensor]:
    """The matrices of a ``tersor-quipsharp-hadamard`` v1 file, each checked against its recorded sha256 and for
    ``H H^T = K I`` (ValueError naming the matrix otherwise); ``{}`` when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or doc.get("format") != DATA_FORMAT or doc.get("version") != DATA_VERSION:
        raise ValueError(f"{path}: not a {DATA_FORMAT} v{DATA_VERSION} file")
    out = {}
    for key, entry in doc.get("matrices", {}).items():
        k = int(key)
        what = f"{path}: H_{k}"
        if k not in QUIPSHARP_K_SIZES:
            raise ValueError(f"{what}: K is not one of QuIP#'s sizes")
        h = parse_rows(entry.get("rows", []), k, what)
        digest = matrix_sha256(h)
        if digest != entry.get("sha256"):
            raise ValueError(f"{what}: sha256 {digest} does not match the recorded {entry.get('sha256')}")
        out[k] = check_hadamard(h.float(), k, what)
    return out


def _shipped_matrices() -> dict[int, torch.Tensor]:
    global _shipped
    with _lock:
        if _shipped is None:
            _shipped = load_data_file()
        return _shipped


def available_quipsharp_k() -> list[int]:
    """The K whose QuIP# ``H_K`` is available (registered or shipped)."""
    with _lock:
        reg = set(_registered)
    return sorted(reg | set(_shipped_matrices()))


def quipsharp_hadamard_k(k: int) -> torch.Tensor:
    """QuIP#'s ``H_K`` (fp32 [K, K], entries +-1; a fresh copy); :class:`QuipSharpHadamardUnavailable` if this
    tersor has none for K."""
    k = int(k)
    with _lock:
        h = _registered.get(k)
    if h is None:
        h = _shipped_matrices().get(k)
    if h is None:
        raise QuipSharpHadamardUnavailable(
            f"QuIP#'s Hadamard matrix H_{k} (one of Sloane's, as QuIP#'s get_hadK returns it) is not available in "
            f"this tersor: it ships none (tersor's own H_{k} is a different matrix and would silently give a "
            f"different transform). Register QuIP#'s exact matrix with "
            f"tersor.quant.quipsharp_hadamard.register_quipsharp_hadamard({k}, H), or generate the data file with "
            f"scripts/gen_quipsharp_hadamard.py; see docs/usage.md, 'Existing QuIP# checkpoints'")
    return h.clone()


def quipsharp_hadamard(x: torch.Tensor, hk: Optional[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """QuIP#'s orthonormal rotation over the last dimension n of ``x``: ``U_n x`` (``U_n^T x`` if ``transpose``),
    ``U_n = (H_K (x) S_{n/K}) / sqrt(n)``, in fp32. ``hk``: QuIP#'s ``H_K`` ([K, K]) or None for a power of two.

    The power-of-two part is tersor.hadamard_transform on ``x.view(..., K, n/K)`` (scale ``1/sqrt(n)``, as
    QuIP#'s ``matmul_hadU`` scales inside the power-of-two transform), then a dense K x K matmul mixes the K
    sub-rows: ``K * n`` multiply-adds per row of x on top of the FWHT's ``n log2(n/K)``, i.e. for Llama's
    11008 = 172 * 64 about 1.9 M MACs per token, 4% of one 4096 x 11008 GEMV.
    """
    from ..ops import hadamard_transform

    xf = x.float()
    if hk is None:
        return hadamard_transform(xf, transpose=transpose)
    n = x.shape[-1]
    k = hk.shape[0]
    z = hadamard_transform(xf.reshape(*x.shape[:-1], k, n // k), scale=1.0 / math.sqrt(n))
    mix = hk.t() if transpose else hk
    return torch.matmul(mix.to(z.device), z).reshape(x.shape)
