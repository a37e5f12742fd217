"""lorafit trains exactly like PEFT (issue 5: "speed may not change the math").

Same tiny random Llama, same starting adapter (PEFT's own init copied into lorafit's), same batches, AdamW
with the same settings and gradient clipping, dropout 0, fp32: the per-step losses of lorafit's training step
(chunked loss, lean LoRA autograd) and of PEFT in a plain loop agree to 1e-4 relative over 20 steps, and the
adapter lorafit saves loads in ``peft.PeftModel.from_pretrained`` with the logits of the PEFT-trained model.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorafit.lora import LoraConfig, apply_lora, named_lora_layers, save_adapter  # noqa: E402
from lorafit.train import train_step  # noqa: E402

STEPS = 20
R, ALPHA, LR = 8, 16, 1e-3  # scaling 2, and a learning rate that moves the adapter visibly in 20 steps


def tiny_llama(seed: int = 0):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


def make_batches(n: int, vocab: int = 256, batch: int = 2, seq: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100  # a prompt that is not trained
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                    "num_trained_tokens": int((labels[:, 1:] != -100).sum())})
    return out


def adamw(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


@pytest.fixture(scope="module")
def trained():
    base = tiny_llama()
    peft_model = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear"))
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours_layers = dict(named_lora_layers(ours))
    assert set(peft_layers) == set(ours_layers) and len(ours_layers) == 2 * 7
    with torch.no_grad():
        for name, layer in ours_layers.items():
            layer.lora_A.weight.copy_(peft_layers[name].lora_A["default"].weight)
            layer.lora_B.weight.copy_(peft_layers[name].lora_B["default"].weight)

    batches = make_batches(STEPS)
    peft_model.train()
    params, opt = adamw(peft_model)
    peft_losses = []
    for b in batches:
        out = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        peft_losses.append(float(out.loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ours.train()
    _, opt = adamw(ours)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # Older train_step versions take the compute dtype as a sixth argument.
    extra = {"dtype": torch.float32} if "dtype" in inspect.signature(train_step).parameters else {}
    our_losses = [train_step(ours, opt, sched, [b], 1.0, **extra)["loss"] for b in batches]
    return {"base": base, "peft": peft_model.eval(), "ours": ours.eval(),
            "peft_losses": peft_losses, "our_losses": our_losses}


def test_losses_agree_over_20_steps(trained):
    ours, theirs = torch.tensor(trained["our_losses"]), torch.tensor(trained["peft_losses"])
    assert len(ours) == len(theirs) == STEPS
    rel = ((ours - theirs).abs() / theirs.abs()).max().item()
    assert rel <= 1e-4, f"max relative loss difference {rel:.3e}"
    # The check means something only if training moved the model.
    assert abs(trained["our_losses"][0] - trained["our_losses"][-1]) > 1e-2 or any(
        layer.lora_B.weight.abs().max() > 1e-3 for _, layer in named_lora_layers(trained["ours"]))


def test_adapters_trained_alike(trained):
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in trained["peft"].named_modules()
                   if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in named_lora_layers(trained["ours"]):
        torch.testing.assert_close(layer.lora_B.weight, peft_layers[name].lora_B["default"].weight,
                                   rtol=1e-3, atol=1e-5)
        assert layer.lora_B.weight.abs().max() > 0  # B moved away from its zero init


def test_saved_adapter_loads_in_peft_with_same_logits(trained, tmp_path):
    save_adapter(trained["ours"], tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(trained["base"]), tmp_path).eval()
    ids = make_batches(1)[0]["input_ids"]
    with torch.no_grad():
        expected = trained["peft"](input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        ours = trained["ours"](input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    # And the adapter differs from the untrained base (the comparison is not trivially true).
    with torch.no_grad():
        base_logits = trained["base"](input_ids=ids).logits
    assert (base_logits - expected).abs().max() > 1e-3
