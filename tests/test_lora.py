"""The LoRA engine against PEFT as the oracle, on tiny random models of several architectures."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from lorafit import LorafitError
from lorafit.lora import (
    LoraConfig,
    apply_lora,
    count_parameters,
    disable_adapter,
    find_targets,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)

SMALL = dict(vocab_size=128, num_hidden_layers=2)


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **SMALL)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **SMALL)
    elif arch == "gemma":
        cfg = GemmaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                          head_dim=8, **SMALL)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=128, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(arch)
    cfg.attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


TARGETS = {"llama": "all-linear", "qwen2": "all-linear", "gemma": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}
ARCHS = list(TARGETS)


def randomize(model, seed=1):
    """Non-zero B so the adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def copy_into_peft(ours, pm):
    """Copy our A/B into the PEFT model by name."""
    ours_state = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name:
                p.copy_(ours_state[name.removeprefix("base_model.model.").replace(".default.", ".")])


def pair(arch, **kw):
    base = make_model(arch)
    ours = copy.deepcopy(base)
    cfg = LoraConfig(r=kw.pop("r", 4), alpha=kw.pop("alpha", 8), target_modules=TARGETS[arch], **kw)
    apply_lora(ours, cfg)
    randomize(ours)
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=TARGETS[arch], use_rslora=cfg.use_rslora,
                           rank_pattern=cfg.rank_pattern, alpha_pattern=cfg.alpha_pattern, lora_dropout=0.0,
                           fan_in_fan_out=arch == "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    copy_into_peft(ours, pm)
    return base, ours, pm


def ids(n=2, t=9, seed=3):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_grads_match_peft(arch):
    _, ours, pm = pair(arch)
    x = ids()
    ours.train(), pm.train()
    lo, lp = ours(x).logits, pm(x).logits
    torch.testing.assert_close(lo, lp, atol=1e-5, rtol=0)
    lo.square().mean().backward()
    lp.square().mean().backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    n_checked = 0
    for n, p in ours.named_parameters():
        if p.requires_grad:
            peft_name = "base_model.model." + n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            torch.testing.assert_close(p.grad, grads[peft_name], atol=1e-6, rtol=1e-4)
            n_checked += 1
    assert n_checked == sum(1 for _ in lora_layers(ours)) * 2
    assert count_parameters(ours).trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rslora_and_patterns_match_peft(arch):
    pat_name = "q_proj" if arch == "llama" else "c_attn"
    _, ours, pm = pair(arch, use_rslora=True, rank_pattern={pat_name: 2}, alpha_pattern={pat_name: 3.0})
    x = ids()
    torch.testing.assert_close(ours(x).logits, pm(x).logits, atol=1e-5, rtol=0)
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters() if f"{pat_name}.lora_A" in n}
    assert all(s[0] == 2 for s in shapes.values()) and shapes


@pytest.mark.parametrize("arch", ARCHS)
def test_our_files_load_in_peft_and_back(arch, tmp_path):
    base, ours, _ = pair(arch)
    x = ids()
    expected = ours(x).logits
    save_adapter(ours, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    torch.testing.assert_close(pm(x).logits, expected, atol=1e-5, rtol=0)
    pm.save_pretrained(tmp_path / "b")
    back = load_adapter(copy.deepcopy(base), tmp_path / "b")
    torch.testing.assert_close(back(x).logits, expected, atol=1e-5, rtol=0)


def test_fresh_adapter_changes_nothing():
    base = make_model("llama")
    x = ids()
    expected = base(x).logits
    for init in ("kaiming", "gaussian"):
        m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", init=init))
        torch.testing.assert_close(m(x).logits, expected, atol=1e-6, rtol=0)


def test_pissa_starts_at_base_and_saves_as_plain_lora(tmp_path):
    base = make_model("llama")
    x = ids()
    expected = base(x).logits
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"], init="pissa"))
    torch.testing.assert_close(m(x).logits, expected, atol=1e-5, rtol=0)
    randomize(m)
    trained = m(x).logits
    save_adapter(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(pm(x).logits, trained, atol=1e-4, rtol=0)


def test_merge_unmerge_unload_roundtrip(tmp_path):
    base, ours, _ = pair("llama")
    x = ids()
    w0 = {n: p.clone() for n, p in base.named_parameters()}
    expected = ours(x).logits
    merge(ours)
    torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=0)
    unmerge(ours)
    for n, p in ours.named_parameters():
        if ".base_layer." in n:
            torch.testing.assert_close(p, w0[n.replace(".base_layer.", ".")], atol=1e-6, rtol=0)
    with disable_adapter(ours):
        torch.testing.assert_close(ours(x).logits, base(x).logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=0)
    plain = merge_and_unload(ours)
    assert not lora_layers(plain) and not any(".lora_" in n for n, _ in plain.named_parameters())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(x).logits, expected, atol=1e-5, rtol=0)


def test_gpt2_conv1d_merge():
    _, ours, _ = pair("gpt2")
    x = ids()
    expected = ours(x).logits
    merge_and_unload(ours)
    torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=0)


def test_safe_merge_refuses_nan():
    _, ours, _ = pair("llama")
    with torch.no_grad():
        lora_layers(ours)[0].lora_B.weight[0, 0] = float("nan")
    before = [p.clone() for p in ours.parameters()]
    with pytest.raises(LorafitError, match="NaN"):
        merge(ours, safe=True)
    assert all(torch.equal(a, b) or a.isnan().any() for a, b in zip(before, ours.parameters(), strict=True))


def test_only_adapter_parameters_change_after_training(monkeypatch):
    monkeypatch.setenv("LORAFIT_COMPILE", "0")  # which parameters move does not depend on compiling (5 graphs cold)
    _, ours, _ = pair("llama", dropout=0.1)
    before = {n: p.clone() for n, p in ours.named_parameters()}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    for _ in range(3):
        out = ours(ids(), labels=ids())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in ours.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".lora_" in n), n


@pytest.mark.parametrize("compile_", ["1", "0"])
def test_dropout_backward_matches_autograd_reference(monkeypatch, compile_):
    """With dropout, our seeded-mask forward and backward equal autograd through the explicit mask."""
    from lorafit.kernels import dropout
    from lorafit.lora.layer import LoraLinear

    monkeypatch.setenv("LORAFIT_COMPILE", compile_)
    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(16, 12), r=4, alpha=8, dropout=0.3).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = dropout.keep_mask(dropout.new_seed("cpu", layer.options.compile), (15, 16), 0.3).view_as(x) / 0.7
    x2 = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A.weight.detach().clone().requires_grad_(), layer.lora_B.weight.detach().clone().requires_grad_()
    ref = layer.base_layer(x2) + ((x2 * mask) @ a.t() @ b.t()) * layer.scaling
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.lora_A.weight.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, b.grad)


@pytest.mark.parametrize("compile_", ["1", "0"])
def test_dropout_mask_rate_independence_and_kernels_agree(compile_):
    """Keep rate 1 - p; masks of successive calls and neighbouring elements uncorrelated; the kernels (compiled
    hash, or eager draws) apply the mask :func:`keep_mask` gives for the seed, also under a memory tracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from lorafit.kernels import dropout

    hashed = compile_ == "1"
    torch.manual_seed(0)
    s1, s2 = dropout.new_seed("cpu", hashed), dropout.new_seed("cpu", hashed)
    assert s1.dtype == (torch.int32 if compile_ == "1" else torch.int64)
    m1 = dropout.keep_mask(s1, (400, 500), 0.25)
    m2 = dropout.keep_mask(s2, (400, 500), 0.25)
    assert abs(m1.mean().item() - 0.75) < 0.005
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])  # noqa: E731
    assert abs(corr(m1, m2)) < 0.01  # two calls
    assert abs(corr(m1[:, 1:], m1[:, :-1])) < 0.01 and abs(corr(m1[1:], m1[:-1])) < 0.01  # neighbours
    x = torch.randn(400, 500)
    assert torch.equal(dropout.dropped(x, seed=s1, p=0.25), x * m1)
    with MemTracker():
        xd, y = dropout.dropped_and_add_dropped(x, x, x, seed=s1, p=0.25)
    assert torch.equal(xd, x * m1) and torch.allclose(y, x + x * m1)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.7])
def test_eager_dropout_mask_is_a_bernoulli_process(p, monkeypatch):
    """The eager mask draws only the gaps between dropped positions (geometric, by inversion): every position,
    the last ones included, is kept with probability 1 - p; a seed gives the same mask again, however its draws
    are split into rounds (one gap a round, or rounds cut short, continue where the last one stopped)."""
    from lorafit.kernels import dropout

    torch.manual_seed(0)
    kept = sum(dropout.keep_mask(dropout.new_seed("cpu", False), (8, 25), p) for _ in range(3000)) / 3000
    sd = (p * (1 - p) / 3000) ** 0.5
    assert (kept - (1 - p)).abs().max() < 5 * sd  # each of the 200 positions, the first and last too
    seed = torch.tensor(9, dtype=torch.int64)
    mask = dropout.keep_mask(seed, (300, 70), p)
    assert torch.equal(mask, dropout.keep_mask(seed, (300, 70), p))
    assert abs(float(torch.corrcoef(torch.stack([mask.reshape(-1)[1:], mask.reshape(-1)[:-1]]))[0, 1])) < 0.03
    monkeypatch.setattr(dropout, "_SPARE_SD", -1e9)  # one draw a round
    assert torch.equal(dropout.keep_mask(seed, (300, 70), p), mask)
    monkeypatch.setattr(dropout, "_SPARE_SD", 6.0)
    monkeypatch.setattr(dropout, "_ROUND", 7)  # rounds cut short
    assert torch.equal(dropout.keep_mask(seed, (300, 70), p), mask)


def test_eager_dropout_mask_with_a_tiny_p_keeps_everything_it_should():
    """A gap longer than the tensor (any p down to the smallest float) is cut at its end: no int64 overflow."""
    from lorafit.kernels import dropout

    for p in (1e-20, 1e-300):
        assert torch.equal(dropout.keep_mask(torch.tensor(3), (40, 50), p), torch.ones(40, 50))


def test_dropout_masks_replay_under_activation_checkpointing():
    """Recomputation draws the same seeds (checkpointing restores the RNG state): checkpointed gradients equal
    plain ones, dropout on, through the lean gated MLP's fused LoRA down_proj. Eager kernels: a compiled one
    applies the mask its seed gives too (test_dropout_mask_rate_independence_and_kernels_agree), and the seeds come
    from the RNG state checkpointing restores either way; compiling both passes cost 80 s of a cold suite."""
    from conftest import options

    from lorafit.train import make_trainable

    grads = []
    for gc in (False, True):
        m = make_trainable(make_model("llama"), LoraConfig(r=4, dropout=0.3, target_modules="all-linear"), gc,
                           options(compile_=False))
        for layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        torch.manual_seed(5)
        m(ids(), labels=ids()).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_bf16_base_keeps_fp32_adapter():
    base = make_model("llama").to(torch.bfloat16)
    m = apply_lora(base, LoraConfig(r=4, target_modules="all-linear"))
    assert all(layer.lora_A.weight.dtype == torch.float32 for layer in lora_layers(m))
    m.train()
    out = m(ids(), labels=ids())
    out.loss.backward()
    assert all(layer.lora_B.weight.grad.dtype == torch.float32 for layer in lora_layers(m))


def test_bias_and_modules_to_save(tmp_path):
    base = make_model("qwen2")  # q/k/v have biases
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias="lora_only",
                                                   modules_to_save=["lm_head"]))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.base_layer.bias" in trainable
    assert "model.layers.0.self_attn.k_proj.bias" not in trainable
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.base_layer.bias.add_(1.0)
    randomize(m)
    x = ids()
    expected = m(x).logits
    save_adapter(m, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    torch.testing.assert_close(pm(x).logits, expected, atol=1e-5, rtol=0)


def test_layers_to_transform():
    m = make_model("llama")
    names = find_targets(m, LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    assert names == ["model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r: got 0"),
        (dict(r=-3), "must be an integer > 0"),
        (dict(dropout=1.0), r"dropout: got 1.0, must be in \[0, 1\)"),
        (dict(dropout=-0.1), "dropout"),
        (dict(alpha=0), "alpha"),
        (dict(bias="some"), "allowed: none, all, lora_only"),
        (dict(init="xavier"), "allowed: kaiming, gaussian, pissa"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules="(["), "not a valid regex"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(LorafitError, match=message):
        LoraConfig(**kwargs)


def test_bad_targets_are_named():
    m = make_model("llama")
    with pytest.raises(LorafitError, match="'qq_proj' matches no Linear layer; this model has: .*q_proj"):
        apply_lora(m, LoraConfig(target_modules=["q_proj", "qq_proj"]))
    with pytest.raises(LorafitError, match="is a LlamaRMSNorm; lorafit can wrap Linear, Conv1D and Embedding"):
        apply_lora(make_model("llama"), LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(LorafitError, match="match nothing"):
        apply_lora(make_model("llama"), LoraConfig(target_modules=r".*nothing.*"))


def test_all_linear_excludes_head():
    names = find_targets(make_model("llama"), LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7


def test_adapter_for_other_model_is_refused(tmp_path):
    _, ours, _ = pair("llama")
    save_adapter(ours, tmp_path)
    other = make_model("qwen2")
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 48, bias=True)
    with pytest.raises(LorafitError, match="different base model"):
        load_adapter(other, tmp_path)
    with pytest.raises(LorafitError, match="adapter_config.json: not found"):
        load_adapter(make_model("llama"), tmp_path / "missing")


def test_save_is_atomic(tmp_path, monkeypatch):
    _, ours, _ = pair("llama")
    save_adapter(ours, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lorafit.lora.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError):
        save_adapter(ours, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
