"""Shared fixtures: the demo model's real tokenizer (loaded once per session)."""

import pytest


@pytest.fixture(autouse=True)
def _transformers_functions_restored():
    """Training switches transformers' RoPE and SDPA attention process-wide (``lorafit.train.rotary``,
    ``lorafit.train.attention``): undo it after each test, so tests that use transformers as the reference do
    not depend on the order they run in."""
    yield
    from lorafit.train.attention import restore_attention
    from lorafit.train.rotary import restore_rotary

    restore_rotary()
    restore_attention()


@pytest.fixture(scope="session")
def demo_tokenizer():
    from lorafit.models import load_tokenizer

    return load_tokenizer("demo")


def save_tiny_llama(folder, tokenizer, **config):
    """A 2-layer random Llama with the demo tokenizer's vocabulary, saved as a HF folder; returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tokenizer))
    model = LlamaForCausalLM(LlamaConfig(**{**kw, **config}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def tiny_causal_lm(arch: str = "llama"):
    """A 2-layer random Llama, Qwen2 or Gemma (hidden 32, intermediate 64, vocab 100), seeded."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              vocab_size=100)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[arch](**kw)
    return AutoModelForCausalLM.from_config(cfg)


def saved_bytes(model, ids):
    """``model(ids).logits`` and the bytes autograd saved for backward during that forward (each saved tensor)."""
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids).logits
    return out, total
