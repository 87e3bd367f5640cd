"""Block fine-tuning in tersor.quantize_ (issue 18): FinetuneConfig in E8PConfig / AQLMConfig trains each block's
continuous parameters against the original block's outputs, keeps the best held-out parameters, restores
dtypes and requires_grad, and survives tersor.save -> tersor.load bit-identically. Toy models only (fast)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tersor
from tersor.api.configs import config_from_dict
from tersor.api.finetune import trainable_tensors
from tersor.nn import AQLMLinear, E8PLinear


class Block(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, scale=1.0):
        return self.norm(x + self.down(torch.relu(self.up(x))) * scale)


class Toy(nn.Module):
    def __init__(self, n=2, d=64):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d) for _ in range(n)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x, scale=0.7)
        return x


def make(seed=0):
    torch.manual_seed(seed)
    m = Toy().eval()
    # inputs with structure (a low-rank part) so that the calibration data says something about the test data
    basis = torch.randn(8, 64)
    data = lambda k: [torch.randn(16, 8) @ basis + 0.1 * torch.randn(16, 64) for _ in range(k)]  # noqa: E731
    return m, data(8), data(4)


def rel_err(q, m, xs):
    with torch.no_grad():
        num = sum(float((q(x) - m(x)).square().sum()) for x in xs)
        den = sum(float(m(x).square().sum()) for x in xs)
    return (num / den) ** 0.5


CONFIGS = {
    "e8p2": lambda ft: tersor.E8PConfig(2, ldlq=False, finetune=ft),
    "e8p2-ldlq": lambda ft: tersor.E8PConfig(2, finetune=ft),
    "aqlm-1x4": lambda ft: tersor.AQLMConfig(1, 4, iters=1, kmeans_iters=2, beam_size=1, finetune=ft),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_finetuning_lowers_the_held_out_error(name):
    m, cal, test = make()
    base = copy.deepcopy(m)
    rep0 = tersor.quantize_(base, CONFIGS[name](None), calibration=cal, progress=False)
    assert rep0.finetune == []
    tuned = copy.deepcopy(m)
    ft = tersor.FinetuneConfig(steps=60, lr=3e-3, eval_every=5, patience=4)
    rep = tersor.quantize_(tuned, CONFIGS[name](ft), calibration=cal, progress=False)
    assert [f["block"] for f in rep.finetune] == [0, 1]
    for f in rep.finetune:
        assert f["n_val"] == 2 and f["n_train"] == 6  # holdout 0.25 of 8 batches
        assert f["val_after"] < f["val_before"]  # the best held-out loss, never worse than the start
        assert f["curve"][0] == (0, f["val_before"]) and 1 <= f["steps"] <= 60
    assert "finetune block 0" in rep.table()
    # the whole model on data neither step saw
    e0, e1 = rel_err(base, m, test), rel_err(tuned, m, test)
    assert e1 < 0.9 * e0, (e0, e1)
    # the continuous parameters moved, the codes did not (block 0: the same inputs with and without
    # fine-tuning; later blocks see the fine-tuned blocks' outputs, hence other Hessians and codes)
    for fqn, layer in tuned.named_modules():
        if not fqn.startswith("blocks.0."):
            continue
        if isinstance(layer, E8PLinear):
            ref = base.get_submodule(fqn)
            assert torch.equal(layer.Qidxs, ref.Qidxs) and not torch.equal(layer.SU, ref.SU)
            assert layer.SU.dtype == ref.SU.dtype and layer.Wscale.dtype == torch.float32
        if isinstance(layer, AQLMLinear):
            ref = base.get_submodule(fqn)
            assert torch.equal(layer.codes, ref.codes) and not torch.equal(layer.codebooks, ref.codebooks)
            assert layer.codebooks.dtype == ref.codebooks.dtype
    assert not any(t.requires_grad for t in tuned.buffers())


def test_original_requires_grad_flags_and_inputs_are_kept():
    m, cal, _ = make(1)
    m.blocks[0].norm.weight.requires_grad_(False)
    before = [c.clone() for c in cal]
    tersor.quantize_(m, tersor.E8PConfig(2, ldlq=False, finetune=tersor.FinetuneConfig(steps=3)), calibration=cal,
                     progress=False)
    assert all(torch.equal(a, b) for a, b in zip(cal, before))
    assert m.blocks[0].norm.weight.requires_grad is False and m.blocks[1].norm.weight.requires_grad is True
    assert m.blocks[1].down.bias.requires_grad is False  # a tersor layer's bias, as bias_param makes it


def test_half_precision_model_keeps_its_dtypes():
    m, cal, test = make(2)
    m = m.half()
    cal = [c.half() for c in cal]
    rep = tersor.quantize_(m, tersor.E8PConfig(2, ldlq=False, finetune=tersor.FinetuneConfig(steps=10)),
                           calibration=cal, progress=False)
    assert len(rep.finetune) == 2
    layer = m.blocks[0].up
    assert layer.SU.dtype == torch.float16 and layer.Wscale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and m.blocks[0].norm.weight.dtype == torch.float16
    assert m(test[0].half()).dtype == torch.float16


def test_trainable_tensors_selection():
    m, cal, _ = make(3)
    tersor.quantize_(m, tersor.E8PConfig(2, ldlq=False), progress=False)
    names = [n for n, _ in trainable_tensors(m.blocks[0], tersor.FinetuneConfig())]
    assert names == ["up.SU", "up.SV", "up.Wscale", "up.bias", "down.SU", "down.SV", "down.Wscale", "down.bias",
                     "norm.weight", "norm.bias"]
    names = [n for n, _ in trainable_tensors(m.blocks[0], tersor.FinetuneConfig(train_norms=False,
                                                                               train_biases=False))]
    assert names == ["up.SU", "up.SV", "up.Wscale", "down.SU", "down.SV", "down.Wscale"]


@pytest.mark.parametrize("name", ["e8p2", "aqlm-1x4"])
def test_save_load_keeps_finetuned_parameters_bit_identical(name, tmp_path):
    m, cal, test = make(4)
    tersor.quantize_(m, CONFIGS[name](tersor.FinetuneConfig(steps=10)), calibration=cal, progress=False)
    tersor.save(m, tmp_path)
    with torch.device("meta"):
        fresh = Toy().eval()
    tersor.load(fresh, tmp_path)
    sd, sd2 = m.state_dict(), fresh.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    with torch.no_grad():
        assert torch.equal(m(test[0]), fresh(test[0]))


def test_finetune_config_checks_and_round_trip():
    with pytest.raises(ValueError, match="needs calibration"):
        tersor.quantize_(Toy(), tersor.E8PConfig(2, ldlq=False, finetune=tersor.FinetuneConfig()), progress=False)
    with pytest.raises(TypeError):
        tersor.E8PConfig(2, finetune=5)
    with pytest.raises(ValueError):
        tersor.FinetuneConfig(lr=0)
    with pytest.raises(ValueError):
        tersor.FinetuneConfig(holdout=1.0)
    with pytest.raises(TypeError):
        tersor.FinetuneConfig(steps=1.5)
    for cfg in (tersor.E8PConfig(3, finetune=tersor.FinetuneConfig(steps=7, lr=2e-3)),
                tersor.AQLMConfig(finetune=tersor.FinetuneConfig(discrete_every=5)), tersor.AQLMConfig()):
        assert config_from_dict(cfg.to_dict()) == cfg


def test_aqlm_discrete_step_trust_region_and_descent():
    from tersor.api.finetune import aqlm_discrete_step

    torch.manual_seed(5)
    lin = nn.Linear(64, 32)
    layer = AQLMLinear.from_linear(lin, 2, 4, iters=0, kmeans_iters=2, beam_size=1, codebook_dtype=torch.float32)
    x = torch.randn(64, 64)
    with torch.no_grad():
        y = lin(x)
    for t in layer.continuous_tensors().values():
        t.requires_grad_(True)
    loss_fn = lambda: (layer(x) - y).square().mean()  # noqa: E731
    groups = 32 * 8
    with torch.no_grad():
        l0 = float(loss_fn())
    codes0 = layer.codes.clone()
    assert aqlm_discrete_step([layer], loss_fn, trust_region=0.5 / groups) == 0  # a budget under one group
    assert torch.equal(layer.codes, codes0)
    n = aqlm_discrete_step([layer], loss_fn, trust_region=0.05)
    assert 0 < n <= int(0.05 * groups)
    assert int((layer.codes != codes0).any(-1).sum()) == n  # exactly n groups changed
    with torch.no_grad():
        assert float(loss_fn()) < l0


def test_pv_tuning_alternation_in_quantize():
    m, cal, test = make(6)
    base = copy.deepcopy(m)
    cont = tersor.FinetuneConfig(steps=40, lr=3e-3, eval_every=5, patience=4)
    pv = tersor.FinetuneConfig(steps=40, lr=3e-3, eval_every=5, patience=4, discrete_every=5, trust_region=0.02)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    tersor.quantize_(a, CONFIGS["aqlm-1x4"](cont), calibration=cal, progress=False)
    rep = tersor.quantize_(b, CONFIGS["aqlm-1x4"](pv), calibration=cal, progress=False)
    assert all(f["val_after"] < f["val_before"] for f in rep.finetune)
    assert sum(f["codes_changed"] for f in rep.finetune) > 0
    # (whether the kept codes differ depends on which held-out evaluation was best; on this toy the PV run's
    # held-out error is within noise of the continuous-only run's, see docs/research/aqlm.md)
    print("rel err: continuous", rel_err(a, base, test), "pv", rel_err(b, base, test))


def test_end_to_end_stage_after_the_blocks():
    m, cal, test = make(7)
    block_only = copy.deepcopy(m)
    ft = dict(steps=20, lr=3e-3, eval_every=5, patience=4)
    tersor.quantize_(block_only, CONFIGS["e8p2"](tersor.FinetuneConfig(**ft)), calibration=cal, progress=False)
    e2e = copy.deepcopy(m)
    rep = tersor.quantize_(e2e, CONFIGS["e8p2"](tersor.FinetuneConfig(**ft, e2e_steps=40, e2e_lr=1e-3,
                                                                        e2e_loss="mse")),
                           calibration=cal, progress=False)
    f = rep.finetune_e2e
    assert f["loss"] == "mse" and f["val_after"] < f["val_before"] and f["steps"] >= 5
    assert "finetune end-to-end (mse)" in rep.table()
    assert rel_err(e2e, m, test) < rel_err(block_only, m, test)


class _LMOut(dict):
    @property
    def logits(self):
        return self["logits"]


class TinyLM(nn.Module):
    """Embedding -> 2 blocks -> a dense head: the output has ``logits`` (KL is the default loss)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.lm_head = nn.Linear(64, 50)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = b(h)
        return _LMOut(logits=self.lm_head(h))


def test_end_to_end_kl_on_logits_with_a_mask():
    from tersor.api.finetune import distill_loss

    torch.manual_seed(8)
    m = TinyLM().eval()
    cal = [{"input_ids": torch.randint(0, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
           for _ in range(6)]
    rep = tersor.quantize_(m, tersor.E8PConfig(2, ldlq=False, finetune=tersor.FinetuneConfig(
        steps=5, e2e_steps=20, e2e_lr=1e-3)), calibration=cal, progress=False)
    assert rep.finetune_e2e["loss"] == "auto" and rep.finetune_e2e["val_after"] <= rep.finetune_e2e["val_before"]
    assert isinstance(m.lm_head, nn.Linear)  # the output embedding stays dense
    # the loss itself: KL is 0 for equal logits, masked tokens do not count
    t = torch.randn(2, 3, 5)
    s = t.clone()
    s[:, 2] += torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert float(distill_loss("logits", "auto", s, t, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss("logits", "auto", s, t, None)) > 0
    assert float(distill_loss("hidden", "auto", 2 * t, t, None)) == pytest.approx(0.0, abs=1e-6)  # cosine
    with pytest.raises(ValueError, match="e2e_loss"):
        tersor.FinetuneConfig(e2e_loss="l1")


def test_finetune_model_progress_reports_each_held_out_evaluation():
    # finetune_model(progress=...) is called once per held-out evaluation, with the values of result["curve"]
    from tersor.api.finetune import finetune_model

    m, cal, _ = make(9)
    with torch.no_grad():
        teacher = [m(x) for x in cal]
    tersor.quantize_(m, CONFIGS["e8p2"](None), progress=False)
    seen = []
    r = finetune_model(m, cal, teacher, tersor.FinetuneConfig(e2e_steps=12, e2e_lr=1e-3, e2e_loss="mse",
                                                              eval_every=5, patience=10),
                       lambda model, x: model(x), progress=lambda step, v: seen.append((step, v)))
    assert [s for s, _ in seen] == [0, 5, 10, 12]
    assert seen == [(s, v) for s, v in r["curve"]]
