from .bsr import BSRWeight, to_bsr, bsr_linear
