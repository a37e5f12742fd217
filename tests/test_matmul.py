"""Frozen bf16 matmuls on fp32 copies (``lorafit.matmul``): when it is chosen, and that it is the same math
rounded once — at least as close to an fp64 reference as the native bf16 GEMMs."""

import copy
from dataclasses import replace

import pytest
import torch
from conftest import saved_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit import LorafitError, matmul
from lorafit.lora import LoraConfig, LoraLinear, apply_lora
from lorafit.lora import layer as lora_layer
from lorafit.memory.estimate import Settings
from lorafit.train import attention
from lorafit.train.gated_mlp import use_lean_gated_mlps
from lorafit.train.loss import LinearCrossEntropy

bf16 = torch.bfloat16


def test_which_dtype_the_matmuls_run_in(monkeypatch):
    monkeypatch.setenv(matmul.ENV, "fp32")
    assert matmul.compute_dtype(bf16, "cpu") == torch.float32
    assert matmul.compute_dtype(torch.float16, "cpu") == torch.float16  # lorafit trains bf16 or fp32
    assert matmul.compute_dtype(torch.float32, "cpu") == torch.float32
    assert matmul.compute_dtype(bf16, "cuda") == bf16  # a GPU's bf16 GEMMs are the fast ones
    monkeypatch.setenv(matmul.ENV, "native")
    assert matmul.compute_dtype(bf16, "cpu") == bf16
    monkeypatch.setenv(matmul.ENV, "fast")
    with pytest.raises(LorafitError, match=f"{matmul.ENV}='fast': use one of auto, native, fp32"):
        matmul.compute_dtype(bf16, "cpu")


@pytest.mark.parametrize("slow,expected", [(True, torch.float32), (False, bf16)])
def test_auto_follows_the_cpu(monkeypatch, slow, expected):
    """x86 without AMX: fp32 copies; AMX (or not x86): native bf16. Small GEMMs stay native in auto mode."""
    monkeypatch.setenv(matmul.ENV, "auto")
    monkeypatch.setattr(matmul, "slow_bf16_gemm", lambda: slow)
    assert matmul.compute_dtype(bf16, "cpu") == expected
    assert matmul.compute_dtype(bf16, "cpu", rows=512) == expected
    assert matmul.compute_dtype(bf16, "cpu", rows=1) == bf16  # a generation step: the weight copy would cost more
    monkeypatch.setenv(matmul.ENV, "fp32")
    assert matmul.compute_dtype(bf16, "cpu", rows=1) == torch.float32  # forced: whatever the size
    monkeypatch.setenv(matmul.ENV, "native")
    assert matmul.compute_dtype(bf16, "cpu", rows=512) == bf16


def _lora_layer(bias: bool, dropout: float) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(48, 40, bias=bias).to(bf16), r=4, alpha=8, dropout=dropout)
    layer.base_layer.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    return layer


def _run(layer, x, g):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)  # the dropout seed
    y = layer(x)
    y.backward(g)
    return y, x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_layer_on_fp32_copies(monkeypatch, bias, dropout):
    layer = _lora_layer(bias, dropout)
    x = torch.randn(3, 7, 48).to(bf16)
    g = torch.randn(3, 7, 40).to(bf16)
    calls = []
    monkeypatch.setattr(lora_layer, "to_compute", _spy(lora_layer.to_compute, calls))
    results = {}
    for mode in ("native", "fp32"):
        monkeypatch.setenv(matmul.ENV, mode)
        layer.zero_grad()
        results[mode] = _run(layer, x, g)
    assert [mode for mode, _ in calls] == ["fp32", "fp32"]  # only the fp32 run took the upcast path, each way
    y, gx, ga, gb = results["fp32"]
    assert y.dtype == gx.dtype == bf16 and ga.dtype == gb.dtype == torch.float32

    # fp64 reference with the same mask: the model's own math in a wider dtype
    ref = copy.deepcopy(layer).double()
    ref.zero_grad()
    monkeypatch.setenv(matmul.ENV, "native")
    yr, gxr, gar, gbr = _run(ref, x.double(), g.double())

    def err(a, b):
        return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())

    for got, native, want in zip(results["fp32"], results["native"], (yr, gxr, gar, gbr), strict=True):
        assert err(got, want) <= 4e-3  # one bf16 rounding of the result (2⁻⁸ relative)
        assert err(got, want) <= err(native, want) * 1.5 + 1e-6


def _spy(fn, calls):
    """``fn`` recording (LORAFIT_HALF_MATMUL, (number of tensors, first tensor's last dim)) per call."""
    import os

    def spy(dtype, *tensors):
        calls.append((os.environ[matmul.ENV], (len(tensors), tensors[0].shape[-1])))
        return fn(dtype, *tensors)

    return spy


def _tiny_lora_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=300)
    model = LlamaForCausalLM(cfg).to(bf16)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    use_lean_gated_mlps(model)
    return model.train()


def test_fused_down_proj_on_fp32_copies(monkeypatch):
    """The gated MLP's fused LoRA down_proj takes the same path: same outputs and gradients, within bf16."""
    model = _tiny_lora_llama()
    ids = torch.randint(0, 300, (2, 16))
    runs = {}
    calls = []
    monkeypatch.setattr(lora_layer, "to_compute", _spy(lora_layer.to_compute, calls))
    for mode in ("native", "fp32"):
        monkeypatch.setenv(matmul.ENV, mode)
        m = copy.deepcopy(model)
        torch.manual_seed(3)
        out = m(ids).logits.float()
        out.square().mean().backward()
        runs[mode] = out.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    # forward copies (input, weight, bias) of width intermediate=128: both layers' down_proj, in the fp32 run only
    assert [mode for mode, what in calls if what == (3, 128)] == ["fp32", "fp32"]
    (o1, g1), (o2, g2) = runs["native"], runs["fp32"]
    assert float((o1 - o2).abs().max() / o1.abs().max()) < 3e-2
    assert set(g1) == set(g2) and len(g1) == 2 * 7 * 2
    for n in g1:
        assert float((g1[n] - g2[n]).abs().max() / g1[n].abs().max()) < 6e-2, n


def test_loss_head_on_fp32_copy(monkeypatch):
    """A frozen bf16 head: logits from an fp32 copy are not rounded to bf16, so the loss is closer to fp64."""
    torch.manual_seed(0)
    h = torch.randn(40, 32).to(bf16)
    w = (torch.randn(500, 32) * 0.3).to(bf16)
    y = torch.randint(0, 500, (40,))
    hr = h.double().requires_grad_(True)
    want = LinearCrossEntropy.apply(hr, w.double(), y, 16, None)
    want.backward()
    got = {}
    for mode in ("native", "fp32"):
        monkeypatch.setenv(matmul.ENV, mode)
        hx = h.clone().requires_grad_(True)
        loss = LinearCrossEntropy.apply(hx, w, y, 16, None)
        loss.backward()
        got[mode] = float(loss), hx.grad
    assert got["fp32"][1].dtype == bf16
    err = {m: abs(v[0] - float(want)) / float(want) for m, v in got.items()}
    assert err["fp32"] < 1e-5 < err["native"]
    gerr = float((got["fp32"][1].double() - hr.grad).abs().max() / hr.grad.abs().max())
    assert gerr <= 4e-3


def test_estimator_counts_the_fp32_copies(monkeypatch):
    kw = dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=64, r=8, device="cpu")
    monkeypatch.setenv(matmul.ENV, "fp32")
    up = Settings(**kw)
    assert up.upcast and up.effective_matmul_dtype == "float32" and up.compute_bytes == 4
    assert Settings(**{**kw, "device": "cuda"}).effective_matmul_dtype == "bfloat16"
    assert Settings(**{**kw, "method": "full"}).effective_matmul_dtype == "bfloat16"  # a trained base: never
    assert not replace(up, method="full").upcast and not replace(up, device="cuda").upcast  # re-resolved
    monkeypatch.setenv(matmul.ENV, "native")
    native = Settings(**kw)
    assert not native.upcast and Settings(**{**kw, "matmul_dtype": "fp32"}).upcast  # an explicit choice wins
    with pytest.raises(LorafitError, match="matmul dtype"):
        Settings(**{**kw, "matmul_dtype": "float16"})

    from lorafit.memory import activations as act
    from lorafit.memory.spec import ModelSpec

    spec = ModelSpec("t", "llama", 64, 160, 2, 4, 2, 16, 5000, True)
    up, native = Settings(**kw, matmul_dtype="float32"), Settings(**kw, matmul_dtype="bfloat16")
    d_loss = act.loss_buffers(spec, up).total - act.loss_buffers(spec, native).total
    c = min(act.chunk_tokens(spec, up), 2 * 63)  # one chunk, at most all trained rows
    # + the head's fp32 copy and a chunk's fp32 rows and gradient, − the bf16 logits buffer
    assert d_loss == 5000 * 64 * 4 + 2 * c * 64 * 4 - c * 5000 * 2


def _tiny_llama_bf16():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(bf16)


def _embedding_grad(model, ids, **kw):
    model.zero_grad()
    model.model.embed_tokens.weight.requires_grad_(True)
    out = model(ids, **kw).logits.float()
    out.square().mean().backward()
    return out.detach(), model.model.embed_tokens.weight.grad.float()


def test_attention_on_fp32_copies(monkeypatch):
    """Causal attention of a bf16 model on fp32 copies: as close to fp64 as SDPA in bf16, same saved bytes."""
    monkeypatch.setenv(matmul.ENV, "fp32")
    model = _tiny_llama_bf16()
    ids = torch.randint(0, 100, (2, 16))
    ref = copy.deepcopy(model).double()
    want, want_g = _embedding_grad(ref, ids)
    native, native_g = _embedding_grad(model, ids)
    saved_native = saved_bytes(model, ids)[1]

    calls = []
    monkeypatch.setattr(attention.HalfAttentionOnFp32, "forward",
                        staticmethod(lambda ctx, *a, f=attention.HalfAttentionOnFp32.forward: calls.append(1) or f(ctx, *a)))
    assert attention.use_lean_attention() and not attention.use_lean_attention()  # switched once
    got, got_g = _embedding_grad(model, ids)
    assert len(calls) == 2  # one per layer

    def err(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    assert err(got, want) <= err(native, want) * 1.5 + 1e-6
    assert err(got_g, want_g) <= err(native_g, want_g) * 1.5 + 1e-6
    assert saved_bytes(model, ids)[1] == saved_native


def test_attention_leaves_other_cases_to_transformers(monkeypatch):
    model = _tiny_llama_bf16()
    ids = torch.randint(0, 100, (2, 16))
    attention.use_lean_attention()
    calls = []
    monkeypatch.setattr(attention.HalfAttentionOnFp32, "apply",
                        lambda *a, f=attention.HalfAttentionOnFp32.apply: calls.append(1) or f(*a))
    monkeypatch.setenv(matmul.ENV, "fp32")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a mask, which the wrapper does not take
    model(ids, attention_mask=mask)
    assert calls == []
    model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert calls == [1, 1]  # the prefill, one per layer; not the cached decoding steps (one query token)
    monkeypatch.setenv(matmul.ENV, "native")
    model(ids)
    assert calls == [1, 1]
    assert attention.restore_attention() == 1
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert not hasattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "lorafit_original")


def test_large_heads_stay_native(monkeypatch):
    """auto: a head whose fp32 copy would exceed HEAD_COPY_MAX_BYTES is not copied; the estimator agrees."""
    monkeypatch.setenv(matmul.ENV, "auto")
    monkeypatch.setattr(matmul, "slow_bf16_gemm", lambda: True)
    monkeypatch.setattr(matmul, "HEAD_COPY_MAX_BYTES", 4 * 5000 * 64 - 1)
    assert not matmul.upcasts_head(bf16, "cpu", rows=512, numel=5000 * 64)
    assert matmul.upcasts_head(bf16, "cpu", rows=512, numel=4000 * 64)
    monkeypatch.setenv(matmul.ENV, "fp32")
    assert matmul.upcasts_head(bf16, "cpu", rows=512, numel=5000 * 64)  # forced

    from lorafit.memory import activations as act
    from lorafit.memory.spec import ModelSpec

    monkeypatch.setenv(matmul.ENV, "auto")
    kw = dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=128, r=8, device="cpu")
    s = Settings(**kw)
    assert s.upcast and not s.upcast_head(5000 * 64)
    spec = ModelSpec("t", "llama", 64, 160, 2, 4, 2, 16, 5000, True)
    native = Settings(**kw, matmul_dtype="bfloat16")
    assert act.loss_buffers(spec, s).total == act.loss_buffers(spec, native).total  # layers copied, head not


def test_a_torch_without_the_cpu_checks_keeps_native(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert not matmul.slow_bf16_gemm()


def test_fused_adamw_is_kept_on_resume():
    from types import SimpleNamespace

    from lorafit.train.optim import build_optimizer, use_fused

    model = torch.nn.Linear(4, 3)
    cfg = SimpleNamespace(optimizer="adamw_torch", learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9,
                          adam_beta2=0.999, adam_epsilon=1e-8)
    opt = build_optimizer(model, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    old = opt.state_dict()
    for g in old["param_groups"]:  # a checkpoint written before AdamW ran fused on CPU
        g["fused"] = None
    opt.load_state_dict(old)
    use_fused(opt)
    assert all(g["fused"] for g in opt.param_groups)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
