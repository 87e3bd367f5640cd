"""Issue 19, items 1-5: an E8P state declares its layout (codebook_id -> bit width, hadamard -> whose H_K), and
inputs that used to run with a wrong answer are refused with errors that say what is wrong. Plus issue 13's
fused QuIP# layers: one fused GEMV per input shared by the parts (E8PFusedLinear.part)."""

import copy
import json
import os
import sys

import pytest
import torch

import tersor
from tersor.api.quipsharp_ckpt import E8PFusedLinear, E8PFusedPart, load_quipsharp_layers
from tersor.nn import E8PLinear
from tersor.quant import dequantize_e8p, quantize_e8p

sys.path.insert(0, os.path.dirname(__file__))
from quipsharp_layout import tiny_llama, write_quipsharp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def state(m=64, n=128, bits=2, seed=0):
    return quantize_e8p(torch.randn(m, n, generator=torch.Generator().manual_seed(seed)), bits=bits, seed=seed)


def quipsharp_state(st):
    """What QuIP#'s checkpoints hold: the tensors, codebook_id, no 'hadamard' entry."""
    return {k: v for k, v in st.items() if k != "hadamard"}


# ------------------------------------------------------------------------------ 1. the Hadamard convention
@pytest.mark.parametrize("bits,cid", [(2, 7), (3, 18), (4, 17)])
def test_quantize_e8p_state_declares_its_layout(bits, cid):
    st = state(bits=bits)
    assert st["hadamard"] == "tersor" and int(st["codebook_id"]) == cid
    layer = E8PLinear(st)
    assert layer.bits == bits and layer.hadamard == "tersor" and int(layer.codebook_id) == cid
    assert layer.layer_config()["hadamard"] == "tersor"
    torch.testing.assert_close(layer.dequantize(), dequantize_e8p(st), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,n", [(64, 192), (384, 64)])  # 192 = 12 * 16 on the input, 384 = 12 * 32 on the output
def test_undeclared_convention_at_k_times_power_of_two_is_refused(m, n):
    st = quipsharp_state(state(m, n))
    with pytest.raises(ValueError, match="Hadamard convention"):
        E8PLinear(st)
    with pytest.raises(ValueError, match="Hadamard convention"):
        dequantize_e8p(st)
    # declared either way, it is read that way; the two differ by O(1) at these sizes
    t, q = E8PLinear(st, hadamard="tersor"), E8PLinear(st, hadamard="quipsharp")
    assert t.hadamard == "tersor" and q.hadamard == "quipsharp"
    assert rel(t.dequantize(), q.dequantize()) > 0.5
    torch.testing.assert_close(dequantize_e8p(st, hadamard="quipsharp"), q.dequantize(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dequantize_e8p({**st, "hadamard": "quipsharp"}), q.dequantize(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dequantize_e8p(st, hadamard="tersor"), t.dequantize(), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, n)
    torch.testing.assert_close(q(x).double(), x.double() @ q.dequantize().double().T, rtol=1e-5, atol=1e-5)


def test_argument_and_state_must_agree():
    st = state(64, 192)
    with pytest.raises(ValueError, match="state was made with the 'tersor'"):
        E8PLinear(st, hadamard="quipsharp")
    with pytest.raises(ValueError, match="state was made with the 'tersor'"):
        dequantize_e8p(st, hadamard="quipsharp")
    with pytest.raises(ValueError, match="state was made with the 'quipsharp'"):
        E8PLinear({**st, "hadamard": "quipsharp"}, hadamard="tersor")
    with pytest.raises(ValueError, match=r"state\['hadamard'\] must be 'tersor' or 'quipsharp'"):
        E8PLinear({**st, "hadamard": "sloane"})
    with pytest.raises(TypeError, match="hadamard"):
        E8PLinear({**st, "hadamard": torch.tensor(1)})


def test_power_of_two_needs_no_convention():
    st = quipsharp_state(state(64, 128))
    a, b = E8PLinear(st), E8PLinear(st, hadamard="quipsharp")
    assert a.hadamard == "tersor"
    x = torch.randn(2, 128)
    torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dequantize_e8p(st), a.dequantize(), rtol=1e-5, atol=1e-6)


def test_quipsharp_loaders_make_quipsharp_layers():
    st = quipsharp_state(state(64, 192))
    layer = E8PLinear.from_quipsharp(st)
    assert layer.hadamard == "quipsharp" and layer.layer_config()["hadamard"] == "quipsharp"
    with pytest.raises(ValueError, match="state was made with the 'tersor'"):
        E8PLinear.from_quipsharp({**st, "hadamard": "tersor"})


def _strip_to_old_manifest(d):
    """Rewrites a tersor checkpoint as the E8P layers were saved before this change: no 'hadamard' in the layer
    config, no codebook_id tensors."""
    from safetensors.torch import load_file, save_file

    man = json.loads((d / "tersor_manifest.json").read_text())
    tensors = load_file(str(d / "model.safetensors"))
    for spec in man["layers"]:
        spec["config"].pop("hadamard", None)
        spec["tensors"].pop("codebook_id", None)
        tensors.pop(spec["fqn"] + ".codebook_id", None)
        man["tensors"].pop(spec["fqn"] + ".codebook_id", None)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "tersor_manifest.json").write_text(json.dumps(man))


def test_checkpoints_written_before_still_load(tmp_path):
    # a 12 * 16 = 192-wide tersor layer: without a 'hadamard' entry the manifest means tersor's H_12
    src = torch.nn.Sequential(E8PLinear(state(64, 192)), torch.nn.ReLU(), E8PLinear(state(32, 64, bits=4)))
    tersor.save(src, tmp_path)
    man = json.loads((tmp_path / "tersor_manifest.json").read_text())
    assert man["layers"][0]["config"]["hadamard"] == "tersor" and "codebook_id" in man["layers"][0]["tensors"]
    _strip_to_old_manifest(tmp_path)
    back = torch.nn.Sequential(torch.nn.Linear(192, 64, bias=False), torch.nn.ReLU(), torch.nn.Linear(64, 32, bias=False))
    tersor.load(back, tmp_path)
    assert back[0].hadamard == "tersor" and back[2].bits == 4 and int(back[2].codebook_id) == 17
    x = torch.randn(2, 192)
    assert torch.equal(back(x), src(x))
    # and an old layer state dict (no codebook_id) still loads into a layer
    sd = {k: v for k, v in src[2].state_dict().items() if k != "codebook_id"}
    other = E8PLinear(state(32, 64, bits=4, seed=5))
    other.load_state_dict(sd)
    assert torch.equal(other(torch.ones(1, 64)), src[2](torch.ones(1, 64)))
    with pytest.raises(RuntimeError, match="codebook_id 7"):
        other.load_state_dict({**sd, "codebook_id": torch.tensor(7)})


# ------------------------------------------------------------------------------------ 2. Qidxs is int64 only
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.float32, torch.float64])
def test_qidxs_must_be_int64(dtype):
    st = quipsharp_state(state())
    bad = {**st, "Qidxs": st["Qidxs"].to(dtype)}
    for f in (E8PLinear.from_quipsharp, E8PLinear, dequantize_e8p):
        with pytest.raises(TypeError, match=r"Qidxs must be int64.*64-bit words"):
            f(bad)


def test_upcast_state_dict_is_refused_by_the_loader():
    pytest.importorskip("transformers")
    model, cfg = tiny_llama(128)
    sd, qc, _ = write_quipsharp(model)
    import transformers

    for conv in (lambda v: v.int(), lambda v: v.float()):
        sd2 = {k: conv(v) if k.endswith(".Qidxs") else v for k, v in sd.items()}
        with pytest.raises(TypeError, match=r"Qidxs must be int64"):
            load_quipsharp_layers(transformers.LlamaForCausalLM(cfg).eval(), sd2, qc)


# ---------------------------------------------------------------------- 3. the bit width is declared, not guessed
def test_missing_codebook_id_is_refused():
    st = state(64, 128, bits=2)
    # a 2-bit Qidxs [64, 4] with an SU of length 64: read as 4 bits, it ran with O(1) error before
    half = {"Qidxs": st["Qidxs"], "SU": st["SU"][:64], "SV": st["SV"]}
    for f in (E8PLinear, dequantize_e8p, E8PLinear.from_quipsharp):
        with pytest.raises(ValueError, match="no 'codebook_id'"):
            f(half)
    # declared, the same tensors are a mismatch that names SU and what Qidxs implies
    with pytest.raises(ValueError, match=r"SU has length 64.*|in_features = 128"):
        E8PLinear({**half, "codebook_id": torch.tensor(7)})
    with pytest.raises(ValueError, match=r"Qidxs \[64, 4\] at 2 bits implies in_features = 128, but SU has length 64"):
        dequantize_e8p({**half, "codebook_id": 7})
    full = {"Qidxs": st["Qidxs"], "SU": st["SU"], "SV": st["SV"], "Wscale": st["Wscale"]}
    with pytest.raises(ValueError, match="no 'codebook_id'"):
        E8PLinear(full)
    assert E8PLinear(full, bits=2).bits == 2 and E8PLinear.from_quipsharp(full, bits=2).bits == 2
    torch.testing.assert_close(dequantize_e8p(full, bits=2), dequantize_e8p(st))
    with pytest.raises(ValueError, match=r"codebook_id 7 \(2 bits\) and bits=4 disagree"):
        E8PLinear(st, bits=4)
    with pytest.raises(ValueError, match="bits=4 does not match"):
        E8PLinear(full, bits=4)
    with pytest.raises(ValueError, match="codebook_id 5 is not a codebook"):
        E8PLinear({**st, "codebook_id": torch.tensor(5)})
    with pytest.raises(TypeError, match="codebook_id must be an integer"):
        E8PLinear({**st, "codebook_id": torch.tensor(7.0)})


def test_layer_state_dict_carries_codebook_id(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = E8PLinear(state(32, 128, bits=3))
    sd = layer.state_dict()
    assert int(sd["codebook_id"]) == 18 and sd["codebook_id"].dtype == torch.int64
    save_file(sd, str(tmp_path / "l.safetensors"))
    again = E8PLinear(load_file(str(tmp_path / "l.safetensors")))
    assert again.bits == 3 and torch.equal(again(torch.ones(2, 128)), layer(torch.ones(2, 128)))


def test_loader_takes_the_width_from_quant_config():
    transformers = pytest.importorskip("transformers")
    model, cfg = tiny_llama(128)
    sd, qc, src = write_quipsharp(model, bits=4)
    no_ids = {k: v for k, v in sd.items() if not k.endswith(".codebook_id")}
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    load_quipsharp_layers(fresh, no_ids, qc)  # quip_params.codebook = E8P12RVQ4B
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)
    qc2 = {"quip_params": {k: v for k, v in qc["quip_params"].items() if k != "codebook"}}
    with pytest.raises(ValueError, match="no 'codebook_id'"):
        load_quipsharp_layers(transformers.LlamaForCausalLM(cfg).eval(), no_ids, qc2)


# ------------------------------------------------------------------------- 4. resid_scale_override <= 0
@pytest.mark.parametrize("rso", [-1, -1.0, 0])
def test_resid_scale_override_not_positive_means_default(rso):
    st = quipsharp_state(state(32, 128, bits=4))
    ref = E8PLinear.from_quipsharp(st)
    layer = E8PLinear.from_quipsharp(st, resid_scale_override=rso)
    assert layer._resid == ref._resid == pytest.approx(3.45)
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), ref(x))
    assert E8PLinear(st, resid_scale=rso)._resid == pytest.approx(3.45)
    two = quipsharp_state(state(32, 128, bits=2))
    assert E8PLinear.from_quipsharp(two, resid_scale_override=rso)._resid == 1.0  # 2 bits: runs, no residual
    with pytest.raises(ValueError, match="finite"):
        E8PLinear(st, resid_scale=float("nan"))


# ---------------------------------------------------------------------------------------------- 5. errors
@pytest.mark.parametrize("su_len", [96, 100, 256])
def test_su_length_mismatch_is_named(su_len):
    st = state(64, 128)
    for f in (E8PLinear, E8PLinear.from_quipsharp, dequantize_e8p):
        with pytest.raises(ValueError, match=rf"SU has length {su_len}") as e:
            f({**quipsharp_state(st), "SU": torch.ones(su_len)})
        assert "in_features = 128" in str(e.value) and "power of two" not in str(e.value)
        assert "not a size" not in str(e.value)


def test_sv_length_mismatch_is_named():
    st = quipsharp_state(state(64, 128))
    for f in (E8PLinear, E8PLinear.from_quipsharp, dequantize_e8p):
        with pytest.raises(ValueError, match=r"SV has length 48, but Qidxs \[64, 4\] has 64 rows"):
            f({**st, "SV": torch.ones(48)})


def test_per_row_wscale_is_refused_clearly():
    st = quipsharp_state(state(64, 64))  # square: a per-row Wscale [64] broadcast without an error before
    bad = {**st, "Wscale": torch.rand(64) + 0.5}
    for f in (E8PLinear, E8PLinear.from_quipsharp, dequantize_e8p):
        with pytest.raises(ValueError, match=r"Wscale must be a scalar.*got \[64\].*SV"):
            f(bad)


def test_fused_refusal_says_what_works():
    st = state(64, 128)
    with pytest.raises(ValueError) as e:
        E8PLinear.from_quipsharp({**st, "fuse_scales": torch.ones(2)})
    msg = str(e.value)
    assert "load_quipsharp_layers" in msg and "E8PFusedLinear" in msg and "fuse_scales" in msg
    assert "does not work" in msg and "split the output rows per part first" not in msg


# ------------------------------------------------------------------ fused layers: one GEMV shared by the parts
def fused_layer(sizes=(64, 32, 32), n=128, hadamard=None, seed=0):
    st = quipsharp_state(state(sum(sizes), n, seed=seed))
    st["fuse_scales"] = torch.tensor([0.5, 2.0, 1.5][:len(sizes)])
    fused = E8PFusedLinear(st, list(sizes), hadamard=hadamard)
    return fused, [E8PFusedPart(fused, i, "qkv_proj") for i in range(len(sizes))]


@pytest.fixture
def gemv_calls(monkeypatch):
    import tersor.nn.e8p_linear as mod

    calls = []
    real = mod.e8p_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "e8p_linear", counting)
    return calls


def test_parts_share_one_gemv_per_input(gemv_calls):
    fused, parts = fused_layer()
    x = torch.randn(3, 128)
    ref = fused(x)
    gemv_calls.clear()
    with torch.no_grad():
        outs = [p(x) for p in parts]
    assert len(gemv_calls) == 1
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    assert fused._part_cache is None  # dropped once every part took its rows
    # any order; a second input; a part asking twice
    y = torch.randn(3, 128)
    gemv_calls.clear()
    got = {i: parts[i](y) for i in (2, 0)}
    got[0] = parts[0](y)
    got[1] = parts[1](y)
    ref_y = fused(y)
    assert all(torch.equal(got[i], ref_y[i]) for i in range(3))
    assert len(gemv_calls) == 2 + 1  # (2, 0) one; 0 again recomputes; 1 reuses; fused(y) itself one


def test_in_place_change_of_the_input_recomputes(gemv_calls):
    fused, parts = fused_layer()
    x = torch.randn(3, 128)
    q = parts[0](x)
    x.mul_(2)
    k = parts[1](x)
    v = parts[2](x[:])  # a view is another object: recomputed too
    ref = fused(x)
    assert torch.equal(k, ref[1]) and torch.equal(v, ref[2]) and not torch.equal(q, ref[0])
    x2 = torch.randn(3, 128)
    parts[0](x2)
    x2[0, 0] = 5.0  # in place through indexing
    assert torch.equal(parts[1](x2), fused(x2)[1])


def test_changed_layer_tensors_recompute():
    fused, parts = fused_layer()
    x = torch.randn(2, 128)
    parts[0](x)
    with torch.no_grad():
        fused.SV.mul_(3)
    assert torch.equal(parts[1](x), fused(x)[1])
    parts[0](x)
    fused.to(torch.float64)  # _apply: new tensors, cache dropped
    assert fused._part_cache is None
    assert torch.equal(parts[1](x), fused(x)[1])


def test_autograd_through_shared_parts():
    # (tersor::e8p_linear has no backward; the graph of the rest, here d/d fuse_scales, must survive the sharing)
    fused, parts = fused_layer()
    fused.fuse_scales.requires_grad_(True)
    x = torch.randn(4, 128)
    w = [torch.randn(4, s) for s in fused.fuse_sizes]
    loss = sum((p(x) * wi).sum() for p, wi in zip(parts[::-1], w[::-1]))
    (g,) = torch.autograd.grad(loss, fused.fuse_scales)
    loss2 = sum((o * wi).sum() for o, wi in zip(fused(x), w))
    (g2,) = torch.autograd.grad(loss2, fused.fuse_scales)
    torch.testing.assert_close(g, g2, rtol=1e-6, atol=0)
    # grad mode changes between parts: the no_grad output is not reused where a graph is needed
    x3 = torch.randn(2, 128)
    with torch.no_grad():
        q = parts[0](x3)
    k = parts[1](x3)
    assert not q.requires_grad and k.requires_grad


def test_deepcopy_and_inference_mode_with_a_pending_cache():
    fused, parts = fused_layer()
    x = torch.randn(2, 128, requires_grad=True)
    parts[0](x)  # k and v still pending, holding a graph
    twin = copy.deepcopy(torch.nn.ModuleDict({"qkv": fused, "q": parts[0], "k": parts[1]}))
    assert twin["qkv"]._part_cache is None and twin["k"].fused is twin["qkv"]
    with torch.no_grad():
        assert torch.equal(twin["k"](x), fused(x)[1])
    with torch.inference_mode():
        y = torch.randn(2, 128)
        outs = [p(y) for p in parts]
        ref = fused(y)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))


def test_quipsharp_llama_runs_each_fused_gemv_once(gemv_calls):
    transformers = pytest.importorskip("transformers")
    model, cfg = tiny_llama(128)
    sd, qc, src = write_quipsharp(model)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    load_quipsharp_layers(fresh, sd, qc)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    gemv_calls.clear()
    with torch.no_grad():
        out = fresh(ids).logits
        ref = src(ids).logits
    # per block: qkv 1, o 1, upgate 1, down 1 in the loaded model (src: o and down are E8PLinear: 2 per block)
    assert len(gemv_calls) == 2 * 4 + 2 * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
