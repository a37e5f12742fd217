"""apply_lean_kernels: the family table holds for the installed transformers, and a handle undoes everything."""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch
from conftest import options, rope_users, tiny_causal_lm

from lorafit.lora import LoraConfig, apply_lora
from lorafit.patches import apply_lean_kernels
from lorafit.patches.families import FAMILIES


def _modelling(model_type: str):
    name = model_type.removesuffix("_text")
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        pytest.skip(f"this transformers has no {name}")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_table_matches_transformers_source(model_type):
    """Each listed class computes what the kernel assumes (the same source as Llama's): the check lives here,
    at test time, never at run time."""
    from transformers.models.llama import modeling_llama as llama

    family, module = FAMILIES[model_type], _modelling(model_type)

    def src(fn):  # transformers' own function, also while a patched model's RoPE dispatcher is installed
        return inspect.getsource(getattr(fn, "lorafit_original", fn))

    for cls in family.rms_norm:
        assert src(getattr(module, cls).forward) == src(llama.LlamaRMSNorm.forward), cls
    for cls in family.gated_mlp:
        assert src(getattr(module, cls).forward) == src(llama.LlamaMLP.forward), cls
    if family.rope:
        assert src(module.apply_rotary_pos_emb) == src(llama.apply_rotary_pos_emb)
        assert src(module.rotate_half) == src(llama.rotate_half)


def _step(model, ids):
    torch.manual_seed(3)
    out = model(ids).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


# bf16 on eager kernels: its compiled graphs are its own (~20 s cold); test_lean_kernels.py compiles them (make test-slow)
@pytest.mark.parametrize("dtype,compile_", [(torch.float32, True), (torch.bfloat16, False)])
def test_restore_brings_back_transformers_computation(dtype, compile_):
    """Patched: same math as the plain model (to rounding); restored: bitwise the plain model again, with no
    hook, instance forward or attention implementation of lorafit's left behind."""
    plain = tiny_causal_lm("llama").to(dtype)
    apply_lora(plain, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"), options=options(compile_))
    for n, p in plain.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    plain.train()
    lean = copy.deepcopy(plain)
    ids = torch.randint(0, 100, (2, 9))
    ref_out, ref_grads = _step(plain, ids)
    handle = apply_lean_kernels(lean, options=options(compile_, half_matmul="fp32"))
    assert handle.applied == {"shared_inputs": 4, "swiglu": 2, "rms_norm": 5, "rope": 1, "attention": 1}
    assert lean.config._attn_implementation == "lorafit_sdpa" and lean.lean_kernels is handle
    out, grads = _step(lean, ids)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **tol, msg=n)
    users = rope_users()
    handle.restore()
    assert rope_users() == users - 1  # the dispatcher goes when its last model is restored or collected
    assert not hasattr(lean, "lean_kernels") and lean.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) or m._forward_hooks or m._forward_pre_hooks for m in lean.modules())
    assert all(getattr(m, "group", None) is None for m in lean.modules())
    out, grads = _step(lean, ids)
    assert torch.equal(out, ref_out)
    for n in ref_grads:
        assert torch.equal(grads[n], ref_grads[n]), n


def test_a_collected_model_releases_the_rope_dispatcher():
    import gc

    gc.collect()
    users = rope_users()
    model = tiny_causal_lm("llama")
    apply_lean_kernels(model, options=options(), rope=True)
    assert rope_users() == users + 1
    del model
    gc.collect()
    assert rope_users() == users


def test_switches_are_opt_in_per_kernel():
    model = tiny_causal_lm("qwen2")
    handle = apply_lean_kernels(model, options=options(), shared_inputs=False, swiglu=False, rope=False,
                                attention=False)
    assert handle.applied == {"rms_norm": 5} and handle.notice is None


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd saves for backward over one forward of ``batch``."""
    storages = {}

    def pack(t):
        if t.device.type == "cpu" and t.untyped_storage().nbytes():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch).logits
    del out
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_right_padded_batch_runs_without_a_mask_and_equals_the_masked_pass(dtype):
    """Rows padded on the right (every training batch) need no mask under causal attention: every real token's
    output and every gradient equal the masked pass's, and no (batch × query × key) mask is saved for backward."""
    plain = tiny_causal_lm("llama").to(dtype)
    apply_lora(plain, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"), options=options())
    for n, p in plain.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    lean = copy.deepcopy(plain)
    apply_lean_kernels(lean, options=options(compile_=False, half_matmul="fp32"))
    ids = torch.randint(1, 100, (2, 64))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    real = mask.bool()

    def step(model):
        out = model(**batch).logits
        out[real].float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out[real].detach(), grads

    (ref_out, ref_grads), (out, grads) = step(plain), step(lean)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **tol, msg=n)
    # what backward keeps is what an unpadded batch of the same shape keeps
    assert _saved_bytes(lean, batch) == _saved_bytes(lean, {"input_ids": ids})


def test_a_needed_mask_is_additive_in_the_compute_dtype_once_per_forward():
    """Left padding (generation) keeps its mask, made additive in the model's dtype (SDPA would convert a boolean
    one in every layer and keep each copy); a sliding window or an offset keeps transformers' own rules."""
    from lorafit.patches.attention import lean_mask

    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    kw = dict(batch_size=2, q_length=4, kv_length=4, attention_mask=left, dtype=torch.bfloat16)
    mask = lean_mask(**kw)
    assert mask.dtype == torch.bfloat16 and mask.shape == (2, 1, 4, 4)
    assert mask[0, 0, 3, 0] == torch.finfo(torch.bfloat16).min and mask[0, 0, 3, 2] == 0 and mask[1, 0, 0, 1] < 0
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert lean_mask(**{**kw, "attention_mask": right}) is None
    assert lean_mask(**{**kw, "attention_mask": right, "allow_is_causal_skip": False}) is not None
    assert lean_mask(**{**kw, "attention_mask": right, "q_length": 2, "kv_length": 4, "q_offset": 2}) is not None


def test_a_masked_call_of_a_grouped_query_model_keeps_its_key_value_heads():
    """A shared prompt's cache pass needs a mask. transformers would repeat the key/value heads for that SDPA call
    and backward would keep the copies; lorafit's attention passes the grouped heads to SDPA as they are: the
    same hidden states and gradients as the plain pass, and no repeated keys or values saved."""
    from lorafit.train.loss import decoder_stack, hidden_states

    model = tiny_causal_lm("llama")  # 4 query heads, 2 key/value heads, head_dim 8
    apply_lora(model, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"), options=options())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    apply_lean_kernels(model, options=options(compile_=False, half_matmul="fp32"))
    model.train()
    ids = torch.randint(1, 100, (2, 64))
    ids[1, :16] = ids[0, :16]
    shapes = set()

    def run(share: bool):
        def pack(t):
            shapes.add(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = hidden_states(model, decoder_stack(model), {"input_ids": ids}, share)
        h.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return h.detach(), grads

    ref_h, ref_grads = run(False)
    shapes.clear()
    h, grads = run(True)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)
    assert (2, 2, 64, 8) in shapes and (2, 4, 64, 8) not in shapes  # keys/values saved with their own 2 heads
