"""Weight quantizers with lattice and additive codebooks (issue 4: QuIP# E8P12, AQLM)."""

from .aqlm import aqlm_code_indices, aqlm_dequantize_reference, aqlm_pack_codes, quantize_aqlm
from .e8p12 import E8P12_ABS, e8p12_codebook, e8p12_decode, e8p12_nearest
from .quipsharp import dequantize_e8p, pack_qidxs_e8p, quantize_e8p, rht, unpack_qidxs_e8p, unrht

__all__ = ["E8P12_ABS", "e8p12_codebook", "e8p12_decode", "e8p12_nearest", "pack_qidxs_e8p", "unpack_qidxs_e8p", "quantize_e8p", "dequantize_e8p", "rht", "unrht",
           "aqlm_dequantize_reference", "aqlm_code_indices", "aqlm_pack_codes", "quantize_aqlm"]
