"""Test helper: quantize a transformers Llama with tersor's QuIP# quantizer and write it in QuIP#'s checkpoint
layout (fused qkv_proj / upgate_proj with fuse_scales, fp16 SU/SV, Wscale fused into SV or kept as the
legacy key), plus the tersor-quantized source model to compare against. Used by tests/test_quipsharp_ckpt.py
(and usable by the from_pretrained tests)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tersor.nn import E8PLinear
from tersor.quant import quipsharp

FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("upgate_proj", ("up_proj", "gate_proj"))}
SINGLE = {"self_attn": ("o_proj",), "mlp": ("down_proj",)}


def _quantize(w: torch.Tensor, bits: int, seed: int, legacy_wscale: bool) -> dict[str, torch.Tensor]:
    st = quipsharp.quantize_e8p(w.float(), bits=bits, seed=seed)
    out = {"Qidxs": st["Qidxs"], "SU": st["SU"].half(), "codebook_id": st["codebook_id"]}
    if legacy_wscale:
        out["SV"] = st["SV"].half()
        out["Wscale"] = st["Wscale"].half()
    else:  # QuIP#'s current models fuse Wscale into SV
        out["SV"] = (st["SV"].float() * st["Wscale"]).half()
    return out


def _tersor_layer(st: dict[str, torch.Tensor], hadamard: str = "tersor") -> E8PLinear:
    # The same tensors in a tersor layer: the "tersor-quantized source". hadamard="tersor" (tersor's own H_K)
    # or "quipsharp" (QuIP#'s shipped H_K, what a K*2^k QuIP# checkpoint means).
    return E8PLinear({"Qidxs": st["Qidxs"], "SU": st["SU"].float(), "SV": st["SV"].float(),
                      "Wscale": st.get("Wscale", torch.ones(())).float(), "codebook_id": st["codebook_id"]},
                     hadamard=hadamard)


def write_quipsharp(model: nn.Module, bits: int = 2, seed: int = 0, hadamard: str = "tersor"):
    """``(state_dict, quant_config, source)``: ``model``'s weights in QuIP#'s layout (the input is not modified)
    and a copy of ``model`` computing exactly what those tensors mean with the ``hadamard`` transform (tersor's
    own H_K, or QuIP#'s): E8PLinear for o_proj / down_proj, dense fuse_scales * dequantized rows for the fused
    parts."""
    source = copy.deepcopy(model)
    sd = {}
    plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for li, block in enumerate(source.model.layers):
        for sub, (fused_name, parts) in FUSED.items():
            parent = getattr(block, sub)
            prefix = f"model.layers.{li}.{sub}"
            ws = [getattr(parent, p).weight.detach().float() for p in parts]
            rms = [w.square().mean().sqrt() for w in ws]
            st = _quantize(torch.cat([w / r for w, r in zip(ws, rms)]), bits, seed + li, legacy_wscale=False)
            st["fuse_scales"] = torch.stack(rms).half()
            for k, v in st.items():
                sd[f"{prefix}.{fused_name}.{k}"] = v
            dense = _tersor_layer(st, hadamard).dequantize()
            start = 0
            for i, p in enumerate(parts):
                lin = getattr(parent, p)
                rows = dense[start:start + lin.out_features] * st["fuse_scales"][i].float()
                start += lin.out_features
                with torch.no_grad():
                    lin.weight.copy_(rows)
                del plain[f"{prefix}.{p}.weight"]
        for sub, names in SINGLE.items():
            parent = getattr(block, sub)
            prefix = f"model.layers.{li}.{sub}"
            for j, name in enumerate(names):
                st = _quantize(getattr(parent, name).weight.detach(), bits, seed + 100 + li, legacy_wscale=True)
                for k, v in st.items():
                    sd[f"{prefix}.{name}.{k}"] = v
                setattr(parent, name, _tersor_layer(st, hadamard))
                del plain[f"{prefix}.{name}.weight"]
    sd.update(plain)
    quant_config = {"quant_method": "quip#", "quip_params": {
        "codebook": {2: "E8P12", 3: "E8P12RVQ3B", 4: "E8P12RVQ4B"}[bits], "codebook_version": 1, "codesz": 8,
        "idx_dtype": "torch.int64", "lora_rank": 0, "rescale_WH": False, "resid_scale_override": -1,
        "model_version": 1, "fused": True}}
    return sd, quant_config, source


def tiny_llama(intermediate_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), cfg
