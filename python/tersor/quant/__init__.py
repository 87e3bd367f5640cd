"""Weight quantizers with lattice and additive codebooks (issue 4: QuIP# E8P12, AQLM)."""

from .e8p12 import E8P12_ABS, e8p12_codebook, e8p12_decode, e8p12_nearest
from .quipsharp import pack_qidxs_e8p, unpack_qidxs_e8p

__all__ = ["E8P12_ABS", "e8p12_codebook", "e8p12_decode", "e8p12_nearest", "pack_qidxs_e8p", "unpack_qidxs_e8p"]
