"""Whole-model API: :func:`quantize_` (compress a model's linears in place), :func:`save` / :func:`load`
(tersor checkpoint v1) and one config class per method. Re-exported as ``tersor.quantize_`` etc.; see
docs/usage.md."""

from .checkpoint import load, save
from .configs import AQLMConfig, BlockSparseConfig, E8PConfig, LosslessConfig, SageAttentionConfig, Sparse24Config
from .dequantize import dequantize_
from .finetune import FinetuneConfig
from .quantize import LayerReport, QuantizeReport, find_block_list, quantize_
from .quipsharp_ckpt import load_quipsharp_layers

__all__ = ["AQLMConfig", "BlockSparseConfig", "E8PConfig", "FinetuneConfig", "LayerReport", "dequantize_", "LosslessConfig", "QuantizeReport",
           "SageAttentionConfig", "Sparse24Config", "find_block_list", "load", "load_quipsharp_layers", "quantize_",
           "save"]
