"""Frozen bf16 matmuls on fp32 copies (``lorafit.options``' rule, ``lorafit.kernels.matmul``): when it is chosen,
and that it is the same math rounded once — at least as close to an fp64 reference as the native bf16 GEMMs."""

import copy
from dataclasses import replace

import pytest
import torch
from conftest import lean_kernels, options, saved_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit import LorafitError
from lorafit.kernels import attention, matmul
from lorafit.kernels.loss import LinearCrossEntropy
from lorafit.lora import LoraConfig, LoraLinear, apply_lora
from lorafit.memory.estimate import Settings
from lorafit.options import ENV_HALF_MATMUL, RuntimeOptions

bf16 = torch.bfloat16


def test_which_dtype_the_matmuls_run_in():
    fp32 = RuntimeOptions.resolve(half_matmul="fp32")
    assert matmul.compute_dtype(fp32, bf16, "cpu") == torch.float32
    assert matmul.compute_dtype(fp32, torch.float16, "cpu") == torch.float32  # fp16 goes as bf16 (HALF_DTYPES)
    assert matmul.compute_dtype(fp32, torch.float16, "cuda") == torch.float16
    assert matmul.compute_dtype(fp32, torch.float32, "cpu") == torch.float32
    assert matmul.compute_dtype(fp32, bf16, "cuda") == bf16  # a GPU's bf16 GEMMs are the fast ones
    assert matmul.compute_dtype(RuntimeOptions.resolve(half_matmul="native"), bf16, "cpu") == bf16
    # the environment is the fallback, read when the options are resolved (once per run), and checked then
    assert RuntimeOptions.resolve(env={ENV_HALF_MATMUL: "native"}).half_matmul == "native"
    assert RuntimeOptions.resolve(half_matmul="fp32", env={ENV_HALF_MATMUL: "native"}).half_matmul == "fp32"
    with pytest.raises(LorafitError, match=f"{ENV_HALF_MATMUL}='fast': use one of auto, native, fp32"):
        RuntimeOptions.resolve(env={ENV_HALF_MATMUL: "fast"})
    with pytest.raises(LorafitError, match="half_matmul: got 'fast'"):
        RuntimeOptions(half_matmul="fast")


@pytest.mark.parametrize("slow,expected", [(True, torch.float32), (False, bf16)])
def test_auto_follows_the_cpu(slow, expected):
    """x86 without AMX: fp32 copies; AMX (or not x86): native bf16. Small GEMMs stay native in auto mode."""
    auto = RuntimeOptions(half_matmul="auto", slow_bf16_gemm=slow)
    assert matmul.compute_dtype(auto, bf16, "cpu") == expected
    assert matmul.compute_dtype(auto, bf16, "cpu", rows=512) == expected
    assert matmul.compute_dtype(auto, bf16, "cpu", rows=1) == bf16  # a generation step: the copy would cost more
    forced = RuntimeOptions(half_matmul="fp32", slow_bf16_gemm=slow)
    assert matmul.compute_dtype(forced, bf16, "cpu", rows=1) == torch.float32  # forced: whatever the size
    native = RuntimeOptions(half_matmul="native", slow_bf16_gemm=slow)
    assert matmul.compute_dtype(native, bf16, "cpu", rows=512) == bf16


def test_cpu_flags_decide_auto(monkeypatch):
    from lorafit import options as opts

    for flags, slow in (({"avx2", "avx512f"}, True), ({"avx2", "amx_tile"}, False), (set(), False)):
        monkeypatch.setattr(opts, "cpu_flags", lambda f=frozenset(flags): f)
        monkeypatch.setattr(opts.platform, "machine", lambda: "x86_64")
        assert opts.cpu_has_slow_bf16_gemm() is slow
    monkeypatch.setattr(opts.platform, "machine", lambda: "aarch64")
    assert not opts.cpu_has_slow_bf16_gemm()  # not x86: native bf16


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
    calls, current = [], {}
    monkeypatch.setattr(matmul, "to_compute", _spy(matmul.to_compute, calls, current))
    results = {}
    for mode in ("native", "fp32"):
        # eager: the fp32-copy rule (matmul.to_compute) is the same compiled; compiling the bf16 dropout kernels
        # for this check cost 24 s of a cold suite (compiled coverage: test_peer_exact's bf16 fp32-copy runs)
        layer.options = options(compile_=False, half_matmul=mode)
        current["mode"] = mode
        layer.zero_grad()
        results[mode] = _run(layer, x, g)
    assert [mode for mode, _ in calls] == ["fp32", "fp32"]  # only the fp32 run took the upcast path, each way
    y, gx, ga, gb = results["fp32"]
    assert y.dtype == gx.dtype == bf16 and ga.dtype == gb.dtype == torch.float32

    # fp64 reference with the same mask: the model's own math in a wider dtype
    ref = copy.deepcopy(layer).double()
    ref.zero_grad()
    ref.options = options(compile_=False, half_matmul="native")  # the same (eager) dropout masks
    yr, gxr, gar, gbr = _run(ref, x.double(), g.double())

    def err(a, b):
        return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())

    for got, native, want in zip(results["fp32"], results["native"], (yr, gxr, gar, gbr), strict=True):
        assert err(got, want) <= 4e-3  # one bf16 rounding of the result (2⁻⁸ relative)
        assert err(got, want) <= err(native, want) * 1.5 + 1e-6


def _spy(fn, calls, current):
    """``fn`` recording (the run's half_matmul mode, (number of tensors, first tensor's last dim)) per call."""

    def spy(dtype, *tensors):
        calls.append((current["mode"], (len(tensors), tensors[0].shape[-1])))
        return fn(dtype, *tensors)

    return spy


def _tiny_lora_llama(mode: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=300)
    model = LlamaForCausalLM(cfg).to(bf16)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"),
               options=options(compile_=False, half_matmul=mode))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    lean_kernels(model, compile_=False, half_matmul=mode, swiglu=True)  # eager, as in test_lora_layer_on_fp32_copies
    return model.train()


def test_fused_down_proj_on_fp32_copies(monkeypatch):
    """The gated MLP's fused LoRA down_proj takes the same path: same outputs and gradients, within bf16."""
    ids = torch.randint(0, 300, (2, 16))
    runs = {}
    calls, current = [], {}
    monkeypatch.setattr(matmul, "to_compute", _spy(matmul.to_compute, calls, current))
    for mode in ("native", "fp32"):
        current["mode"] = mode
        m = _tiny_lora_llama(mode)
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


def test_loss_head_on_fp32_copy():
    """A frozen bf16 head: logits from an fp32 copy are not rounded to bf16, so the loss is closer to fp64."""
    torch.manual_seed(0)
    h = torch.randn(40, 32).to(bf16)
    w = (torch.randn(500, 32) * 0.3).to(bf16)
    y = torch.randint(0, 500, (40,))
    hr = h.double().requires_grad_(True)
    want = LinearCrossEntropy.apply(hr, w.double(), y, 16, None, options())
    want.backward()
    got = {}
    for mode in ("native", "fp32"):
        hx = h.clone().requires_grad_(True)
        loss = LinearCrossEntropy.apply(hx, w, y, 16, None, options(half_matmul=mode))
        loss.backward()
        got[mode] = float(loss), hx.grad
    assert got["fp32"][1].dtype == bf16
    err = {m: abs(v[0] - float(want)) / float(want) for m, v in got.items()}
    assert err["fp32"] < 1e-5 < err["native"]
    gerr = float((got["fp32"][1].double() - hr.grad).abs().max() / hr.grad.abs().max())
    assert gerr <= 4e-3


def test_estimator_counts_the_fp32_copies(monkeypatch):
    from lorafit.options import ENV_HALF_MATMUL, RuntimeOptions

    kw = dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=64, r=8, device="cpu")
    fp32, native = RuntimeOptions(half_matmul="fp32"), RuntimeOptions(half_matmul="native")
    monkeypatch.setenv(ENV_HALF_MATMUL, "fp32")
    up = Settings(**kw)  # the runtime options resolved from the environment by default
    assert up.upcast and up.effective_matmul_dtype == "float32" and up.compute_bytes == 4
    assert Settings(**{**kw, "device": "cuda"}).effective_matmul_dtype == "bfloat16"
    assert Settings(**{**kw, "method": "full"}).effective_matmul_dtype == "bfloat16"  # a trained base: never
    assert not replace(up, method="full").upcast and not replace(up, device="cuda").upcast  # re-resolved
    monkeypatch.setenv(ENV_HALF_MATMUL, "native")
    assert not Settings(**kw).upcast and Settings(**kw, runtime=fp32).upcast  # an explicit choice wins
    with pytest.raises(LorafitError, match="half_matmul"):
        Settings(**kw, runtime=RuntimeOptions(half_matmul="float16"))

    from lorafit.memory import activations as act
    from lorafit.memory.spec import ModelSpec

    spec = ModelSpec("t", "llama", 64, 160, 2, 4, 2, 16, 5000, True)
    up, native = Settings(**kw, runtime=fp32), Settings(**kw, runtime=native)
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
    model = _tiny_llama_bf16()
    ids = torch.randint(0, 100, (2, 16))
    ref = copy.deepcopy(model).double()
    want, want_g = _embedding_grad(ref, ids)
    native, native_g = _embedding_grad(model, ids)
    saved_native = saved_bytes(model, ids)[1]

    calls = []
    monkeypatch.setattr(attention.HalfAttentionOnFp32, "forward",
                        staticmethod(lambda ctx, *a, f=attention.HalfAttentionOnFp32.forward: calls.append(1) or f(ctx, *a)))
    assert lean_kernels(model, half_matmul="fp32", attention=True).applied == {"attention": 1}
    got, got_g = _embedding_grad(model, ids)
    assert len(calls) == 2  # one per layer

    def err(a, b):
        return float((a.double() - b).abs().max() / b.abs().max())

    assert err(got, want) <= err(native, want) * 1.5 + 1e-6
    assert err(got_g, want_g) <= err(native_g, want_g) * 1.5 + 1e-6
    assert saved_bytes(model, ids)[1] == saved_native


def test_attention_leaves_other_cases_to_transformers(monkeypatch):
    model, other = _tiny_llama_bf16(), _tiny_llama_bf16()
    ids = torch.randint(0, 100, (2, 16))
    handle = lean_kernels(model, half_matmul="fp32", attention=True)
    calls = []
    monkeypatch.setattr(attention.HalfAttentionOnFp32, "apply",
                        lambda *a, f=attention.HalfAttentionOnFp32.apply: calls.append(1) or f(*a))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: a mask, which the wrapper does not take
    model(ids, attention_mask=mask)
    assert calls == []
    model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert calls == [1, 1]  # the prefill, one per layer; not the cached decoding steps (one query token)
    other(ids)  # another model in the process: transformers' SDPA, untouched
    assert calls == [1, 1]
    handle.restore()
    model(ids)
    assert calls == [1, 1] and model.config._attn_implementation == "sdpa"
    native = _tiny_llama_bf16()
    lean_kernels(native, half_matmul="native", attention=True)
    native(ids)  # native bf16 chosen: the lean function hands the call to SDPA
    assert calls == [1, 1]


def test_large_heads_stay_native(monkeypatch):
    """auto: a head whose fp32 copy would exceed HEAD_COPY_MAX_BYTES is not copied; the estimator agrees."""
    from lorafit import options as opts

    monkeypatch.setattr(opts, "HEAD_COPY_MAX_BYTES", 4 * 5000 * 64 - 1)
    auto = RuntimeOptions(half_matmul="auto", slow_bf16_gemm=True)
    assert not matmul.upcasts_head(auto, bf16, "cpu", rows=512, numel=5000 * 64)
    assert matmul.upcasts_head(auto, bf16, "cpu", rows=512, numel=4000 * 64)
    forced = RuntimeOptions(half_matmul="fp32", slow_bf16_gemm=True)
    assert matmul.upcasts_head(forced, bf16, "cpu", rows=512, numel=5000 * 64)  # forced


def test_estimator_keeps_large_heads_native(monkeypatch):
    """auto: the estimator counts no fp32 copy of a head over HEAD_COPY_MAX_BYTES (the rule training uses)."""
    from lorafit import options
    from lorafit.memory import activations as act
    from lorafit.memory.spec import ModelSpec

    monkeypatch.setattr(options, "HEAD_COPY_MAX_BYTES", 4 * 5000 * 64 - 1)
    kw = dict(method="lora", dtype="bfloat16", micro_batch=2, seq_len=128, r=8, device="cpu")
    s = Settings(**kw, runtime=options.RuntimeOptions(half_matmul="auto", slow_bf16_gemm=True))
    assert s.upcast and not s.upcast_head(5000 * 64) and s.upcast_head(4000 * 64)
    forced = Settings(**kw, runtime=options.RuntimeOptions(half_matmul="fp32"))
    assert forced.upcast_head(5000 * 64)  # forced: whatever the size
    spec = ModelSpec("t", "llama", 64, 160, 2, 4, 2, 16, 5000, True)
    native = Settings(**kw, runtime=options.RuntimeOptions(half_matmul="native"))
    assert act.loss_buffers(spec, s).total == act.loss_buffers(spec, native).total  # layers copied, head not


def test_fused_adamw_is_kept_on_resume():
    from lorafit.train.optim import build_optimizer, use_fused

    model = torch.nn.Linear(4, 3)
    opt = build_optimizer(model, "adamw_torch", lr=1e-3)
    assert all(g["fused"] for g in opt.param_groups)
    old = opt.state_dict()
    for g in old["param_groups"]:  # a checkpoint written before AdamW ran fused on CPU
        g["fused"] = None
    opt.load_state_dict(old)
    use_fused(opt)
    assert all(g["fused"] for g in opt.param_groups)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()
