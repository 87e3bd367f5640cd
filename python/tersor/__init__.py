"""tersor: compressed-inference kernels for PyTorch.

Every op is a ``torch.ops.tersor.*`` operator (CPU and CUDA kernels, fake kernels for torch.compile);
this package adds typed wrappers and ``nn`` drop-ins on top.
"""

import torch  # noqa: F401  -- must precede _C: the extension has no RPATH to torch's libraries

from . import _C  # noqa: F401  -- registers torch.ops.tersor.*
from . import attention, codec, nn, ops, quant, sparse
from .ops import build_info, hadamard_transform

__version__ = build_info()["version"]

from .api import (AQLMConfig, BlockSparseConfig, E8PConfig, FinetuneConfig, LosslessConfig,  # noqa: E402
                  QuantizeReport, Sparse24Config, load, quantize_, save)
from .api import SageAttentionConfig, dequantize_, load_quipsharp_layers  # noqa: E402
from . import hf  # noqa: E402  -- Hugging Face integration; never imports transformers here
from .hf import from_pretrained  # noqa: E402

hf._install()  # registers quant_method "tersor" with transformers, now or when transformers loads its quantizers
if "transformers" in __import__("sys").modules:  # already imported: make attn_implementation="tersor_sage" known
    try:
        attention.register_transformers()
    except Exception:  # noqa: BLE001 -- e.g. transformers half-imported; SageAttentionConfig registers later
        pass

__all__ = ["AQLMConfig", "BlockSparseConfig", "E8PConfig", "FinetuneConfig", "LosslessConfig", "QuantizeReport", "SageAttentionConfig",
           "Sparse24Config", "attention", "build_info", "codec", "dequantize_", "from_pretrained", "hadamard_transform", "hf", "load",
           "load_quipsharp_layers", "nn", "ops", "quant", "quantize_", "save", "sparse"]
