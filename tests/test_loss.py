"""The chunked loss equals transformers' own loss, value and gradients."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

from lorafit.train.loss import causal_lm_loss


def tiny(arch):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=300)
    elif arch == "gemma2":
        cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, num_hidden_layers=2, vocab_size=300, final_logit_softcapping=5.0)
    else:
        cfg = GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=300, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_loss_matches_hf(arch, chunk):
    model = tiny(arch)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[2, 8:] = -100
    loss_sum, n = causal_lm_loss(model, {"input_ids": ids}, labels, chunk_tokens=chunk)
    assert n == int((labels[:, 1:] != -100).sum())
    (loss_sum / n).backward()
    out = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(loss_sum / n, out.loss, atol=1e-5, rtol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_no_trained_tokens_gives_zero():
    model = tiny("llama")
    ids = torch.randint(0, 300, (1, 5))
    loss, n = causal_lm_loss(model, {"input_ids": ids}, torch.full_like(ids, -100))
    assert n == 0 and loss.item() == 0.0


@pytest.mark.parametrize("arch,compiled", [("llama", False), ("gemma2", False), ("gpt2", False), ("llama", True)])
def test_evaluation_runs_a_shared_prefix_once_with_the_same_loss(arch, compiled, monkeypatch):
    """Without autograd the rows' common leading tokens go through the stack once (one call of one row, two when
    the kernels are compiled, then the rest with their cache); the summed loss equals the plain pass's, right
    padding and all."""
    from types import SimpleNamespace

    from lorafit.options import RuntimeOptions
    from lorafit.train import loss as loss_mod

    model = tiny(arch).eval()
    if compiled:  # what make_trainable leaves on a model whose kernels it compiled
        model.lean_kernels = SimpleNamespace(options=RuntimeOptions(compile=True))
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 300, (10,), generator=g)
    ids = torch.cat([prefix.expand(3, -1), torch.randint(0, 300, (3, 9), generator=g)], dim=1)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a shorter row, right-padded
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :12] = -100  # the prompt is not scored
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert loss_mod._shared_prefix(inputs) == 10
    calls = []
    body = model.base_model
    monkeypatch.setattr(body, "forward", lambda *a, _f=body.forward, **k: calls.append(k["input_ids"].shape) or _f(*a, **k))
    with torch.no_grad():
        shared, n = causal_lm_loss(model, inputs, labels)
        # two prefix rows when compiled: torch.compile specializes a batch of one
        assert calls == [(2 if compiled else 1, 10), (3, 9)]
        plain, m = causal_lm_loss(model, inputs, labels, options=whole_rows(model))  # off: the plain pass
    assert n == m and calls[-1] == (3, 19)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)


def test_training_and_packed_rows_take_the_plain_pass():
    ids = torch.zeros(2, 20, dtype=torch.long)
    assert loss_mod_shared({"input_ids": ids}) == 19
    assert loss_mod_shared({"input_ids": ids, "position_ids": ids}) == 0  # packed rows
    assert loss_mod_shared({"input_ids": ids[:1]}) == 0  # one row
    ids[1, 5] = 1
    assert loss_mod_shared({"input_ids": ids}) == 0  # 5 shared tokens: not worth a second pass


def whole_rows(model):
    """The run's options with the shared-prefix pass off (``shared_prefix: false``): every row runs whole."""
    import dataclasses

    from lorafit.train.loss import options_of

    return dataclasses.replace(options_of(model), shared_prefix=False)


def loss_mod_shared(inputs):
    from lorafit.train.loss import _shared_prefix

    return _shared_prefix(inputs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_runs_a_shared_prefix_once_with_the_same_gradients(arch, monkeypatch):
    """With autograd the repeated prefix cache sums every row's gradient back into the one prefix pass: loss and
    gradients equal the plain pass's. Under gradient checkpointing the plain pass runs."""

    model = tiny(arch).train()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 300, (9,), generator=g)
    ids = torch.cat([prefix.expand(4, -1), torch.randint(0, 300, (4, 7), generator=g)], dim=1)
    labels = ids.clone()
    labels[:, :4] = -100  # part of the prefix is trained too
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loss_and_grads(options=None):
        model.zero_grad()
        loss, n = causal_lm_loss(model, inputs, labels, options=options)
        (loss / n).backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    shared, g_shared = loss_and_grads()
    plain, g_plain = loss_and_grads(whole_rows(model))
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert g_shared.keys() == g_plain.keys() and g_plain
    for k in g_plain:
        torch.testing.assert_close(g_shared[k], g_plain[k], rtol=1e-4, atol=1e-6, msg=k)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    body = model.base_model
    monkeypatch.setattr(body, "forward", lambda *a, _f=body.forward, **k: calls.append(k["input_ids"].shape) or _f(*a, **k))
    checkpointed, _ = loss_and_grads()
    assert calls == [(4, 16)]  # one plain pass
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-5)


def test_shared_prefix_is_a_runtime_option_from_the_config_or_the_environment():
    from lorafit.options import RuntimeOptions

    assert RuntimeOptions.resolve(env={}).shared_prefix
    off = RuntimeOptions.resolve(env={"LORAFIT_SHARED_PREFIX": "0"})
    assert not off.shared_prefix and off.describe().endswith("shared prefix off")
    assert RuntimeOptions.resolve(env={"LORAFIT_SHARED_PREFIX": "0"}, shared_prefix=True).shared_prefix  # config wins


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("trained", ["head", "lora-head", "frozen"])
def test_per_segment_sums_and_their_gradients_equal_autograd(softcap, trained):
    """Segments (each sequence's answer, for a preference loss): one call gives every segment's sum, and the
    gradients of any weighting of them — the head's and a LoRA head's B made in backward, by recomputing the
    logits — equal plain autograd through the full logits."""
    from lorafit.kernels.loss import LinearCrossEntropy
    from lorafit.options import RuntimeOptions

    g = torch.Generator().manual_seed(0)
    n, d, v, r, s, k = 17, 16, 40, 4, 2.0, 4
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=trained == "head")
    u = torch.randn(n, r, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, r, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    seg = torch.tensor([0] * 5 + [1] * 3 + [3] * 9)  # segment 2 is empty
    lora = (u, b, s) if trained == "lora-head" else (None, None, 0.0)
    sums = LinearCrossEntropy.apply(h, w, y, 5, softcap, RuntimeOptions.resolve(), *lora, seg, k)
    weights = torch.tensor([0.5, -2.0, 3.0, 1.5], dtype=torch.float64)
    inputs = [t for t in (h, w, *lora[:2]) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((sums * weights).sum(), inputs)
    z = h @ w.t() + (s * u @ b.t() if trained == "lora-head" else 0)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    per_token = torch.nn.functional.cross_entropy(z, y, reduction="none")
    want = torch.zeros(k, dtype=torch.float64).index_add(0, seg, per_token)
    torch.testing.assert_close(sums.double(), want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, torch.autograd.grad((want * weights).sum(), inputs), strict=True):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
