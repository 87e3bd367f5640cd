"""Drop-in ``nn.Module`` replacements backed by tersor ops (one module per family)."""

from .compressed_linear import CompressedLinear, compress_linears

__all__ = ["CompressedLinear", "compress_linears"]
