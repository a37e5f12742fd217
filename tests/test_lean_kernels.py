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


def rope_inputs(dtype):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    b, s, d = 2, 12, 16
    x = torch.randn(b, s, 64, dtype=dtype)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, torch.arange(s).expand(b, s))
    # q and k as the attention makes them: transposed views of the projections' outputs
    qp = torch.randn(b, s, 4 * d, dtype=dtype, requires_grad=True)
    kp = torch.randn(b, s, 2 * d, dtype=dtype, requires_grad=True)
    return qp, kp, cos, sin


def rope_run(fn, qp, kp, cos, sin):
    qp.grad = kp.grad = None
    b, s = qp.shape[:2]
    q, k = fn(qp.view(b, s, 4, -1).transpose(1, 2), kp.view(b, s, 2, -1).transpose(1, 2), cos, sin)
    torch.manual_seed(1)
    (q.float() * torch.randn(q.shape)).sum().add((k.float() * torch.randn(k.shape)).sum()).backward()
    return q.detach().float(), k.detach().float(), qp.grad.float(), kp.grad.float()


@pytest.mark.parametrize("compile_", ["1", "0"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_lean_rotary_matches_transformers(monkeypatch, compile_, dtype, tol):
    from transformers.models.llama import modeling_llama

    from lorafit.train.rotary import _make_lean

    monkeypatch.setenv("LORAFIT_COMPILE", compile_)
    original = getattr(modeling_llama.apply_rotary_pos_emb, "lorafit_original", modeling_llama.apply_rotary_pos_emb)
    inputs = rope_inputs(dtype)
    ref = rope_run(original, *inputs)
    lean = rope_run(_make_lean(original), *inputs)
    for a, b in zip(lean, ref, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= tol


def test_use_lean_rotary_switches_llama_modules_once(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.llama import modeling_llama

    from lorafit.train.rotary import use_lean_rotary

    original = getattr(modeling_llama.apply_rotary_pos_emb, "lorafit_original", modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)  # undone after the test
    model = tiny(torch.float32)
    ids = torch.randint(0, 100, (2, 16))
    o1, g1, w1 = run(model, ids, True)
    model.zero_grad(set_to_none=True)
    assert use_lean_rotary(model) == 1 and use_lean_rotary(model) == 0
    assert modeling_llama.apply_rotary_pos_emb.lorafit_original is original
    o2, g2, w2 = run(model, ids, True)
    assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-6) and torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)
    for n in w1:
        assert torch.allclose(w1[n], w2[n], rtol=1e-4, atol=1e-6), n
    with torch.no_grad():  # nothing to train: the original function runs
        assert torch.equal(model(ids).logits, model(ids).logits)
    assert use_lean_rotary(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))) == 0
