"""The engine and the trainer on the real bundled SmolLM2-135M-Instruct (slow: marked)."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

from lorafit.lora import LoraConfig, apply_lora, load_adapter, lora_layers, merge_and_unload, save_adapter
from lorafit.models import load_model_and_tokenizer

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm():
    model, tok = load_model_and_tokenizer("demo")
    return model, tok


@pytest.mark.ci
def test_smollm2_matches_peft_and_roundtrips(smollm, tmp_path):
    base, tok = smollm
    ids = tok(["The capital of France is", "Dates: 2021-03-05 means"], return_tensors="pt", padding=True)
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        torch.testing.assert_close(ours(**ids).logits, base(**ids).logits, atol=1e-5, rtol=0)  # fresh = no change
        g = torch.Generator().manual_seed(0)
        for layer in lora_layers(ours):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.01)
        expected = ours(**ids).logits
    save_adapter(ours, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(pm(**ids).logits, expected, atol=1e-4, rtol=0)
        back = load_adapter(copy.deepcopy(base), tmp_path / "a")
        torch.testing.assert_close(back(**ids).logits, expected, atol=1e-5, rtol=0)
        merged = merge_and_unload(back)
        # merging rounds W + sBA once in fp32: logits of magnitude ~20 move by ~1e-4
        torch.testing.assert_close(merged(**ids).logits, expected, atol=5e-4, rtol=1e-5)


@pytest.mark.ci
def test_smollm2_fine_tunes_a_few_steps(tmp_path):
    from lorafit.config import TrainConfig
    from lorafit.train import train

    rows = [{"messages": [{"role": "user", "content": f"Convert to ISO date (YYYY-MM-DD): March {d}, 2021"},
                          {"role": "assistant", "content": f"2021-03-{d:02d}"}]} for d in range(1, 29)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict(dict(
        base_model="demo", adapter="lora", lora_r=8, lora_alpha=16, lora_target_linear=True,
        datasets=[{"path": str(tmp_path / "d.jsonl"), "type": "chat_template"}], sequence_len=96,
        micro_batch_size=4, max_steps=6, learning_rate=2e-3, lr_scheduler="constant", output_dir=str(tmp_path / "out"),
    ))
    result = train(cfg)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_gguf_load_parses_the_file_once_and_loads_the_same_model(monkeypatch):
    """``load_model_and_tokenizer`` of the demo GGUF reads the file once (transformers alone: three times) and
    gives the same weights and tokens as transformers' own load."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.models import demo_model_file

    path = demo_model_file()
    parses = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or reader(*a, **k))
    model, tok = load_model_and_tokenizer(str(path))
    assert len(parses) == 1
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    plain_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert len(parses) == 4  # transformers' own: tokenizer, config, weights
    text = "Convert to ISO date (YYYY-MM-DD): 29 January 2029"
    assert tok(text).input_ids == plain_tok(text).input_ids
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
