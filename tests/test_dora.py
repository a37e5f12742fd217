"""DoRA (``use_dora`` / ``peft_use_dora``) computes, trains, saves and merges exactly as PEFT's.

The oracle is PEFT itself: the same tiny random model, PEFT's adapter (A, and B and the magnitude moved away
from their init so the rescaling matters) copied into lorafit's, then logits, gradients, training steps, files
and merges compared. With dropout the two draw different masks; here both are given one fixed mask (PEFT's
dropout module replaced, lorafit's seed pinned), which makes dropout > 0 comparable too. Then the estimator:
DoRA's extra parameters and saved tensors, byte for byte against what autograd keeps.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import save_tiny_llama, saved_by_loss, tiny_causal_lm
from safetensors.torch import load_file

from lorafit import LorafitError
from lorafit.kernels import dropout as lorafit_dropout
from lorafit.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    merge,
    merge_and_unload,
    named_lora_layers,
    save_adapter,
    unmerge,
)
from lorafit.memory.estimate import Settings, estimate, lora_targets
from lorafit.memory.spec import ModelSpec
from lorafit.options import RuntimeOptions

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8
EAGER = RuntimeOptions.resolve(False)
# The pinned dropout seed: eager kernels take an int64 seed (drawn mask), compiled ones two int32 (hashed mask).
SEEDS = {False: torch.tensor(1234, dtype=torch.int64), True: torch.tensor([12, 34], dtype=torch.int32)}


def peft_layers(model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def adapter_tensors(layer) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, lorafit's, PEFT's) for A, B and the magnitude of one layer pair."""
    ours, theirs = layer
    return [("A", ours.lora_A.weight, theirs.lora_A["default"].weight),
            ("B", ours.lora_B.weight, theirs.lora_B["default"].weight),
            ("m", ours.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)]


def pair(base=None, dropout: float = 0.0, moved: bool = True, targets="all-linear", options=EAGER, **peft_kw):
    """(base, PEFT model, lorafit model, [(our layer, PEFT layer)]) with PEFT's adapter copied into lorafit's."""
    base = base if base is not None else tiny_causal_lm()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets, use_dora=True, **peft_kw))
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=R, alpha=ALPHA, dropout=dropout, target_modules=targets,
                                                      use_dora=True), options=options)
    by_name = peft_layers(theirs)
    layers = [(layer, by_name[name]) for name, layer in named_lora_layers(ours)]
    assert len(layers) == len(by_name) > 0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            if moved:  # B ≠ 0 and m ≠ ‖W + sBA‖: every term of DoRA's forward is non-trivial
                theirs_m = layer[1].lora_magnitude_vector["default"].weight
                layer[1].lora_B["default"].weight.normal_(0, 0.1, generator=g)
                theirs_m.mul_(1 + 0.1 * torch.randn(theirs_m.shape, generator=g))
            for _, mine, other in adapter_tensors(layer):
                mine.copy_(other)
    return base, theirs, ours, layers


class FixedDropout(torch.nn.Module):
    """PEFT's lora_dropout replaced: the mask lorafit draws from the pinned seed, scaled by 1/(1-p)."""

    def __init__(self, p: float, seed: torch.Tensor):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):  # as nn.Dropout computes it: x · (keep / (1-p))
        keep = lorafit_dropout.keep_mask(self.seed, (x.numel() // x.shape[-1], x.shape[-1]), self.p, x.dtype)
        return x * keep.view(x.shape).div_(1 - self.p)


def same_masks(monkeypatch, layers, p: float) -> None:
    monkeypatch.setattr(lorafit_dropout, "new_seed", lambda device, hashed: SEEDS[hashed].to(device))
    for ours, theirs in layers:
        theirs.lora_dropout["default"] = FixedDropout(p, SEEDS[ours.options.compile])


def batch(vocab: int = 100, n: int = 2, seq: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "num_trained_tokens": int((labels[:, 1:] != -100).sum())}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the math -----------------------------------------------------------------------------------------------
def test_magnitude_starts_as_peft_does():
    """A fresh adapter: the magnitude is ‖W + s·BA‖ per output row (B = 0: ‖W‖), bit for bit PEFT's."""
    _, theirs, ours, _ = pair(moved=False)
    by_name = peft_layers(theirs)
    fresh = apply_lora(tiny_causal_lm(), LoraConfig(r=R, alpha=ALPHA, use_dora=True), options=EAGER)
    for name, layer in named_lora_layers(fresh):
        assert torch.equal(layer.lora_magnitude_vector, by_name[name].lora_magnitude_vector["default"].weight)
        assert layer.lora_magnitude_vector.requires_grad and not layer.variant.lean


@pytest.mark.parametrize("p,compiled", [(0.0, False), (0.2, False), pytest.param(0.2, True, marks=pytest.mark.slow)],
                         ids=["no-dropout", "dropout", "dropout-compiled"])
def test_logits_and_gradients_equal_peft(p, compiled, monkeypatch):
    """Training mode, fp32: logits equal to the bit without dropout (1e-6 with the same mask: PEFT scales x, we
    scale the products); the gradients of A, B and m agree to 1e-5 relative (summation order). Compiled
    kernels: the hashed mask, applied inside the compiled dropout kernels."""
    _, theirs, ours, layers = pair(dropout=p, options=RuntimeOptions.resolve(compiled))
    if p:
        same_masks(monkeypatch, layers, p)
    theirs.train(), ours.train()
    assert_same_step(theirs, ours, layers, bitwise=p == 0)


def assert_same_step(theirs, ours, layers, bitwise: bool = False) -> None:
    """One batch through both: logits within 1e-6 (equal to the bit if ``bitwise``), and the gradients of every
    adapter tensor within 1e-5 relative."""
    b = batch()
    out_theirs = theirs(input_ids=b["input_ids"], labels=b["labels"])
    out_ours = ours(input_ids=b["input_ids"], labels=b["labels"])
    if bitwise:
        assert torch.equal(out_ours.logits, out_theirs.logits)
    assert rel(out_ours.logits, out_theirs.logits) < 1e-6
    out_theirs.loss.backward()
    out_ours.loss.backward()
    for layer in layers:
        for what, mine, other in adapter_tensors(layer):
            assert rel(mine.grad, other.grad) < 1e-5, what


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_function_against_autograd(p, monkeypatch):
    """``DoraLinearFunction`` against PEFT's formula traced by autograd, with every input trained (a trained base
    weight and bias too, which DoRA training never does) and the same dropout mask."""
    from lorafit.kernels.dora import DoraLinearFunction, row_norms

    monkeypatch.setattr(lorafit_dropout, "new_seed", lambda device, hashed: SEEDS[False])
    g = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(*shape, generator=g, requires_grad=True) for shape in [(2, 5, 12), (8, 12), (8,)])
    a, b = (torch.randn(*shape, generator=g).mul(0.3).requires_grad_() for shape in [(3, 12), (8, 3)])
    s = 1.5
    m = (row_norms(w, a, b, s) * 1.2).requires_grad_()
    n = row_norms(w, a, b, s)
    keep = lorafit_dropout.keep_mask(SEEDS[False], (10, 12), p).view(2, 5, 12) if p else 1.0
    xd = x * keep / (1 - p)
    f = m / n
    want = x @ w.t() + bias + (f - 1) * (xd @ w.t()) + f * s * (xd @ a.t() @ b.t())
    got = DoraLinearFunction.apply(x, w, bias, a, b, m, n, s, p, EAGER)
    torch.testing.assert_close(got, want)
    gy = torch.randn(want.shape, generator=g)
    grads = torch.autograd.grad(want, (x, w, bias, a, b, m), gy)
    for name, mine, ref in zip("x w bias a b m".split(), torch.autograd.grad(got, (x, w, bias, a, b, m), gy), grads,
                               strict=True):
        torch.testing.assert_close(mine, ref, msg=name)


def test_eval_ignores_dropout_as_peft_does():
    """PEFT uses the undropped base term in eval even when lora_dropout > 0; so does lorafit."""
    _, theirs, ours, _ = pair(dropout=0.3)
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_training_matches_peft(p, monkeypatch):
    """Five AdamW steps from PEFT's own init (B = 0): lorafit's train_step (chunked loss) vs PEFT in a plain
    loop, same batches (and masks): losses and every adapter tensor agree."""
    from lorafit.train import train_step

    _, theirs, ours, layers = pair(dropout=p, moved=False)
    if p:
        same_masks(monkeypatch, layers, p)
    batches = [batch(seed=i) for i in range(5)]
    start = [layer[0].lora_magnitude_vector.detach().clone() for layer in layers]

    def adamw(model):
        params = [q for q in model.parameters() if q.requires_grad]
        return params, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)

    theirs.train()
    params, opt = adamw(theirs)
    peft_losses = []
    for b in batches:
        out = theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        peft_losses.append(out.loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    ours.train()
    _, opt = adamw(ours)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    our_losses = [train_step(ours, opt, sched, [b], 1.0, options=EAGER)["loss"] for b in batches]
    assert rel(torch.tensor(our_losses), torch.tensor(peft_losses)) < 1e-5
    assert abs(our_losses[-1] - our_losses[0]) > 1e-3  # training moved the model
    # Relative to each tensor's scale. Adam's first steps move every element by about ±lr whatever its
    # gradient's size, so an element whose tiny gradient differs in the 7th digit moves differently: with
    # dropout, where the forward is not bit-equal (lorafit scales the products by 1/(1-p), PEFT scales x),
    # measured 9e-4 for A after 5 steps (the losses still agree to 4e-7); without dropout 5e-6.
    for layer in layers:
        for what, mine, other in adapter_tensors(layer):
            assert rel(mine, other) < (2e-3 if p else 1e-4), what
    assert all(not torch.equal(layer[0].lora_magnitude_vector, m) for layer, m in zip(layers, start, strict=True))


def test_gpt2_conv1d_matches_peft():
    """GPT-2's Conv1D stores W as (in × out): PEFT's fan_in_fan_out; the norm is still per output."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    _, theirs, ours, layers = pair(base, targets=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
    assert_same_step(theirs, ours, layers)


def test_bf16_base_trains_close_to_fp32():
    """A bf16 base (adapter in fp32): logits within bf16 rounding of the fp32 model's; gradients flow."""
    _, _, ours, _ = pair()
    low = copy.deepcopy(ours).to(torch.bfloat16)
    for _, layer in named_lora_layers(low):
        for p in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector):
            p.data = p.data.float()
    ids = batch()["input_ids"]
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    got = low(input_ids=ids).logits
    assert rel(got.float(), want) < 3e-2
    got.float().square().mean().backward()
    grads = [layer.lora_magnitude_vector.grad for _, layer in named_lora_layers(low)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# --- files, merge -------------------------------------------------------------------------------------------
def test_files_are_peft_files_both_ways(tmp_path):
    base, theirs, ours, _ = pair()
    theirs.save_pretrained(tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in our_file.items()} == {k: v.shape for k, v in peft_file.items()}
    assert any(k.endswith(".q_proj.lora_magnitude_vector") for k in our_file)
    assert all(torch.equal(our_file[k], peft_file[k]) for k in peft_file)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True

    ids = batch()["input_ids"]
    with torch.no_grad():
        want = theirs.eval()(input_ids=ids).logits
        from_peft = load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()(input_ids=ids).logits
        in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()(input_ids=ids).logits
    assert torch.equal(from_peft, want) and torch.equal(in_peft, want)


def test_a_plain_lora_file_is_refused_for_dora(tmp_path):
    base, _, ours, _ = pair()
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    state = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(LorafitError, match="lora_magnitude_vector"):
        load_adapter(copy.deepcopy(base), tmp_path)  # a file with magnitudes but a plain LoRA config
    from safetensors.torch import save_file

    save_file({k: v for k, v in state.items() if "magnitude" not in k}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LorafitError, match="no weights for .*lora_magnitude_vector"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_merge_is_peft_merge_and_unload():
    """The merged weight is PEFT's ``m/‖W + sBA‖ · (W + sBA)`` to the bit; unmerging restores the model."""
    base, theirs, ours, _ = pair()
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = ours.eval()(input_ids=ids).logits
        plain_theirs = theirs.merge_and_unload().eval()
        plain_ours = merge_and_unload(copy.deepcopy(ours)).eval()
        merge(ours)
        merged = ours(input_ids=ids).logits
        unmerge(ours)  # W / (m/n) − s·BA, with the n merging used: PEFT's unmerge
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    assert type(plain_ours.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    theirs_params = dict(plain_theirs.named_parameters())
    for name, p in plain_ours.named_parameters():
        assert torch.equal(p, theirs_params[name]), name
    with torch.no_grad():
        assert torch.equal(plain_ours(input_ids=ids).logits, plain_theirs(input_ids=ids).logits)
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)


def test_config_round_trip_and_pissa():
    cfg = LoraConfig(r=4, use_dora=True)
    d = cfg.to_peft_dict(["q_proj"])
    assert d["use_dora"] is True and LoraConfig.from_peft_dict(d).use_dora
    assert LoraConfig.from_peft_dict({**d, "use_dora": False}).use_dora is False
    with pytest.raises(LorafitError, match="pissa cannot be combined with DoRA"):
        LoraConfig(use_dora=True, init="pissa")


# --- through the training config ----------------------------------------------------------------------------
def test_peft_use_dora_trains_from_a_config(tmp_path, demo_tokenizer):
    """``peft_use_dora: true`` through train(): the lean kernels leave DoRA layers alone, the adapter file is
    PEFT's DoRA file, and a run stopped after one step resumes to the uninterrupted run's losses and weights."""
    from transformers import LlamaForCausalLM

    from lorafit.config import TrainConfig
    from lorafit.memory.settings import settings_from_config
    from lorafit.train import train

    save_tiny_llama(tmp_path / "model", demo_tokenizer, initializer_range=0.5)
    rows = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["apple", "pear", "plum", "fig"] * 4]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def config(out: str) -> TrainConfig:
        return TrainConfig.from_dict(dict(
            base_model=str(tmp_path / "model"), adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1,
            lora_target_linear=True, peft_use_dora=True, sequence_len=64, micro_batch_size=2, max_steps=2,
            datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "chat_template"}], learning_rate=1e-2,
            output_dir=str(tmp_path / out), compile_kernels=False))

    assert settings_from_config(config("out"), "cpu").use_dora
    result = train(config("out"))
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 2 and all(x == x for x in losses)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in saved) == 2 * 7
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
    fresh = load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "model"), tmp_path / "out").eval()
    ids = torch.tensor([demo_tokenizer("Say fig").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, result.model.eval()(ids).logits)

    train(config("stopped"), stop_after=1)
    resumed = train(config("stopped"), resume=True)
    assert [r["loss"] for r in resumed.history if "loss" in r] == losses
    again = load_file(tmp_path / "stopped" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], saved[k]) for k in saved)


# --- the estimator ------------------------------------------------------------------------------------------
TINY = ModelSpec("tiny", "llama", 64, 160, 2, 4, 2, 16, 512, True)
LLAMA3 = ModelSpec("tiny-llama", "llama", 64, 128, 3, 4, 2, 16, 256, True)


def dora_model(spec: ModelSpec, s: Settings):
    """The trainer's model for ``s`` with a DoRA adapter (lorafit.measure's build, use_dora on)."""
    import transformers

    from lorafit.measure import hf_config
    from lorafit.models import parse_dtype

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=parse_dtype(s.dtype),
                                                          attn_implementation="sdpa")
    prepare(model, s)
    return model


def prepare(model, s: Settings) -> None:
    """``lorafit.measure``'s preparation of a model (the trainer's), with ``s.use_dora`` passed on."""
    from lorafit.train import make_trainable

    make_trainable(model, LoraConfig(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=s.targets,
                                     layers_to_transform=s.layers_to_transform, use_dora=s.use_dora),
                   s.gradient_checkpointing, s.runtime)


def test_estimate_counts_the_magnitude():
    s = Settings(method="lora", dtype="float32", r=8, seq_len=64, device="cpu", targets=["q_proj", "down_proj"],
                 use_dora=True)
    model = dora_model(LLAMA3, s)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate(LLAMA3, s)
    plain = estimate(LLAMA3, Settings(**{**s.to_dict(), "use_dora": False}))
    assert est.params["trainable"] == trained == plain.params["trainable"] + 3 * (64 + 64)
    assert "DoRA magnitude" in est.component("trainable weights (LoRA A, B, DoRA magnitude)").name


@pytest.mark.parametrize("spec,kw", [
    (TINY, dict(dtype="float32", dropout=0.1)),
    (TINY, dict(dtype="float32", dropout=0.0)),
    (TINY, dict(dtype="bfloat16", dropout=0.1, runtime=RuntimeOptions.resolve(False, "native"))),
    (TINY, dict(dtype="bfloat16", dropout=0.1, runtime=RuntimeOptions.resolve(False, "fp32"))),
    (TINY, dict(dtype="float32", dropout=0.1, targets=["down_proj"], layers_to_transform=[1])),
    (LLAMA3, dict(dtype="float32", dropout=0.1, targets=["v_proj", "down_proj"], layers_to_transform=[1, 2])),
], ids=["fp32", "fp32-no-dropout", "bf16", "bf16-fp32-matmuls", "down-only", "v-down-layers12"])
def test_saved_tensors_match_the_estimate(spec, kw):
    """What one forward + loss of a DoRA model saves for backward is exactly the estimator's count: per layer
    x·Aᵀ and z (N × out), the fp32 row norms, the seeds, and a DoRA down_proj's input (not fused)."""
    from lorafit.measure import _batch
    from lorafit.memory import activations as act

    s = Settings(**{"method": "lora", "micro_batch": 2, "seq_len": 32, "r": 8, "device": "cpu",
                    "use_dora": True, "runtime": EAGER, **kw})
    model = dora_model(spec, s)
    _, _, saved = saved_by_loss(model, _batch(spec.vocab, s, 0), s.runtime)
    assert saved == act.saved_for_backward(spec, s, lora_targets(spec, s))
    plain = Settings(**{**s.to_dict(), "use_dora": False})
    assert saved > act.saved_for_backward(spec, plain, lora_targets(spec, plain))


@pytest.mark.parametrize("kw", [
    dict(dtype="float32", micro_batch=2, seq_len=64, runtime=EAGER),
    # compiled: DoRA's own graphs (~35 s cold), in `make test-slow`
    pytest.param(dict(dtype="float32", micro_batch=2, seq_len=64), marks=pytest.mark.slow),
    pytest.param(dict(dtype="bfloat16", micro_batch=1, seq_len=128, r=4, gradient_checkpointing=True),
                 marks=pytest.mark.slow),
], ids=["fp32-eager", "fp32", "bf16-checkpointing"])
def test_measured_peak_within_10_percent(kw, monkeypatch):
    """The estimated peak of a DoRA step against MemTracker's (as test_memory does for plain LoRA)."""
    from lorafit import measure

    monkeypatch.setattr(measure, "_prepare", prepare)  # measure's own builds no DoRA
    est, m, err = measure.compare(TINY, Settings(**{"method": "lora", "r": 8, **kw, "device": "cpu",
                                                    "use_dora": True}), steps=2)
    assert m.peak > 0 and all(x == x for x in m.losses)
    assert abs(err) <= 10, f"estimate {est.allocated_peak} vs measured {m.peak}: {err:+.1f}%"

