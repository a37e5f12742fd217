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
