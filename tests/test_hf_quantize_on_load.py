"""Hugging Face: quantize while loading (``from_pretrained(dense, quantization_config=TersorConfig(quantize=...))``)
and ``model.dequantize()`` / ``tersor.dequantize_`` (issue 13). A tiny random Llama made here; skips without
transformers."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import tersor
from tersor.nn import AQLMLinear, CompressedLinear, E8PLinear, SparseLinear

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
              pytest.mark.usefixtures("one_thread")]

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
AQLM = tersor.AQLMConfig(2, 8, iters=0, kmeans_iters=1, beam_size=1)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def load(d, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, **kw).eval()


@pytest.mark.parametrize("config,layer_cls", [
    (tersor.E8PConfig(2, ldlq=False), E8PLinear),
    (AQLM, AQLMLinear),
    (tersor.Sparse24Config(), SparseLinear),
    (tersor.LosslessConfig(), CompressedLinear),
], ids=["e8p2", "aqlm2x8", "2:4", "lossless"])
def test_quantize_while_loading_equals_quantize_after(dense_dir, tmp_path, config, layer_cls):
    from tersor.hf import TersorConfig

    want_model = load(dense_dir)
    tersor.quantize_(want_model, config, progress=False)
    want = logits(want_model)

    model = load(dense_dir, quantization_config=TersorConfig(quantize=config))
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_cls)
    assert torch.equal(logits(model), want)
    qc = model.config.quantization_config
    assert qc.quantize is None and len(qc.layers) == 14  # 7 linears per block; describes the compressed layers
    # ... so it saves as a pre-quantized checkpoint, which loads without re-quantizing
    model.save_pretrained(tmp_path / "q")
    again = load(tmp_path / "q")
    assert isinstance(again.model.layers[1].mlp.down_proj, layer_cls)
    assert torch.equal(logits(again), want)
    # the dict form of the config works the same (what a JSON config would carry)
    model2 = load(dense_dir, quantization_config=TersorConfig(quantize=config.to_dict()))
    assert torch.equal(logits(model2), want)


def test_quantize_while_loading_refuses_what_needs_data(dense_dir):
    from tersor.hf import TersorConfig

    with pytest.raises(ValueError, match="calibration"):
        TersorConfig(quantize=tersor.E8PConfig(2))  # ldlq=True needs Hessians
    with pytest.raises(ValueError, match="calibration"):
        TersorConfig(quantize=tersor.Sparse24Config("wanda"))
    with pytest.raises(ValueError, match="attn_implementation"):
        TersorConfig(quantize=tersor.SageAttentionConfig())
    with pytest.raises(ValueError, match="unknown config"):
        TersorConfig(quantize={"config": "NoSuchConfig"})
    with pytest.raises(ValueError, match="no field"):
        TersorConfig(quantize={"config": "E8PConfig", "bitz": 2})
    with pytest.raises(ValueError, match="not tersor-quantized"):
        load(dense_dir, quantization_config=TersorConfig())  # nothing to quantize with


@pytest.mark.parametrize("config", [tersor.E8PConfig(2, ldlq=False), AQLM, tersor.Sparse24Config(),
                                    tersor.BlockSparseConfig(32, 0.5), tersor.LosslessConfig()],
                         ids=["e8p2", "aqlm2x8", "2:4", "bsr", "lossless"])
def test_dequantize_gives_linears_with_the_same_product(dense_dir, config):
    model = load(dense_dir)
    tersor.quantize_(model, config, progress=False)
    want = logits(model)
    twin = copy.deepcopy(model)
    model.dequantize()  # transformers' own entry point -> tersor.dequantize_
    assert not any(isinstance(m, (E8PLinear, AQLMLinear, SparseLinear, CompressedLinear)) for m in model.modules())
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    got = logits(model)
    if isinstance(config, tersor.LosslessConfig):
        assert torch.equal(got, want)
    else:  # the same weights, a dense fp32 GEMM instead of the format's kernel: fp32 reassociation
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # tersor.dequantize_ directly, into another dtype
    tersor.dequantize_(twin, torch.bfloat16)
    assert twin.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_dequantize_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        tersor.dequantize_("model")
    with pytest.raises(TypeError, match="dtype"):
        tersor.dequantize_(nn.Linear(4, 4), torch.float64)
