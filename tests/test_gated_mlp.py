"""The lean gated MLP gives the same outputs and gradients, and saves less for backward."""

import copy

import pytest
import torch
from conftest import lean_kernels, saved_bytes
from conftest import tiny_causal_lm as tiny

from lorafit.lora import LoraConfig, apply_lora


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("lora", [False, True])
def test_same_math_less_saved(arch, lora):
    ref = tiny(arch)
    if lora:  # with dropout, in training mode: the fused LoRA down_proj must draw the same mask
        apply_lora(ref, LoraConfig(r=4, dropout=0.1, target_modules="all-linear"))
        ref.train()
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    lean = copy.deepcopy(ref)
    assert lean_kernels(lean, swiglu=True).applied == {"swiglu": 2}
    ids = torch.randint(0, 100, (2, 9))
    torch.manual_seed(1)
    out_ref, saved_ref = saved_bytes(ref, ids)
    torch.manual_seed(1)
    out_lean, saved_lean = saved_bytes(lean, ids)
    assert torch.equal(out_ref, out_lean)
    out_ref.square().mean().backward()
    out_lean.square().mean().backward()
    grads = dict(ref.named_parameters())
    for n, p in lean.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-7, rtol=1e-6)
    one = 2 * 9 * 64 * 4  # one (tokens × intermediate) fp32 tensor
    # act(gate) in each of 2 layers; with a LoRA down_proj, the product (down's input) too
    assert saved_ref - saved_lean >= (4 if lora else 2) * one


@pytest.mark.parametrize("compile_,dropout,dtype", [
    ("1", 0.0, torch.float32), ("1", 0.1, torch.float32), ("0", 0.0, torch.float32), ("0", 0.1, torch.float32),
    ("0", 0.1, torch.bfloat16),
    # fp32 copies: the fused kernel does not round h to bf16 before masking it (bf16 graphs: `make test-slow`)
    pytest.param("1", 0.1, torch.bfloat16, marks=[pytest.mark.slow, pytest.mark.ci]),
])
def test_silu_lora_down_fused_kernels(monkeypatch, compile_, dropout, dtype):
    """SiLU with compiled kernels: the product and its dropped-out copy come from one kernel in forward, and
    backward recomputes, masks and differentiates it in one more; without a compiler the unfused path runs.
    Either way the outputs and gradients are the plain model's (bf16: to its rounding)."""
    from lorafit.kernels import gated_mlp

    monkeypatch.setenv("LORAFIT_COMPILE", compile_)
    monkeypatch.setenv("LORAFIT_HALF_MATMUL", "fp32")
    calls = {"forward": 0, "backward": 0}
    for name, kernel in (("forward", gated_mlp._silu_mul_dropped_c), ("backward", gated_mlp._down_input_backward_c)):
        def counted(*args, _name=name, _run=kernel.kernel):
            calls[_name] += 1
            return _run(*args)
        monkeypatch.setattr(kernel, "kernel", counted)
    ref = tiny("llama").to(dtype)
    apply_lora(ref, LoraConfig(r=4, dropout=dropout, target_modules="all-linear"))
    ref.train()
    for n, p in ref.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    lean = copy.deepcopy(ref)
    lean_kernels(lean, compile_, "fp32", swiglu=True)
    ids = torch.randint(0, 100, (2, 9))
    outs = []
    for m in (ref, lean):
        torch.manual_seed(1)
        out = m(ids).logits
        out.float().square().mean().backward()
        outs.append(out)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    grads = dict(ref.named_parameters())
    tol = dict(atol=1e-7, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-2)
    for n, p in lean.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, **tol, msg=n)
    fused = compile_ == "1"
    assert calls == {"forward": 2 if fused and dropout else 0, "backward": 2 if fused else 0}
