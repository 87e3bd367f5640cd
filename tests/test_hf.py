"""Hugging Face integration (issue 13, items 3 and 4): a tiny Llama (random weights, made here) quantized with
tersor E8P 2-bit and AQLM 2x8 goes through ``save_pretrained`` -> ``AutoModelForCausalLM.from_pretrained`` with
bit-identical logits; the same model written in AQLM's Hugging Face layout loads through
``tersor.from_pretrained`` with the tersor-quantized source's logits; mismatches name the layer and the tensor.
Skips without transformers. One intra-op thread (see tests/test_model_api.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import tersor
from tersor.nn import AQLMLinear, E8PLinear

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
              pytest.mark.usefixtures("one_thread")]

AQLM = tersor.AQLMConfig(2, 8, iters=1, kmeans_iters=2, beam_size=1)
AQLM_SOURCE = {"quant_method": "aqlm", "nbits_per_codebook": 8, "num_codebooks": 2, "in_group_size": 8,
               "out_group_size": 1, "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"]}


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A random tiny Llama saved dense (fp32); tests load it in the dtype they need, as a user would."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


def load_dense(d, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
CALIBRATION = [{"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def quantized(dense_dir, method, dtype):
    model = load_dense(dense_dir, dtype)
    if method == "e8p2":
        tersor.quantize_(model, tersor.E8PConfig(2), calibration=CALIBRATION, progress=False)
    else:
        tersor.quantize_(model, AQLM, progress=False)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["e8p2", "aqlm2x8"])
def test_save_pretrained_from_pretrained(dense_dir, tmp_path, method, dtype):
    from transformers import AutoModelForCausalLM

    model = quantized(dense_dir, method, dtype)
    layer_cls = E8PLinear if method == "e8p2" else AQLMLinear
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_cls)
    ref = logits(model)
    model.save_pretrained(tmp_path)

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersor" and qc["format"] == "tersor-checkpoint" and qc["version"] == 1
    assert len(qc["layers"]) == 14  # 7 linears x 2 blocks; lm_head stays dense
    entry = next(s for s in qc["layers"] if s["fqn"] == "model.layers.1.mlp.down_proj")
    assert entry["format"] == ("e8p" if method == "e8p2" else "aqlm")
    assert [entry["out_features"], entry["in_features"]] == [64, 128]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in entry["tensors"]:
        assert f"model.layers.1.mlp.down_proj.{name}" in keys
    assert "model.layers.1.mlp.down_proj.weight" not in keys

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, layer_cls)
    assert loaded.model.embed_tokens.weight.dtype == dtype
    out = logits(loaded)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    # the same through tersor.from_pretrained, and a second save_pretrained round trip
    again = tersor.from_pretrained(tmp_path)
    assert torch.equal(logits(again), ref)
    again.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), ref)
    if dtype == torch.float32:
        # into the model without its head (AutoModel from a *ForCausalLM checkpoint): names without "model."
        from transformers import AutoModel

        base = AutoModel.from_pretrained(tmp_path)
        assert isinstance(base.layers[0].mlp.up_proj, layer_cls)
        with torch.no_grad():
            assert torch.equal(base(IDS).last_hidden_state, loaded.model(IDS).last_hidden_state)


def test_import_does_not_import_transformers_and_registers_on_use(dense_dir, tmp_path):
    model = quantized(dense_dir, "aqlm2x8", torch.float32)
    model.save_pretrained(tmp_path)
    torch.save(logits(model), tmp_path / "ref.pt")
    code = f"""
import sys, torch
torch.set_num_threads(1)
import tersor
assert "transformers" not in sys.modules, "import tersor imported transformers"
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
assert type(m.model.layers[0].mlp.up_proj).__name__ == "AQLMLinear"
ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    out = m(ids).logits
assert torch.equal(out, torch.load({str(tmp_path / 'ref.pt')!r})), "logits differ"
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def write_aqlm_layout(model, directory, *, int16_layers=(), broadcast_layers=(), source=None):
    """Writes ``model`` (tersor AQLMLinear layers) in AQLM's Hugging Face layout: config.json with AQLM's
    quantization_config and no tersor fields; per quantized linear ``codes``/``codebooks``/``scales``
    (+ ``bias``); everything else as transformers names it."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        fqn, _, name = k.rpartition(".")
        if fqn in int16_layers and name == "codes":
            v = v.to(torch.int16)  # AQLM may store <= 8-bit codes as int16 (sign-extended: same code mod 2^8)
        if fqn in broadcast_layers and name == "scales":
            v = v[:1].clone()  # [1, 1, 1, 1]: one scale for every row
        state[k] = v.contiguous()
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = dict(AQLM_SOURCE if source is None else source)
    cfg["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def test_aqlm_hf_layout(dense_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantized(dense_dir, "aqlm2x8", torch.float16)
    assert model.model.layers[0].self_attn.k_proj.codebooks.dtype == torch.float16
    # one layer with a single scale for all rows, so that AQLM's broadcast [1, 1, 1, 1] scale is exact
    bcast = "model.layers.0.self_attn.k_proj"
    layer = model.get_submodule(bcast)
    layer.scales.fill_(float(layer.scales[0, 0, 0, 0]))
    ref = logits(model)
    write_aqlm_layout(model, tmp_path / "aqlm", int16_layers=("model.layers.1.mlp.gate_proj",),
                      broadcast_layers=(bcast,))
    loaded = tersor.from_pretrained(tmp_path / "aqlm")
    assert isinstance(loaded.model.layers[1].mlp.gate_proj, AQLMLinear)
    assert loaded.model.layers[1].mlp.gate_proj.codes.dtype == torch.int8
    assert list(loaded.get_submodule(bcast).scales.shape) == [32, 1, 1, 1]
    assert torch.equal(logits(loaded), ref)
    # the loaded model saves in tersor's layout and comes back through plain transformers
    loaded.save_pretrained(tmp_path / "tersor")
    qc = json.loads((tmp_path / "tersor" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersor" and qc["layout"] == "tersor" and "source" not in qc
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "tersor")), ref)


def test_aqlm_hf_layout_1x16_int16(dense_dir, tmp_path):
    """nbits 16: int16 codes; a mixed checkpoint (one 1x16 layer, the rest dense and listed as such)."""
    model = load_dense(dense_dir, torch.float16)
    fqn = "model.layers.0.self_attn.v_proj"
    tersor.quantize_(model, tersor.AQLMConfig(1, 16, iters=0, kmeans_iters=1, beam_size=1),
                     lambda m, n: n == fqn, progress=False)
    assert model.get_submodule(fqn).codes.dtype == torch.int16
    ref = logits(model)
    dense = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    write_aqlm_layout(model, tmp_path, source={**AQLM_SOURCE, "nbits_per_codebook": 16, "num_codebooks": 1,
                                               "linear_weights_not_to_quantize": dense + ["model.embed_tokens.weight"]})
    loaded = tersor.from_pretrained(tmp_path)
    assert isinstance(loaded.get_submodule(fqn), AQLMLinear) and loaded.get_submodule(fqn).nbits == 16
    assert torch.equal(logits(loaded), ref)


def test_aqlm_layout_errors(dense_dir, tmp_path):
    model = quantized(dense_dir, "aqlm2x8", torch.float16)
    with pytest.raises(NotImplementedError, match="out_group_size=2"):
        write_aqlm_layout(model, tmp_path / "og", source={**AQLM_SOURCE, "out_group_size": 2})
        tersor.from_pretrained(tmp_path / "og")
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj', tensor "
                                         r"'model.layers.0.mlp.down_proj.codebooks'.*nbits_per_codebook=7"):
        write_aqlm_layout(model, tmp_path / "nb", source={**AQLM_SOURCE, "nbits_per_codebook": 7})
        tersor.from_pretrained(tmp_path / "nb")
    # a missing scales tensor
    from safetensors.torch import load_file, save_file

    write_aqlm_layout(model, tmp_path / "ms")
    state = load_file(str(tmp_path / "ms" / "model.safetensors"))
    del state["model.layers.1.self_attn.o_proj.scales"]
    save_file(state, str(tmp_path / "ms" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.self_attn.o_proj', tensor "
                                         r"'model.layers.1.self_attn.o_proj.scales': missing"):
        tersor.from_pretrained(tmp_path / "ms")


def test_tersor_layout_mismatch_names_layer_and_tensor(dense_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantized(dense_dir, "aqlm2x8", torch.float32)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    good = cfg_path.read_text()
    cfg = json.loads(good)
    spec = next(s for s in cfg["quantization_config"]["layers"] if s["fqn"] == "model.layers.0.self_attn.o_proj")
    spec["tensors"]["codes"]["shape"] = [64, 4, 2]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.o_proj', tensor "
                                         r"'model.layers.0.self_attn.o_proj.codes': the file holds int8 \[64, 8, 2\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg = json.loads(good)
    spec = next(s for s in cfg["quantization_config"]["layers"] if s["fqn"] == "model.layers.1.mlp.up_proj")
    spec["in_features"] = 32
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.up_proj', tensor "
                                         r"'model.layers.1.mlp.up_proj.weight': the model's layer is \[128, 64\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match="no quantization_config"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        tersor.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config":
                                                      {"quant_method": "gptq"}}))
    with pytest.raises(NotImplementedError, match="'gptq' is not supported"):
        tersor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        tersor.from_pretrained(tmp_path, trust_remote_code=True)


def test_from_pretrained_quipsharp_layout_end_to_end(tmp_path):
    """A tiny Llama written in QuIP#'s layout (fused qkv/upgate, fuse_scales) loads through
    tersor.from_pretrained with the real tersor.api.quipsharp_ckpt loader, logits equal to the source."""
    from quipsharp_layout import tiny_llama, write_quipsharp
    from safetensors.torch import save_file

    model, cfg = tiny_llama(128)
    sd, qc, src = write_quipsharp(model)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]  # as QuIP#'s Hugging Face checkpoints declare it
    config["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = tersor.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = loaded(ids).logits, src(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_quipsharp_dispatch_plumbing(dense_dir, tmp_path, monkeypatch):
    """The QuIP# route with a stand-in ``load_quipsharp_layers`` (the real one lives in
    tersor.api.quipsharp_ckpt): the skeleton it gets has its parameters on meta and its computed buffers
    real, and what it leaves is loaded from the checkpoint."""
    import types

    from safetensors.torch import save_file

    model = load_dense(dense_dir, torch.float32)
    tersor.quantize_(model, tersor.E8PConfig(2, ldlq=False), progress=False)
    ref = logits(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "QuIP#", "codebook": "E8P12"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    seen = {}

    def load_quipsharp_layers(skeleton, state_dict, quant_config):
        seen["config"] = quant_config
        seen["meta"] = skeleton.model.layers[0].self_attn.q_proj.weight.device.type
        for fqn in sorted({k.rpartition(".")[0] for k in state_dict if k.endswith(".Qidxs")}):
            layer = E8PLinear({n: state_dict.pop(f"{fqn}.{n}")
                               for n in ("Qidxs", "SU", "SV", "Wscale", "resid_scale", "codebook_id")})
            parent, _, child = fqn.rpartition(".")
            setattr(skeleton.get_submodule(parent), child, layer)

    monkeypatch.setitem(sys.modules, "tersor.api.quipsharp_ckpt",
                        types.SimpleNamespace(load_quipsharp_layers=load_quipsharp_layers))
    loaded = tersor.from_pretrained(tmp_path)
    assert seen == {"config": {"quant_method": "QuIP#", "codebook": "E8P12"}, "meta": "meta"}
    assert isinstance(loaded.model.layers[1].mlp.down_proj, E8PLinear)
    assert torch.equal(logits(loaded), ref)
