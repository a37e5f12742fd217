"""LoRA layers reading the same input (q/k/v, gate/up) run as one function: same outputs, gradients and masks."""

import copy

import pytest
import torch
from conftest import options
from conftest import tiny_causal_lm as tiny

from lorafit.lora import LoraConfig, apply_lora
from lorafit.lora import group as lora_group
from lorafit.train import make_trainable


def counted_group_calls(monkeypatch) -> list:
    """A list that gets one entry per ``LoraGroupFunction.apply``."""
    calls = []
    monkeypatch.setattr(lora_group.LoraGroupFunction, "apply",
                        lambda *a, _f=lora_group.LoraGroupFunction.apply: calls.append(1) or _f(*a))
    return calls


def run(model, ids):
    torch.manual_seed(1)
    out = model(ids).logits
    out.float().square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch,dtype,matmul,dropout,compile_", [
    ("llama", torch.float32, "auto", 0.1, "1"),
    ("llama", torch.float32, "auto", 0.0, "1"),
    ("llama", torch.float32, "auto", 0.1, "0"),  # masks drawn from the generator, eager kernels
    ("qwen2", torch.float32, "auto", 0.1, "1"),  # q/k/v with biases
    ("llama", torch.bfloat16, "fp32", 0.1, "0"),  # one fp32 copy of x per group
    ("llama", torch.bfloat16, "native", 0.0, "0"),
    # the same compiled: bf16 graphs of their own (~45 s cold), in `make test-slow`
    pytest.param("llama", torch.bfloat16, "fp32", 0.1, "1", marks=[pytest.mark.slow, pytest.mark.ci]),
    pytest.param("llama", torch.bfloat16, "native", 0.0, "1", marks=pytest.mark.slow),
])
def test_grouped_equals_one_by_one(monkeypatch, compile_, dropout, arch, dtype, matmul):
    monkeypatch.setenv("LORAFIT_COMPILE", compile_)
    monkeypatch.setenv("LORAFIT_HALF_MATMUL", matmul)
    calls = counted_group_calls(monkeypatch)
    base = tiny(arch).to(dtype)
    apply_lora(base, LoraConfig(r=4, dropout=dropout, target_modules="all-linear"))
    for n, p in base.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    grouped = copy.deepcopy(base)
    assert len(lora_group.use_shared_input_groups(grouped)) == 4  # (q/k/v, gate/up) × 2 layers
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


def grouped_attention(monkeypatch, dropout=0.0):
    """A tiny Llama with LoRA q/k/v grouped, its first attention block, and the group-call counter. Eager kernels:
    these tests are about the group's bookkeeping (test_grouped_equals_one_by_one compiles)."""
    monkeypatch.setenv("LORAFIT_COMPILE", "0")
    calls = counted_group_calls(monkeypatch)
    m = tiny()
    apply_lora(m, LoraConfig(r=4, dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj"]))
    lora_group.use_shared_input_groups(m)
    m.train()
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return m, m.model.layers[0].self_attn, calls


def test_member_called_on_another_tensor_computes_alone_and_turns_the_group_off(monkeypatch):
    """A member called on another tensor, or on the same one modified in place, computes by itself, and the
    group stays off from then on; each output is still its own layer's."""
    _, attn, calls = grouped_attention(monkeypatch)

    def alone(proj, inp):
        return proj.base_layer(inp) + proj.lora_B(proj.lora_A(inp)) * proj.scaling

    x = torch.randn(2, 5, 32)
    q = attn.q_proj(x)
    assert calls == [1] and attn.q_proj.group.active
    x2 = x.clone()
    k = attn.k_proj(x2)  # another tensor: a miss
    assert not attn.q_proj.group.active
    v = attn.v_proj(x)
    torch.testing.assert_close(q, alone(attn.q_proj, x))
    torch.testing.assert_close(k, alone(attn.k_proj, x2))
    torch.testing.assert_close(v, alone(attn.v_proj, x))
    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert calls == [1]  # off for good

    _, attn, calls = grouped_attention(monkeypatch)
    q = attn.q_proj(x)
    x.add_(1.0)  # modified in place after the group ran: k and v compute alone
    k = attn.k_proj(x)
    torch.testing.assert_close(k, alone(attn.k_proj, x))
    assert not attn.q_proj.group.active


def test_not_training_or_no_grad_runs_one_by_one(monkeypatch):
    m, attn, calls = grouped_attention(monkeypatch)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    m.eval()
    attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert calls == [] and attn.q_proj.group.active


def test_unused_member_output_gets_no_gradient(monkeypatch):
    """An output nobody uses (v here) gets no gradient, as one by one: its A and B grads stay None."""
    m, attn, calls = grouped_attention(monkeypatch, dropout=0.2)
    ref = copy.deepcopy(m)
    for layer in (ref.model.layers[0].self_attn.q_proj, ref.model.layers[0].self_attn.k_proj):
        layer.group = None
    x = torch.randn(2, 5, 32)
    grads = []
    for model in (m, ref):
        a = model.model.layers[0].self_attn
        torch.manual_seed(3)
        q, k = a.q_proj(x), a.k_proj(x)
        if model is m:
            a.v_proj(x)  # consumed, unused
        (q.square().sum() + k.sum()).backward()
        grads.append({n: p.grad for n, p in a.named_parameters() if p.requires_grad})
    assert calls == [1]
    assert grads[0]["v_proj.lora_A.weight"] is None and grads[0]["v_proj.lora_B.weight"] is None
    for n in ("q_proj.lora_A.weight", "q_proj.lora_B.weight", "k_proj.lora_A.weight", "k_proj.lora_B.weight"):
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_trainable_biases_and_frozen_a_with_dropout(monkeypatch):
    """Qwen2's q/k/v biases trained (bias="lora_only") and every A frozen, dropout on: the mixed needs path."""
    calls = counted_group_calls(monkeypatch)
    base = tiny("qwen2")
    # eager: the group's needs logic is the same compiled (test_grouped_equals_one_by_one runs both)
    apply_lora(base, LoraConfig(r=4, dropout=0.2, target_modules="all-linear", bias="lora_only"),
               options=options(compile_=False))
    for n, p in base.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
        if "lora_A" in n:
            p.requires_grad_(False)
    grouped = copy.deepcopy(base)
    lora_group.use_shared_input_groups(grouped)
    base.train(), grouped.train()
    ids = torch.randint(0, 100, (2, 9))
    out_ref, grads_ref = run(base, ids)
    out, grads = run(grouped, ids)
    assert len(calls) == 4 and any(n.endswith("q_proj.base_layer.bias") for n in grads)
    torch.testing.assert_close(out, out_ref)
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_deepcopy_regroups_the_copy_and_model_is_freed_by_refcount():
    import gc
    import weakref

    m = tiny()
    apply_lora(m, LoraConfig(r=4, target_modules="all-linear"))
    lora_group.use_shared_input_groups(m)
    c = copy.deepcopy(m)
    attn = c.model.layers[1].self_attn
    assert attn.q_proj.group is not m.model.layers[1].self_attn.q_proj.group
    assert attn.q_proj.group.layers == [attn.q_proj, attn.k_proj, attn.v_proj]
    gc.disable()
    try:
        ref = weakref.ref(m.model.layers[0].self_attn.q_proj)
        del m
        assert ref() is None  # no reference cycle through the groups
    finally:
        gc.enable()


def test_trainer_groups_and_checkpointing_replays_masks():
    """make_trainable groups the projections; with checkpointing the recomputed group draws the same masks. Eager,
    as test_lora's replay check: the seeds come from the RNG state checkpointing restores, compiled or not."""
    grads = []
    for gc in (False, True):
        m = make_trainable(tiny(), LoraConfig(r=4, dropout=0.3, target_modules="all-linear"), gc,
                           options(compile_=False))
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
