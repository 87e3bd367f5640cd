"""Issue 19.7 through ``tersor.from_pretrained``: AQLM's Hugging Face layout with codes stored wider than AQLM
writes them (int32/int64) loads with the logits of the int8-coded source; a wide code outside the codebook's
range is a ValueError naming the layer and ``codes``. Skips without transformers. One intra-op thread."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import tersor
from tersor.nn import AQLMLinear

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
              pytest.mark.usefixtures("one_thread")]

SOURCE = {"quant_method": "aqlm", "nbits_per_codebook": 8, "num_codebooks": 2, "in_group_size": 8,
          "out_group_size": 1, "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"]}
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def quantized():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg).eval()
    tersor.quantize_(model, tersor.AQLMConfig(2, 8, iters=1, kmeans_iters=2, beam_size=1), progress=False)
    return model


def write(model, directory, wide: dict):
    """AQLM's layout, with the codes of the layers in ``wide`` (fqn -> function of the int8 codes) replaced."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        fqn, _, name = k.rpartition(".")
        if name == "codes" and fqn in wide:
            v = wide[fqn](v)
        state[k] = v.contiguous()
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = dict(SOURCE)
    cfg["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_from_pretrained_wide_codes(quantized, tmp_path):
    ref = logits(quantized)
    wide = {"model.layers.0.self_attn.q_proj": lambda c: c.to(torch.int64),  # signed form
            "model.layers.0.mlp.down_proj": lambda c: (c.to(torch.int64) & 255),  # entry indices
            "model.layers.0.mlp.up_proj": lambda c: c.to(torch.int32),
            "model.layers.0.self_attn.o_proj": lambda c: (c.to(torch.int16) & 255)}  # 2x8 in int16
    write(quantized, tmp_path, wide)
    loaded = tersor.from_pretrained(tmp_path)
    for fqn in wide:
        layer = loaded.get_submodule(fqn)
        assert isinstance(layer, AQLMLinear) and layer.codes.dtype == torch.int8, fqn
    assert torch.equal(logits(loaded), ref)


def test_from_pretrained_refuses_out_of_range_wide_codes(quantized, tmp_path):
    def bad(c):
        c = c.to(torch.int64)
        c[0, 0, 0] = 256  # AQLM's int64 arithmetic would read entry 0: refused instead of wrapped
        return c

    write(quantized, tmp_path, {"model.layers.0.mlp.gate_proj": bad})
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.gate_proj'.*codes .*\[-128, 256\)"):
        tersor.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["header length", "truncated"])
def test_from_pretrained_damaged_safetensors_is_value_error(quantized, tmp_path, damage):
    # Issue 17: a damaged checkpoint file is the caller's data: ValueError, not safetensors' own SafetensorError
    # (from transformers' reading of the file, or from tersor's reading of the AQLM layout's headers).
    import struct

    write(quantized, tmp_path, {})
    path = os.path.join(tmp_path, "model.safetensors")
    b = bytearray(open(path, "rb").read())
    if damage == "header length":
        b[0:8] = struct.pack("<Q", len(b) * 2)
    else:
        b = b[: struct.unpack_from("<Q", b)[0] // 2]  # mid-header
    open(path, "wb").write(bytes(b))
    with pytest.raises(ValueError, match="tersor.from_pretrained: .*safetensors"):
        tersor.from_pretrained(tmp_path)
