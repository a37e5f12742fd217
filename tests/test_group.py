"""LoRA layers reading the same input (q/k/v, gate/up) run as one function: same outputs, gradients and masks."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from lorafit.lora import LoraConfig, apply_lora
from lorafit.lora import group as lora_group
from lorafit.train.trainer import make_trainable


def tiny(arch="llama"):
    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              vocab_size=100)
    return AutoModelForCausalLM.from_config({"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**kw))


def run(model, ids):
    torch.manual_seed(1)
    out = model(ids).logits
    out.float().square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,dtype,matmul,dropout,compile_", [
    ("llama", torch.float32, "auto", 0.1, "1"),
    ("llama", torch.float32, "auto", 0.0, "1"),
    ("llama", torch.float32, "auto", 0.1, "0"),  # masks drawn by bernoulli_, eager kernels
    ("qwen2", torch.float32, "auto", 0.1, "1"),  # q/k/v with biases
    ("llama", torch.bfloat16, "fp32", 0.1, "1"),  # one fp32 copy of x per group
    ("llama", torch.bfloat16, "native", 0.0, "1"),
])
def test_grouped_equals_one_by_one(monkeypatch, compile_, dropout, arch, dtype, matmul):
    monkeypatch.setenv("LORAFIT_COMPILE", compile_)
    monkeypatch.setenv("LORAFIT_HALF_MATMUL", matmul)
    calls = []
    monkeypatch.setattr(lora_group.LoraGroupFunction, "apply",
                        lambda *a, _f=lora_group.LoraGroupFunction.apply: calls.append(1) or _f(*a))
    base = tiny(arch).to(dtype)
    apply_lora(base, LoraConfig(r=4, dropout=dropout, target_modules="all-linear"))
    for n, p in base.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    grouped = copy.deepcopy(base)
    assert lora_group.use_shared_input_groups(grouped) == 4  # (q/k/v, gate/up) × 2 layers
    base.train(), grouped.train()
    ids = torch.randint(0, 100, (2, 9))
    out_ref, grads_ref = run(base, ids)
    out, grads = run(grouped, ids)
    assert len(calls) == 4
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, out_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], **tol, msg=n)


def test_member_called_on_another_tensor_computes_alone():
    """A member whose input is not the first member's tensor (or was modified in place) computes by itself."""
    m = tiny()
    apply_lora(m, LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]))
    lora_group.use_shared_input_groups(m)
    m.train()
    attn = m.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    q = attn.q_proj(x)
    x2 = x.clone()
    k = attn.k_proj(x2)  # another tensor
    x.add_(1.0)
    v = attn.v_proj(x)  # same tensor, modified
    for proj, inp, y in ((attn.q_proj, x - 1.0, q), (attn.k_proj, x2, k), (attn.v_proj, x, v)):
        torch.testing.assert_close(y, proj.base_layer(inp) + proj.lora_B(proj.lora_A(inp)) * proj.scaling)
    with torch.no_grad():  # not training: no group
        attn.q_proj(x)
        assert attn.q_proj.group._pending == []


def test_trainer_groups_and_checkpointing_replays_masks():
    """make_trainable groups the projections; with checkpointing the recomputed group draws the same masks."""
    grads = []
    for gc in (False, True):
        m = make_trainable(tiny(), LoraConfig(r=4, dropout=0.3, target_modules="all-linear"), gc)
        assert m.model.layers[0].self_attn.q_proj.group is not None
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        torch.manual_seed(5)
        ids = torch.randint(0, 100, (2, 9))
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
