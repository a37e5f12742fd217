"""The lean RMSNorm and the compiled SiLU·up kernel: same values and gradients as transformers' eager modules."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.train import compiled
from lorafit.train.gated_mlp import use_lean_gated_mlps
from lorafit.train.rms_norm import use_lean_rms_norms


def tiny(dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # norm scales away from 1, so a wrong weight gradient or product shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def run(model, ids, full):
    model.requires_grad_(full)
    x = model.model.embed_tokens(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=x).logits.float()
    out.square().sum().backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if full and p.grad is not None}
    return out, x.grad.float(), grads


@pytest.mark.parametrize("compile_", ["1", "0"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("full", [False, True])
def test_lean_norm_and_act_match_transformers(monkeypatch, compile_, dtype, tol, full):
    monkeypatch.setenv("LORAFIT_COMPILE", compile_)
    ref = tiny(dtype)
    lean = copy.deepcopy(ref)
    assert use_lean_rms_norms(lean) == 5 and use_lean_gated_mlps(lean) == 2
    ids = torch.randint(0, 100, (2, 16))
    o1, g1, w1 = run(ref, ids, full)
    o2, g2, w2 = run(lean, ids, full)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    assert rel(o2, o1) <= tol and rel(g2, g1) <= tol
    assert set(w1) == set(w2)
    for n in w1:
        assert rel(w2[n], w1[n]) <= tol, n


def test_norms_other_than_llamas_are_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    m = torch.nn.Sequential(GemmaRMSNorm(8))
    assert use_lean_rms_norms(m) == 0


def test_compiled_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def boom(fn, **kw):
        def f(*a):
            raise RuntimeError("no compiler")
        return f

    monkeypatch.setattr(torch, "compile", boom)
    k = compiled.compiled(lambda a, b: a * b + 1)
    assert torch.equal(k(torch.ones(3), torch.ones(3)), torch.full((3,), 2.0))
    assert not k.usable  # stays eager from now on
