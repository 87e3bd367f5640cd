"""Existing QuIP# checkpoints: tersor.load_quipsharp_layers on a tiny Llama written in QuIP#'s layout, the
QuIP#-transform option of E8PLinear (hadamard="quipsharp") against explicit dense Kronecker matrices, and
QuIP#'s Hadamard data file (scripts/gen_quipsharp_hadamard.py, sha256-checked at load).

tersor ships none of QuIP#'s own H_K (the matrices were not available; docs/usage.md). The K * 2^k tests
register a stand-in matrix explicitly and remove it afterwards: they test the transform and the loading path,
not that the stand-in is QuIP#'s matrix."""

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import tersor
from tersor.api.quipsharp_ckpt import E8PFusedLinear, E8PFusedPart, load_quipsharp_layers
from tersor.nn import E8PLinear
from tersor.quant import quipsharp
from tersor.quant import quipsharp_hadamard as qh

sys.path.insert(0, os.path.dirname(__file__))
from quipsharp_layout import tiny_llama, write_quipsharp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def tersor_hk(k):
    """tersor's own H_K (hadamard_transform applies scale * x @ H^T)."""
    return tersor.hadamard_transform(torch.eye(k), scale=1.0).t().contiguous()


def other_hk(k, seed=0):
    """A Hadamard matrix of order K that is neither tersor's nor symmetric: rows permuted, columns sign-flipped."""
    g = torch.Generator().manual_seed(seed)
    h = tersor_hk(k)[torch.randperm(k, generator=g)]
    return h * (torch.randint(0, 2, (k,), generator=g) * 2 - 1).float()[None, :]


@contextlib.contextmanager
def registered(k, h):
    qh.register_quipsharp_hadamard(k, h)
    try:
        yield
    finally:
        qh.unregister_quipsharp_hadamard(k)


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def quipsharp_u(n, hk):
    """QuIP#'s U_n = (H_K (x) S_{n/K}) / sqrt(n) as an explicit dense matrix (docs/research/e8p12.md section 4)."""
    if hk is None:
        return sylvester(n) / n**0.5
    k = hk.shape[0]
    return torch.kron(hk.double(), sylvester(n // k)) / n**0.5


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _transformers():
    return pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------ whole model
def test_power_of_two_llama_loads_with_equal_logits():
    transformers = _transformers()
    model, cfg = tiny_llama(128)
    sd, qc, src = write_quipsharp(model)
    before = {k: v.clone() for k, v in sd.items()}
    fresh = transformers.LlamaForCausalLM(cfg).eval()  # other random weights: all must be overwritten
    rep = load_quipsharp_layers(fresh, sd, qc)
    assert all(torch.equal(before[k], sd[k]) for k in sd) and set(before) == set(sd)  # input not mutated
    assert len(rep["layers"]) == 8 and rep["missing_keys"] == []
    assert rep["fused"]["model.layers.0.self_attn.qkv_proj"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    attn, mlp = fresh.model.layers[1].self_attn, fresh.model.layers[1].mlp
    assert isinstance(attn.qkv_proj, E8PFusedLinear) and isinstance(attn.k_proj, E8PFusedPart)
    assert attn.k_proj.fused is attn.qkv_proj and mlp.gate_proj.index == 1  # QuIP#'s order: (up, gate)
    assert isinstance(attn.o_proj, E8PLinear) and attn.o_proj.hadamard == "quipsharp"
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = logits(src, ids)
    torch.testing.assert_close(logits(fresh, ids), ref, rtol=1e-5, atol=1e-5)
    # module protocols on the loaded model: deepcopy, state_dict round trip, print
    twin = copy.deepcopy(fresh)
    assert twin.model.layers[0].self_attn.q_proj.fused is twin.model.layers[0].self_attn.qkv_proj
    assert twin.model.layers[0].self_attn.q_proj.fused is not attn.qkv_proj
    state = fresh.state_dict()
    assert "model.layers.0.self_attn.qkv_proj.fuse_scales" in state
    assert not any(k.startswith("model.layers.0.self_attn.q_proj") for k in state)
    twin.load_state_dict(state)
    assert torch.equal(logits(twin, ids), logits(fresh, ids))
    assert "part 0 of qkv_proj" in repr(fresh)


@pytest.fixture
def no_shipped_matrices(monkeypatch):
    """A tersor without the data file (python/tersor/data/quipsharp_hadamard.json)."""
    monkeypatch.setattr(qh, "_shipped", {})


def test_k_times_power_of_two_llama_refused_without_quipsharp_matrix(no_shipped_matrices):
    transformers = _transformers()
    # intermediate 192 = 12 * 16: upgate_proj has 384 = 12 * 32 rows, down_proj 192 inputs
    model, cfg = tiny_llama(192)
    sd, qc, _ = write_quipsharp(model)
    assert 12 not in qh.available_quipsharp_k()
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    linears_before = [n for n, m in fresh.named_modules() if type(m) is torch.nn.Linear]
    with pytest.raises(NotImplementedError, match="H_12"):
        load_quipsharp_layers(fresh, sd, qc)
    # nothing was swapped: the model is left as it was
    assert [n for n, m in fresh.named_modules() if type(m) is torch.nn.Linear] == linears_before


def test_k_times_power_of_two_llama_loads_with_registered_matrix(no_shipped_matrices):
    transformers = _transformers()
    # Stand-in for QuIP#'s H_12: tersor's own, because the source was quantized with tersor's transform.
    model, cfg = tiny_llama(192)
    sd, qc, src = write_quipsharp(model)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    with registered(12, tersor_hk(12)):
        load_quipsharp_layers(fresh, sd, qc)
    mlp = fresh.model.layers[0].mlp
    assert mlp.upgate_proj.had_out is not None and mlp.down_proj.had_in is not None
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(fresh, ids), logits(src, ids), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_on_fused_parts_and_k_mix():
    transformers = _transformers()  # noqa: F841
    model, cfg = tiny_llama(192)
    sd, qc, _ = write_quipsharp(model)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    with registered(12, tersor_hk(12)):
        load_quipsharp_layers(fresh, sd, qc)
    mlp = fresh.model.layers[0].mlp  # up/gate parts of upgate_proj (384 = 12 * 32 rows), down_proj (192 inputs)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ the QuIP# transform
@pytest.mark.parametrize("k,n,m", [(12, 192, 384), (20, 320, 64), (12, 128, 96)])
def test_quipsharp_transform_equals_dense_kronecker(k, n, m):
    hk = other_hk(k, seed=k)
    assert not torch.equal(hk, hk.t())
    g = torch.Generator().manual_seed(n + m)
    # any valid codes for these shapes (quantized with tersor's transform; the layer reads them with QuIP#'s)
    st = quipsharp.quantize_e8p(torch.randn(m, n, generator=g), bits=2)
    state = {"Qidxs": st["Qidxs"], "SU": torch.randn(n, generator=g).half(), "SV": torch.randn(m, generator=g).half(),
             "Wscale": torch.tensor(0.75).half(), "bias": torch.randn(m, generator=g), "codebook_id": torch.tensor(7)}
    with registered(k, hk):
        layer = E8PLinear.from_quipsharp(state)
    w_hat = quipsharp.decode_qidxs(st["Qidxs"], n).double()
    kn = qh.quipsharp_factor(n)[0]
    km = qh.quipsharp_factor(m)[0]
    un = quipsharp_u(n, hk if kn > 1 else None)
    um = quipsharp_u(m, hk if km > 1 else None)
    dense = (state["SV"].double() * 0.75)[:, None] * (um @ w_hat @ un.T) * state["SU"].double()[None, :]
    x = torch.randn(5, n, generator=g)
    ref = x.double() @ dense.T + state["bias"].double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize().double(), dense, rtol=1e-5, atol=1e-6)
    # the quipsharp rotation itself: U x and U^T x
    v = torch.randn(3, n, generator=g)
    hn = hk if kn > 1 else None
    torch.testing.assert_close(qh.quipsharp_hadamard(v, hn).double(), v.double() @ un.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qh.quipsharp_hadamard(v, hn, transpose=True).double(), v.double() @ un,
                               rtol=1e-5, atol=1e-6)


def test_quipsharp_factor_follows_get_hadk():
    assert qh.quipsharp_factor(11008) == (172, 64)
    assert qh.quipsharp_factor(4096) == (1, 4096)
    assert qh.quipsharp_factor(13824) == (108, 128)
    with pytest.raises(ValueError, match="does not support n = 100"):
        qh.quipsharp_factor(100)
    assert sorted(qh.QUIPSHARP_K_SIZES) == sorted(tersor.ops.HADAMARD_K_SIZES)


def test_hadamard_option_errors(no_shipped_matrices):
    st = quipsharp.quantize_e8p(torch.randn(16, 64), bits=2)
    with pytest.raises(ValueError, match="hadamard must be"):
        E8PLinear(st, hadamard="sloane")
    with pytest.raises(ValueError, match="is not a Hadamard matrix"):
        qh.register_quipsharp_hadamard(12, torch.ones(12, 12))
    with pytest.raises(ValueError, match="not one of QuIP#'s sizes"):
        qh.register_quipsharp_hadamard(8, tersor_hk(12)[:8, :8])
    with pytest.raises(qh.QuipSharpHadamardUnavailable, match="ships none"):
        qh.quipsharp_hadamard_k(172)


# --------------------------------------------------------------------------------------- the data file
def _write_sloane(path, h):
    path.write_text("\n".join("".join("+" if v > 0 else "-" for v in row) for row in h.tolist()) + "\n")


def test_data_file_generation_and_checked_load(tmp_path):
    for k in (12, 20):
        _write_sloane(tmp_path / f"had.{k}.txt", other_hk(k, seed=1))
    out = tmp_path / "quipsharp_hadamard.json"
    script = os.path.join(ROOT, "scripts", "gen_quipsharp_hadamard.py")
    subprocess.run([sys.executable, script, "--matrix", f"12={tmp_path / 'had.12.txt'}", "--matrix",
                    f"20={tmp_path / 'had.20.txt'}", "--out", str(out)], check=True, capture_output=True)
    subprocess.run([sys.executable, script, "--check", str(out)], check=True, capture_output=True)
    mats = qh.load_data_file(str(out))
    assert sorted(mats) == [12, 20]
    for k, h in mats.items():
        assert torch.equal(h, other_hk(k, seed=1))
        assert torch.equal(h @ h.t(), k * torch.eye(k))
    doc = json.loads(out.read_text())
    assert doc["matrices"]["12"]["sha256"] == qh.matrix_sha256(other_hk(12, seed=1))
    # a flipped sign is caught by the recorded hash (and would still be a Hadamard matrix after a column flip)
    row = doc["matrices"]["12"]["rows"][0]
    doc["matrices"]["12"]["rows"][0] = ("-" if row[0] == "+" else "+") + row[1:]
    out.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="sha256"):
        qh.load_data_file(str(out))
    # a non-Hadamard input is refused by the script
    (tmp_path / "bad.txt").write_text("\n".join(["+" * 12] * 12))
    r = subprocess.run([sys.executable, script, "--matrix", f"12={tmp_path / 'bad.txt'}", "--out",
                        str(tmp_path / "x.json")], capture_output=True, text=True)
    assert r.returncode != 0 and "not a Hadamard matrix" in r.stderr


def test_shipped_matrices_are_hadamard():
    shipped = qh.load_data_file()  # {} while tersor ships none
    if not os.path.isfile(qh.DATA_FILE):
        assert shipped == {}
    for k, h in shipped.items():
        assert torch.equal(h @ h.t(), k * torch.eye(k)), k


def test_quipsharp_layer_through_tersor_save_load(tmp_path):
    g = torch.Generator().manual_seed(3)
    st = quipsharp.quantize_e8p(torch.randn(96, 192, generator=g), bits=2)
    with registered(12, other_hk(12, seed=2)):
        layer = E8PLinear.from_quipsharp({"Qidxs": st["Qidxs"], "SU": st["SU"], "SV": st["SV"].float() * 0.1,
                                          "codebook_id": st["codebook_id"]})
        tersor.save(torch.nn.Sequential(layer), tmp_path)
        back = torch.nn.Sequential(torch.nn.Linear(192, 96, bias=False))
        tersor.load(back, tmp_path)
    assert back[0].hadamard == "quipsharp" and torch.equal(back[0].had_in, layer.had_in)
    x = torch.randn(2, 192, generator=g)
    assert torch.equal(back[0](x), layer(x))


# ------------------------------------------------------------------------------------------------ errors
def test_load_errors_name_layer_and_tensor():
    transformers = _transformers()
    model, cfg = tiny_llama(128)
    sd, qc, _ = write_quipsharp(model)

    def load(sd2, qc2=qc):
        return load_quipsharp_layers(transformers.LlamaForCausalLM(cfg).eval(), sd2, qc2)

    p = "model.layers.0.self_attn.qkv_proj"
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.qkv_proj.A'"):
        load({**sd, p + ".A": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"qkv_proj.fuse_scales"):
        load({**sd, p + ".fuse_scales": torch.ones(2).half()})
    with pytest.raises(ValueError, match=r"qkv_proj.fuse_scales' is missing"):
        load({k: v for k, v in sd.items() if k != p + ".fuse_scales"})
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj', tensor .*down_proj.SU'"):
        load({**sd, "model.layers.0.mlp.down_proj.SU": torch.ones(64).half()})
    with pytest.raises(ValueError, match="the model has nothing there"):
        load({**sd, "model.layers.0.mlp.extra.Qidxs": sd["model.layers.0.mlp.down_proj.Qidxs"]})
    with pytest.raises(ValueError, match="not in the model"):
        load({**sd, "model.unknown.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="codebook 'E8P12RVQ4B'"):
        load(sd, {"quip_params": {**qc["quip_params"], "codebook": "E8P12RVQ4B"}})
    with pytest.raises(NotImplementedError, match="lora_rank"):
        load(sd, {"quip_params": {**qc["quip_params"], "lora_rank": 8}})
    with pytest.raises(TypeError, match="SV must be"):
        load({**sd, "model.layers.0.self_attn.o_proj.SV": torch.ones(64, dtype=torch.int32)})
    with pytest.raises(TypeError, match="quant_config"):
        load(sd, "E8P12")


# ------------------------------------------------------------------------- the shipped matrices, 11008 wide


def test_every_quipsharp_matrix_is_shipped():
    # python/tersor/data/quipsharp_hadamard.json: QuIP#'s get_hadK matrices (quip-sharp 1d8f873), hash- and
    # orthogonality-checked at load.
    assert qh.available_quipsharp_k() == sorted(qh.QUIPSHARP_K_SIZES)
    for k in qh.QUIPSHARP_K_SIZES:
        h = qh.quipsharp_hadamard_k(k)
        torch.testing.assert_close(h @ h.T, k * torch.eye(k), rtol=0, atol=0)
    # spot check against QuIP#'s get_had12 as printed in its source: first two rows
    h12 = qh.quipsharp_hadamard_k(12)
    assert h12[0].tolist() == [1] + [-1] * 11
    assert h12[1].tolist() == [1, 1, -1, 1, -1, -1, -1, 1, 1, 1, -1, 1]


def test_llama_with_11008_wide_mlp_loads_through_from_pretrained(tmp_path):
    """Llama-2-7B's MLP width 11008 = 172 * 64 (QuIP#'s H_172): the QuIP#-layout checkpoint loads through
    tersor.from_pretrained with logits equal to the tersor-quantized source using QuIP#'s transform."""
    import json

    from safetensors.torch import save_file

    model, cfg = tiny_llama(11008)
    sd, qc, src = write_quipsharp(model, hadamard="quipsharp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = tersor.from_pretrained(tmp_path)
    mlp = loaded.model.layers[0].mlp
    assert mlp.down_proj.hadamard == "quipsharp" and mlp.down_proj.had_in is not None  # K = 172 on its input
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(loaded, ids), logits(src, ids), rtol=1e-5, atol=1e-5)
    # QuIP#'s U_n for n = 11008 is (H_172 (x) S_64) / sqrt(n); x @ U for the basis rows e_i (i = a*64 + b) is
    # row i of U, H_172[a] (x) S_64[b] / sqrt(n): checked on rows of both factors without the dense 11008^2 matrix
    h172, s64 = qh.quipsharp_hadamard_k(172), sylvester(64)
    for i in (0, 1, 63, 64, 5000, 11007):
        x = torch.zeros(1, 11008)
        x[0, i] = 1.0
        row = torch.kron(h172[i // 64].double(), s64[i % 64]) / 11008**0.5
        torch.testing.assert_close(qh.quipsharp_hadamard(x, h172, transpose=True)[0].double(), row,
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ fused layers through tersor.save / HF
def _fused_model(intermediate=128, hadamard="tersor"):
    transformers = _transformers()
    model, cfg = tiny_llama(intermediate)
    sd, qc, src = write_quipsharp(model, hadamard=hadamard)
    loaded = transformers.LlamaForCausalLM(cfg).eval()
    load_quipsharp_layers(loaded, sd, qc)
    return loaded, cfg, src


@pytest.mark.parametrize("intermediate,hadamard", [(128, "tersor"), (192, "quipsharp")])
def test_fused_quipsharp_model_through_tersor_save_load(tmp_path, intermediate, hadamard):
    # 192 = 12 * 16: upgate_proj has 384 = 12 * 32 rows, QuIP#'s shipped H_12 on its output
    transformers = _transformers()
    loaded, cfg, src = _fused_model(intermediate, hadamard)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    ref = logits(loaded, ids)
    torch.testing.assert_close(ref, logits(src, ids), rtol=1e-5, atol=1e-5)
    tersor.save(loaded, tmp_path)
    man = json.loads((tmp_path / "tersor_manifest.json").read_text())
    fused = [s for s in man["layers"] if s["format"] == "e8p_fused"]
    assert len(fused) == 4 and man["version"] == 1
    qkv = next(s for s in fused if s["fqn"] == "model.layers.0.self_attn.qkv_proj")
    assert qkv["config"]["parts"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert qkv["config"]["fuse_sizes"] == [64, 32, 32] and qkv["config"]["hadamard"] == "quipsharp"
    assert set(qkv["tensors"]) == {"Qidxs", "SU", "SV", "Wscale", "codebook_id", "resid_scale", "fuse_scales"}
    with torch.device("meta"):
        fresh = transformers.LlamaForCausalLM(cfg).eval()
    tersor.load(fresh, tmp_path)
    attn = fresh.model.layers[1].self_attn
    assert isinstance(attn.qkv_proj, E8PFusedLinear) and attn.v_proj.fused is attn.qkv_proj
    assert fresh.model.layers[0].mlp.upgate_proj.hadamard == "quipsharp"
    assert torch.equal(logits(fresh, ids), ref)
    # a model whose part has another shape is refused, naming the fused layer and the part
    other = transformers.LlamaForCausalLM(cfg).eval()
    other.model.layers[0].self_attn.k_proj = torch.nn.Linear(64, 48, bias=False)
    with pytest.raises(ValueError, match=r"fused layer 'model.layers.0.self_attn.qkv_proj', tensor .*k_proj.weight"):
        tersor.load(other, tmp_path)


def test_fused_quipsharp_model_through_save_pretrained(tmp_path):
    transformers = _transformers()
    loaded, cfg, _ = _fused_model(128)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    ref = logits(loaded, ids)
    loaded.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersor" and any(s["format"] == "e8p_fused" for s in qc["layers"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    mlp = back.model.layers[1].mlp
    assert isinstance(mlp.upgate_proj, E8PFusedLinear) and isinstance(mlp.gate_proj, E8PFusedPart)
    assert mlp.gate_proj.fused is mlp.upgate_proj
    assert torch.equal(logits(back, ids), ref)


def test_dequantize_fused_quipsharp_model():
    # tersor.dequantize_ turns each fused part into an nn.Linear with its rows of the fused weight (fuse_scales
    # applied) and removes the fused layers: same logits up to the dense GEMM's fp32 reassociation.
    loaded, cfg, src = _fused_model(192, "quipsharp")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    want = logits(loaded, ids)
    tersor.dequantize_(loaded)
    attn = loaded.model.layers[0].self_attn
    assert type(attn.q_proj) is torch.nn.Linear and not hasattr(attn, "qkv_proj")
    assert not hasattr(loaded.model.layers[1].mlp, "upgate_proj")
    assert not any(type(m).__name__.startswith("E8P") for m in loaded.modules())
    torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-4, atol=1e-4)
