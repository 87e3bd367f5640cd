"""Drop-in ``nn.Module`` replacements backed by tersor ops (one module per family)."""

from .compressed_linear import CompressedLinear, compress_linears
from .aqlm_linear import AQLMLinear
from .e8p_linear import E8PLinear
from .sage_attention import SageAttention
from .sparse_linear import SparseLinear

__all__ = ["AQLMLinear", "CompressedLinear", "E8PLinear", "SageAttention", "SparseLinear", "compress_linears"]
