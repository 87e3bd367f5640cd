"""Structured sparsity: 2:4 semi-structured weights (``prune_2_4``, ``compress_2_4``, ``linear_2_4``) and
block-sparse BSR weights (``prune_blocks``, ``to_bsr``, ``bsr_linear``; module ``tersor.sparse.bsr``).
"""

from .bsr import BSRWeight, bsr_linear, load_bsr, prune_blocks, to_bsr
from .semi_structured import (FORMAT_VERSION, Sparse24Weight, compress_2_4, decompress_2_4, is_2_4, linear_2_4,
                              load_2_4, prune_2_4)

__all__ = ["FORMAT_VERSION", "Sparse24Weight", "compress_2_4", "decompress_2_4", "is_2_4", "linear_2_4", "load_2_4",
           "prune_2_4", "BSRWeight", "bsr_linear", "load_bsr", "prune_blocks", "to_bsr"]
