"""Weight quantizers with lattice and additive codebooks (issue 4: QuIP# E8P12, AQLM)."""

from .e8p12 import E8P12_ABS, e8p12_codebook, e8p12_decode, e8p12_nearest

__all__ = ["E8P12_ABS", "e8p12_codebook", "e8p12_decode", "e8p12_nearest"]
