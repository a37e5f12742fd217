"""The lean RMSNorm and the compiled SiLU·up kernel: same values and gradients as transformers' eager modules."""

import copy

import pytest
import torch
from conftest import lean_kernels, options, rope_users
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.kernels import compiled
from lorafit.kernels import rotary as rotary_kernel
from lorafit.patches import apply_lean_kernels, rotary


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


# Compiled bf16 graphs are separate compilations (~10 s each cold): those rows run in `make test-slow`.
HALF_COMPILED = pytest.mark.slow


@pytest.mark.parametrize("compile_,dtype,tol", [
    ("1", torch.float32, 1e-5), ("0", torch.float32, 1e-5),
    pytest.param("1", torch.bfloat16, 3e-2, marks=HALF_COMPILED), ("0", torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("full", [False, True])
def test_lean_norm_and_act_match_transformers(compile_, dtype, tol, full):
    ref = tiny(dtype)
    lean = copy.deepcopy(ref)
    handle = lean_kernels(lean, compile_, rms_norm=True, swiglu=True)
    assert handle.applied == {"swiglu": 2, "rms_norm": 5}
    ids = torch.randint(0, 100, (2, 16))
    o1, g1, w1 = run(ref, ids, full)
    o2, g2, w2 = run(lean, ids, full)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    assert rel(o2, o1) <= tol and rel(g2, g1) <= tol
    assert set(w1) == set(w2)
    for n in w1:
        assert rel(w2[n], w1[n]) <= tol, n


def test_norms_other_than_llamas_are_left_alone():
    from conftest import tiny_causal_lm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    gemma = tiny_causal_lm("gemma")  # (1 + weight) · normalize(x): not Llama's norm
    handle = lean_kernels(gemma, rms_norm=True, swiglu=True)
    assert "rms_norm" not in handle.applied and handle.applied["swiglu"] == 2
    assert not any("forward" in vars(m) for m in gemma.modules() if isinstance(m, GemmaRMSNorm))


def test_families_without_lean_kernels_train_plain_with_one_notice():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100))
    handle = apply_lean_kernels(gpt2, options=options())
    assert "gpt2" in handle.notice and not any(n for k, n in handle.applied.items() if k != "attention")


def test_compiled_falls_back_to_eager_when_compiling_fails(monkeypatch):
    def boom(fn, **kw):
        def f(*a):
            raise RuntimeError("no compiler")
        return f

    monkeypatch.setattr(torch, "compile", boom)
    k = compiled.compiled(lambda a, b: a * b + 1)
    assert torch.equal(k(torch.ones(3), torch.ones(3), compile=True), torch.full((3,), 2.0))
    assert not k.usable(True)  # stays eager from now on


def rope_inputs(dtype, layout):
    """q, k as attention makes them (views of the projections' outputs), and transformers' cos/sin."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    b, s, d = 2, 12, 16
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.randn(b, s, 64, dtype=dtype), torch.arange(s).expand(b, s))
    qp = torch.randn(b, s, 4 * d, dtype=dtype, requires_grad=True)
    kp = torch.randn(b, s, 2 * d, dtype=dtype, requires_grad=True)

    def heads(t, n):  # (b, h, s, d) for unsqueeze_dim=1, (b, s, h, d) for 2
        t = t.view(b, s, n, d)
        return t.transpose(1, 2) if layout == 1 else t

    return qp, kp, lambda fn: fn(heads(qp, 4), heads(kp, 2), cos, sin, unsqueeze_dim=layout)


def rope_run(call, qp, kp):
    qp.grad = kp.grad = None
    q, k = call()
    torch.manual_seed(1)
    loss = (q.float() * torch.randn(q.shape)).sum()
    if k.requires_grad:
        loss = loss + (k.float() * torch.randn(k.shape)).sum()
    loss.backward()
    return q, k, qp.grad, kp.grad


def original_rope():
    from transformers.models.llama import modeling_llama

    fn = modeling_llama.apply_rotary_pos_emb
    return getattr(fn, "lorafit_original", fn)


def lean_rope(compile_=True):
    """The dispatcher a patched model's attention calls, as it runs inside such a module."""
    dispatcher = rotary._dispatcher(original_rope())

    def call(*args, **kwargs):
        token = rotary._ACTIVE.set(options(compile_))
        try:
            return dispatcher(*args, **kwargs)
        finally:
            rotary._ACTIVE.reset(token)

    return call


@pytest.mark.parametrize("compile_,dtype,tol", [
    ("1", torch.float32, 1e-6), ("0", torch.float32, 1e-6),
    pytest.param("1", torch.bfloat16, 1e-2, marks=HALF_COMPILED), ("0", torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("layout", [1, 2])
def test_lean_rotary_matches_transformers(compile_, dtype, tol, layout):
    qp, kp, call = rope_inputs(dtype, layout)
    ref = rope_run(lambda: call(original_rope()), qp, kp)
    lean = rope_run(lambda: call(lean_rope(compile_)), qp, kp)
    assert "RotaryFunction" in type(lean[0].grad_fn).__name__
    assert not rotary_kernel._forward_c.failed and not rotary_kernel._backward_c.failed
    for a, b in zip(lean, ref, strict=True):
        a, b = a.detach().float(), b.detach().float()
        assert float((a - b).abs().max() / b.abs().max()) <= tol


def test_lean_rotary_asks_no_gradient_for_a_frozen_input():
    qp, kp, call = rope_inputs(torch.float32, 1)
    kp.requires_grad_(False)  # k of layer 0 when k_proj is not adapted and the embedding is frozen
    ref = rope_run(lambda: call(original_rope()), qp, kp)
    q, k, gq, gk = rope_run(lambda: call(lean_rope()), qp, kp)
    assert q.requires_grad and not k.requires_grad and gk is None
    assert torch.allclose(gq, ref[2], rtol=1e-6, atol=1e-7) and torch.equal(k, ref[1])


def test_lean_rotary_is_per_model_and_restored(monkeypatch):
    from transformers import Phi3Config, Phi3ForCausalLM
    from transformers.models.llama import modeling_llama

    original = original_rope()
    model, other = tiny(torch.float32), tiny(torch.float32)
    ids = torch.randint(0, 100, (2, 16))
    o1, g1, w1 = run(model, ids, True)
    model.zero_grad(set_to_none=True)
    handle = lean_kernels(model, rope=True)
    assert handle.applied == {"rope": 1}
    with pytest.raises(ValueError):  # once per model
        lean_kernels(model, rope=True)
    assert modeling_llama.apply_rotary_pos_emb.lorafit_original is original
    calls = []
    kernel = rotary_kernel._forward_c
    monkeypatch.setattr(rotary_kernel, "_forward_c", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    o2, g2, w2 = run(model, ids, True)
    assert len(calls) == 2  # one per layer
    assert torch.allclose(o1, o2, rtol=1e-5, atol=1e-6) and torch.allclose(g1, g2, rtol=1e-5, atol=1e-6)
    for n in w1:
        assert torch.allclose(w1[n], w2[n], rtol=1e-4, atol=1e-6), n
    with torch.no_grad():  # nothing to train: transformers' own function runs, same logits
        assert torch.allclose(model(inputs_embeds=model.model.embed_tokens(ids)).logits.float(), o1, atol=1e-6)
    run(other, ids, True)  # a model that was not patched computes as transformers wrote it
    assert len(calls) == 2
    users = rope_users()
    handle.restore()
    # the dispatcher goes with its last model (models of earlier tests may still be alive: count, not identity)
    assert rope_users() == users - 1
    assert users > 1 or modeling_llama.apply_rotary_pos_emb is original
    run(model, ids, True)
    assert len(calls) == 2
    # Phi-3 rotates only part of each head (its own apply_rotary_pos_emb): left alone
    phi3 = Phi3ForCausalLM(Phi3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=1, vocab_size=100,
                                      partial_rotary_factor=0.5, pad_token_id=0))
    assert "rope" not in lean_kernels(phi3, rope=True).applied
