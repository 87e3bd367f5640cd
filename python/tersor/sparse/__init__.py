"""Structured sparsity: 2:4 semi-structured weights (``prune_2_4``, ``compress_2_4``, ``linear_2_4``).

Block-sparse (BSR) weights are a separate module (``tersor.sparse.bsr``).
"""

from .semi_structured import (FORMAT_VERSION, Sparse24Weight, compress_2_4, decompress_2_4, is_2_4, linear_2_4,
                              load_2_4, prune_2_4)

__all__ = ["FORMAT_VERSION", "Sparse24Weight", "compress_2_4", "decompress_2_4", "is_2_4", "linear_2_4", "load_2_4",
           "prune_2_4"]
