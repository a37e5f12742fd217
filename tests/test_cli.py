"""The CLI verbs on a tiny random model: inspect, merge, generate, eval, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorafit.cli import main
from lorafit.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from lorafit.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = save_tiny_llama(d / "model", load_tokenizer("demo"))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.5)
    save_adapter(model, d / "adapter")
    rows = [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}] * 4
    (d / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, model.eval()


def test_inspect_adapter_and_model(tiny, capsys):
    d, _ = tiny
    assert main(["inspect", str(d / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "q_proj.lora_A.weight" in out and "(4, 32)" in out
    assert main(["inspect", str(d / "model"), "--adapter", str(d / "adapter")]) == 0
    assert "trainable params: 896" in capsys.readouterr().out


def test_merge_writes_a_plain_model(tiny, tmp_path):
    d, model = tiny
    assert main(["merge", str(d / "model"), str(d / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    assert not any("lora" in k for k in merged.state_dict())


def test_generate_and_eval(tiny, capsys, tmp_path):
    d, _ = tiny
    assert main(["generate", str(d / "model"), "Say hi", "--adapter", str(d / "adapter"), "--max-new-tokens", "4"]) == 0
    assert "> Say hi" in capsys.readouterr().out
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(d / "model"), "--adapter", str(d / "adapter"), "--heldout", str(d / "heldout.jsonl"),
                 "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())
    assert set(results) == {"base", "adapter"} and "heldout_exact_match" in results["adapter"]


def test_errors_are_one_line(tiny, capsys, tmp_path):
    d, _ = tiny
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found locally" in err
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100)).save_pretrained(other)
    capsys.readouterr()
    assert main(["generate", str(other), "x", "--raw"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not load a tokenizer" in err
    load_tokenizer("demo").save_pretrained(other)
    capsys.readouterr()
    assert main(["generate", str(other), "x", "--raw", "--adapter", str(d / "adapter")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different base model" in err
