"""Sample inputs for every public torch.ops.tersor operator: the registry the contract tests walk.

Adding an op means adding its cases here; tests/test_op_contract.py fails for a public op without any.
Each entry: op name -> function(device) returning a list of (args, kwargs).
"""

import pytest
import torch


def _hadamard(device):
    cases = []
    for n, dtype in [(64, torch.float32), (256, torch.float16), (12 * 8, torch.bfloat16), (1, torch.float32)]:
        x = torch.randn(3, n, device=device).to(dtype)
        cases.append(((x,), {}))
        cases.append(((x,), {"scale": 0.5, "transpose": True}))
    cases.append(((torch.randn(2, 5, 128, device=device),), {"scale": None}))
    cases.append(((torch.randn(2, 20 * 4, device=device, requires_grad=True),), {"transpose": True}))
    return cases


def _codec_decode(device):
    from tersor import codec

    cases = []
    for shape, dtype in [((64, 256), torch.bfloat16), ((1000,), torch.float32), ((3, 4, 128), torch.float16),
                         ((2,), torch.bfloat16)]:
        ct = codec.compress((torch.randn(shape) * 0.02).to(dtype)).to(device)
        cases.append(((ct.stream, ct.table, ct.header, dtype, list(shape)), {"verify": False}))
    cases.append(((ct.stream, ct.table, ct.header, ct.dtype, list(ct.shape)), {}))
    return cases


def _codec_linear(device):
    from tersor import codec

    cases = []
    for n, k, dtype, lead in [(32, 256, torch.bfloat16, (1,)), (16, 128, torch.float16, (2, 3)),
                              (8, 64, torch.float32, (5,))]:
        ct = codec.compress((torch.randn(n, k) * 0.05).to(dtype)).to(device)
        x = torch.randn(*lead, k, device=device).to(dtype)
        bias = torch.randn(n, device=device).to(dtype)
        cases.append(((x, ct.stream, ct.table, ct.header, dtype, [n, k]), {"bias": bias}))
        cases.append(((x, ct.stream, ct.table, ct.header, dtype, [n, k]), {}))
    return cases


def _e8p_state(m, n, bits, device):
    from tersor.quant import quipsharp

    g = torch.Generator().manual_seed(m * 7 + n + bits)
    return quipsharp.quantize_e8p(torch.randn(m, n, generator=g), bits=bits)["Qidxs"].to(device)


def _e8p_decode(device):
    cases = []
    for m, n, bits, dtype in [(16, 64, 2, None), (32, 128, 3, torch.float16), (16, 192, 4, torch.bfloat16)]:
        cases.append(((_e8p_state(m, n, bits, device), n), {"dtype": dtype}))
    cases.append(((_e8p_state(16, 128, 4, device), 128), {"resid_scale": 3.0}))
    return cases


def _e8p_linear(device):
    cases = []
    for m, n, bits, lead, dtype in [(16, 64, 2, (1,), torch.float32), (32, 128, 3, (2, 3), torch.float16),
                                    (16, 192, 4, (9,), torch.bfloat16), (48, 64, 2, (20,), torch.float32)]:
        x = torch.randn(*lead, n, device=device).to(dtype)
        cases.append(((x, _e8p_state(m, n, bits, device), n), {}))
    return cases


def _aqlm_state(out, inp, books, nbits, device, cb_dtype=torch.float16):
    g = torch.Generator().manual_seed(out + inp + books + nbits)
    ct = torch.int8 if nbits <= 8 else torch.int16
    codes = torch.randint(-(1 << (nbits - 1)), 1 << (nbits - 1), (out, inp // 8, books), generator=g).to(ct)
    codebooks = (torch.randn(books, 1 << nbits, 1, 8, generator=g) * 0.1).to(cb_dtype)
    scales = (torch.rand(out, 1, 1, 1, generator=g) + 0.5).to(cb_dtype)
    return codes.to(device), codebooks.to(device), scales.to(device)


def _aqlm_decode(device):
    return [((*_aqlm_state(16, 64, 2, 8, device), ), {}),
            ((*_aqlm_state(8, 32, 1, 12, device, torch.bfloat16), ), {"dtype": torch.float32})]


def _aqlm_linear(device):
    cases = []
    for out, inp, books, nbits, lead, dtype in [(16, 64, 2, 8, (1,), torch.float16), (24, 32, 1, 16, (2, 3), torch.float32),
                                                (8, 64, 3, 6, (12,), torch.bfloat16)]:
        codes, cb, sc = _aqlm_state(out, inp, books, nbits, device)
        x = torch.randn(*lead, inp, device=device).to(dtype)
        cases.append(((x, codes, cb, sc), {"bias": torch.randn(out, device=device).to(dtype)}))
        cases.append(((x, codes, cb, sc), {}))
    return cases


def _bsr_linear(device):
    from tersor.sparse import to_bsr

    cases = []
    for n, k, bs, dtype, lead in [(64, 128, 32, torch.float16, (3,)), (128, 64, 64, torch.bfloat16, (2, 40)),
                                  (32, 48, 16, torch.float32, (5,)), (64, 64, 16, torch.float16, (70,))]:
        g = torch.Generator().manual_seed(n + k + bs)
        keep = (torch.rand(n // bs, k // bs, generator=g) < 0.5).repeat_interleave(bs, 0).repeat_interleave(bs, 1)
        w = (torch.randn(n, k, generator=g) * keep).to(dtype)
        b = to_bsr(w, bs, chunk_blocks=1).to(device)
        x = torch.randn(*lead, k, device=device).to(dtype)
        args = (x, b.crow_indices, b.col_indices, b.values, b.schedule, k)
        cases.append((args, {"bias": torch.randn(n, device=device).to(dtype)}))
        cases.append((args, {}))
    return cases


def _sage_attention_fwd(device):
    from tersor import attention

    cases = []
    for (b, hq, hkv, lq, lk, d, causal), dtype, bits, pv, sk, sq, kwargs in [
        ((1, 4, 2, 70, 90, 64, True), torch.float16, 8, "fp8", True, False, {}),
        ((2, 2, 2, 33, 20, 128, False), torch.bfloat16, 4, "fp16", True, True, {}),
        ((1, 2, 2, 40, 50, 64, False), torch.bfloat16, 8, "fp16", False, True, {"cuda_kernel": "sm8x"}),
        ((1, 2, 1, 40, 40, 64, True), torch.float32, 0, "fp32", False, False, {}),
        ((1, 2, 2, 50, 30, 64, True), torch.float16, 8, "fp32", False, False, {}),
        ((1, 4, 2, 150, 200, 64, True), torch.float16, 8, "fp8", True, False, {"window_left": 70, "window_right": -1}),
        ((1, 2, 2, 60, 60, 64, False), torch.bfloat16, 8, "fp16", True, False, {"window_left": 5, "window_right": 9}),
        ((2, 2, 1, 50, 70, 64, True), torch.float16, 8, "fp16", True, False, {"key_padding_mask": "right"}),
        ((2, 2, 1, 30, 40, 64, False), torch.float32, 0, "fp32", False, False, {"attn_mask": "float"}),
    ]:
        if torch.device(device).type == "cuda":
            # Only the modes with a CUDA kernel on this device (the others raise NotImplementedError; the
            # fp32 / exact modes run on the CPU only).
            try:
                attention.cuda_path_name(torch.device(device), {8: "int8", 4: "int4", 0: "none"}[bits], pv, sq,
                                         kwargs.get("cuda_kernel", "auto"))
            except NotImplementedError:
                continue
        q = torch.randn(b, hq, lq, d, device=device).to(dtype)
        k = torch.randn(b, hkv, lk, d, device=device).to(dtype)
        v = torch.randn(b, hkv, lk, d, device=device).to(dtype)
        if kwargs.get("key_padding_mask") == "right":  # keys [0, n_b) of batch entry b are real
            kwargs = dict(kwargs, key_padding_mask=torch.arange(lk, device=device)[None, :] < torch.tensor(
                [[lk - 7 * i] for i in range(b)], device=device))
        if kwargs.get("attn_mask") == "float":  # CPU only (NotImplementedError on CUDA)
            if torch.device(device).type == "cuda":
                continue
            kwargs = dict(kwargs, attn_mask=torch.randn(1, hq, lq, lk, device=device))
        cases.append(((q, k, v, causal, d ** -0.5, bits, pv, sk, sq), kwargs))
    # block-sparse (block_mask [B, Hq or 1, ceil(Lq / 128), ceil(Lk / 128)]), with causal and GQA
    g = torch.Generator().manual_seed(0)
    for (b, hq, hkv, lq, lk, causal), mask_heads, bits, pv in [((1, 4, 2, 200, 300, True), 4, 8, "fp8"),
                                                               ((2, 2, 1, 130, 260, False), 1, 0, "fp32")]:
        if torch.device(device).type == "cuda" and bits == 0:
            continue
        q = torch.randn(b, hq, lq, 64, device=device).half()
        k = torch.randn(b, hkv, lk, 64, device=device).half()
        v = torch.randn(b, hkv, lk, 64, device=device).half()
        mask = (torch.rand(b, mask_heads, -(-lq // 128), -(-lk // 128), generator=g) < 0.6).to(device)
        cases.append(((q, k, v, causal, 0.125, bits, pv, True, False), {"block_mask": mask}))
    return cases


def _xattention_mask(device):
    cases = []
    for (b, hq, hkv, lq, lk, d), dtype, block, stride, thr, causal in [
        ((1, 4, 2, 300, 260, 64), torch.float16, 128, 8, 0.9, True),
        ((2, 2, 2, 100, 200, 32), torch.float32, 64, 16, 1.0, False),
        ((1, 2, 1, 50, 90, 64), torch.bfloat16, 32, 4, 0.5, True),
    ]:
        q = torch.randn(b, hq, lq, d, device=device).to(dtype)
        k = torch.randn(b, hkv, lk, d, device=device).to(dtype)
        cases.append(((q, k, block, stride, thr, causal, d ** -0.5), {}))
    q = torch.randn(1, 2, 300, 64, device=device).half()
    k = torch.randn(1, 1, 280, 64, device=device).half()
    cases.append(((q, k, 128, 8, 0.9, True, 0.125), {"qk": "int8"}))
    return cases


OP_CASES = {
    "hadamard_transform": _hadamard,
    "codec_decode": _codec_decode,
    "codec_linear": _codec_linear,
    "e8p_decode": _e8p_decode,
    "e8p_linear": _e8p_linear,
    "aqlm_decode": _aqlm_decode,
    "aqlm_linear": _aqlm_linear,
    "bsr_linear": _bsr_linear,
    "sage_attention_fwd": _sage_attention_fwd,
    "sage_attention_varlen_fwd": lambda device: _sage_attention_varlen_fwd(device),
    "xattention_mask": _xattention_mask,
    "paged_kv_append_": lambda device: _paged_cases(device)[0],
    "sage_decode_paged": lambda device: _paged_cases(device)[1],
}


def _sage_attention_varlen_fwd(device):
    from tersor import attention

    if torch.device(device).type == "cuda":
        try:
            attention.cuda_path_name(torch.device(device), "int8", "fp16", False)
        except NotImplementedError:
            pytest.skip("no INT8 + fp16 sage kernel on this device")
    cq = torch.tensor([0, 30, 30, 75], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 40, 45, 100], dtype=torch.int64, device=device)
    q = torch.randn(75, 4, 64, device=device).half()
    k, v = (torch.randn(100, 2, 64, device=device).half() for _ in range(2))
    return [((q, k, v, cq, ck, True, 0.125, 8, "fp16", True, False), {}),
            ((q, k, v, cq, ck, False, 0.125, 8, "fp16", True, False), {"window_left": 10, "window_right": 3})]


def _paged_cases(device):
    """(append cases, decode cases) on a small quantized paged cache (tests/test_paged_decode.py has the rest)."""
    if torch.device(device).type == "cuda":
        pytest.skip("the paged KV cache's CUDA kernels are not written yet (issue 15): NotImplementedError on CUDA")
    from tersor.attention import PagedKVCache

    cache = PagedKVCache(5, 16, 2, 64)
    k, v = torch.randn(2, 20, 2, 64) + 1, torch.randn(2, 20, 2, 64)
    bt = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    lengths = torch.tensor([20, 7], dtype=torch.int32)
    cache.append(k, v, bt, torch.zeros(2, dtype=torch.int32), lengths)
    state = (cache.k_codes, cache.k_scale, cache.v_codes, cache.page_meta)
    append = [((*[t.clone() for t in state], k[:, :1].to(torch.bfloat16), v[:, :1].to(torch.bfloat16), bt, lengths,
                torch.ones(2, dtype=torch.int32)), {})]
    q = torch.randn(2, 3, 4, 64).to(torch.bfloat16)
    decode = [((q, *state, bt, lengths, 0.125), {}), ((q, *state, bt, lengths, 0.125, 8, 0), {})]
    return append, decode


# ---- 2:4 sparsity ----

def _sparse24_weight(m, k, dtype, device):
    from tersor.sparse import compress_2_4, prune_2_4

    w = prune_2_4(torch.randn(m, k).to(dtype))
    packed = compress_2_4(w.to(device))
    return w.to(device), packed.values, packed.meta


def _sparse24_compress(device):
    return [((_sparse24_weight(m, k, dt, device)[0],), {})
            for m, k, dt in [(16, 64, torch.float16), (32, 128, torch.bfloat16)]]


def _sparse24_decompress(device):
    return [(_sparse24_weight(m, k, dt, device)[1:], {}) for m, k, dt in [(16, 64, torch.float16), (48, 192, torch.bfloat16)]]


def _sparse24_linear(device):
    cases = []
    for m, k, dt, lead in [(32, 128, torch.float16, (1,)), (16, 64, torch.bfloat16, (2, 3)),
                           (48, 192, torch.float16, (20,)), (16, 128, torch.bfloat16, (12,))]:
        _, values, meta = _sparse24_weight(m, k, dt, device)
        x = torch.randn(*lead, k, device=device).to(dt)
        cases.append(((x, values, meta), {"bias": torch.randn(m, device=device).to(dt)}))
        cases.append(((x, values, meta), {}))
        # A forced kernel (every GPU from sm80 runs gemv and gemm; sm90 is tested where it can run).
        rows = x.numel() // k
        cases.append(((x, values, meta), {"path": "gemv" if rows <= 16 else "gemm"}))
    return cases


OP_CASES.update({
    "sparse24_compress": _sparse24_compress,
    "sparse24_decompress": _sparse24_decompress,
    "sparse24_linear": _sparse24_linear,
})
