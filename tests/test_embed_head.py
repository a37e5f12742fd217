"""LoRA on the output head and the token embeddings, and modules_to_save, against PEFT (tiny random Llama, fp32,
dropout 0), with and without tied embeddings."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from lorafit.kernels.loss import LinearCrossEntropy
from lorafit.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)
from lorafit.lora.embedding import LoraEmbedding
from lorafit.options import RuntimeOptions
from lorafit.train.loss import causal_lm_loss

pytestmark = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")

VOCAB = 128
HEAD_TARGETS = ["embed_tokens", "lm_head", "q_proj", "v_proj"]


def tiny_llama(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=VOCAB, num_hidden_layers=2, tie_word_embeddings=tied)
    cfg.attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


def ids(n=2, t=9, seed=3):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def peft_name(name: str) -> str:
    """Our parameter name for a PEFT model's parameter name."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(".default", "")
    return name.replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector")


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            for n, p in layer.named_parameters():
                if ".lora_" in f".{n}":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def pair(tied: bool, quiet=True, **kw):
    """Our adapted model and PEFT's on copies of one base, with the same adapter tensors."""
    base = tiny_llama(tied)
    cfg = LoraConfig(r=4, alpha=8, **kw)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        ours = apply_lora(copy.deepcopy(base), cfg)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save))
    randomize(ours)
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(own[peft_name(n)])
    return base, ours, pm


def our_loss(model, x, chunk=7):
    loss, n = causal_lm_loss(model, {"input_ids": x}, x, chunk_tokens=chunk)
    return loss / n


def check_grads(ours, pm):
    theirs = {peft_name(n): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys()
    for n, g in mine.items():
        torch.testing.assert_close(g, theirs[n], atol=1e-6, rtol=1e-4, msg=n)


def check_loss_and_grads(ours, pm, x):
    """The chunked loss equals PEFT's, and so do the gradients it leaves."""
    loss, ref = our_loss(ours, x), pm(x, labels=x).loss
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    loss.backward()
    ref.backward()
    check_grads(ours, pm)


def train_both(ours, pm, steps=3):
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, pm)]
    for step in range(steps):
        x = ids(seed=10 + step)
        for opt in opts:
            opt.zero_grad()
        our_loss(ours, x).backward()
        pm(x, labels=x).loss.backward()
        for opt in opts:
            opt.step()


@pytest.mark.parametrize("tied", [False, True])
def test_head_and_embedding_lora_match_peft(tied):
    _, ours, pm = pair(tied, target_modules=HEAD_TARGETS)
    assert type(ours.model.embed_tokens) is LoraEmbedding
    x = ids()
    torch.testing.assert_close(ours(x).logits, pm(x).logits, atol=1e-5, rtol=1e-5)
    check_loss_and_grads(ours, pm, x)  # the chunked loss with the head's LoRA term, 3 chunks of 7 of 16 tokens
    train_both(ours, pm)
    torch.testing.assert_close(ours(x).logits, pm(x).logits, atol=1e-4, rtol=1e-4)


def test_fresh_embedding_adapter_is_initialised_as_peft_and_changes_nothing():
    base = tiny_llama(False)
    m = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"]))
    emb = m.model.embed_tokens
    assert not emb.lora_embedding_A.any() and emb.lora_embedding_B.std() > 0.5  # PEFT: A zeros, B normal
    assert emb.lora_embedding_A.shape == (4, VOCAB) and emb.lora_embedding_B.shape == (32, 4)
    x = ids()
    torch.testing.assert_close(m(x).logits, base(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_files_roundtrip_with_peft(tied, tmp_path):
    base, ours, pm = pair(tied, target_modules=HEAD_TARGETS)
    x = ids()
    expected = ours(x).logits
    save_adapter(ours, tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    pm.save_pretrained(tmp_path / "peft")
    assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B",
            "base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.lora_A.weight",
            "base_model.model.lm_head.base_layer.weight"} <= keys
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=1e-5)
        back = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(back(x).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_merge_unmerge_with_head_and_embedding(tied):
    base, ours, _ = pair(tied, target_modules=HEAD_TARGETS)
    x = ids()
    expected = ours(x).logits
    merge(ours)
    torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=1e-5)
    unmerge(ours)
    torch.testing.assert_close(ours(x).logits, expected, atol=1e-5, rtol=1e-5)
    plain = merge_and_unload(ours)
    torch.testing.assert_close(plain(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert not plain.config.tie_word_embeddings
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight


def test_modules_to_save_on_tied_embeddings_match_peft(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base, ours, pm = pair(True, quiet=False, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    ours_warnings = [w for w in caught if "trained untied" in str(w.message)]
    assert len(ours_warnings) == 1 and "\n" not in str(ours_warnings[0].message)
    # PEFT trains a copy of each: two tensors, both starting from the tied table; the base's stays as it was
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    assert ours.lm_head.weight.requires_grad and ours.model.embed_tokens.weight.requires_grad
    x = ids()
    check_loss_and_grads(ours, pm, x)
    train_both(ours, pm)
    expected = ours(x).logits
    torch.testing.assert_close(expected, pm(x).logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    save_adapter(ours, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-5, rtol=1e-5)
        back = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(back(x).logits, expected, atol=1e-5, rtol=1e-5)
    # the merged model keeps both tensors through save_pretrained / from_pretrained
    plain = merge_and_unload(back)
    plain.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(again(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_untied_model_gets_no_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(tiny_llama(False), LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"],
                                                 modules_to_save=["norm"]))
    assert not [w for w in caught if "untied" in str(w.message)]


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_loss_with_lora_head_matches_autograd(softcap):
    g = torch.Generator().manual_seed(0)
    n, d, v, r, s = 13, 16, 40, 4, 2.0
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g)
    u = torch.randn(n, r, generator=g, requires_grad=True)
    b = torch.randn(v, r, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    opts = RuntimeOptions.resolve()
    loss = LinearCrossEntropy.apply(h, w, y, 5, softcap, opts, u, b, s)
    grads = torch.autograd.grad(loss, (h, u, b))
    z = h @ w.t() + s * u @ b.t()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(z, y, reduction="sum")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (h, u, b)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lora_head_with_dropout_trains():
    m = apply_lora(tiny_llama(False), LoraConfig(r=4, dropout=0.3, target_modules=["lm_head"]))
    randomize(m)
    m.train()
    our_loss(m, ids()).backward()
    assert m.lm_head.lora_A.weight.grad.abs().sum() > 0 and m.lm_head.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lora_keys", [
    dict(lora_target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    dict(lora_target_modules=["q_proj", "v_proj"], lora_modules_to_save=["embed_tokens", "lm_head"]),
], ids=["lora-targets", "modules-to-save"])
def test_training_from_a_config_saves_what_reloads_and_is_estimated(tmp_path, demo_tokenizer, lora_keys):
    """The recipe end to end on a tied tiny Llama (lean kernels, chunked loss): the loss falls, the saved
    adapter gives the trained logits on a fresh base (lorafit and PEFT), the estimate counts what trains."""
    from conftest import save_tiny_llama
    from transformers import LlamaForCausalLM

    from lorafit.config import TrainConfig
    from lorafit.memory.estimate import estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec
    from lorafit.train import train

    save_tiny_llama(tmp_path / "model", demo_tokenizer, tie_word_embeddings=True, initializer_range=0.5)
    rows = [{"text": f"the {w} is a fruit and the {w} is sweet"} for w in ["apple", "pear", "plum", "fig"] * 4]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict(dict(
        base_model=str(tmp_path / "model"), adapter="lora", lora_r=4, lora_alpha=8, **lora_keys,
        datasets=[{"path": str(tmp_path / "data.jsonl"), "type": "completion"}], sequence_len=32,
        micro_batch_size=4, max_steps=8, learning_rate=1e-2, lr_scheduler="constant",
        output_dir=str(tmp_path / "out"), seed=7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < losses[0]
    trained = result.model.eval()
    x = torch.tensor([demo_tokenizer("the fig is sweet").input_ids])
    with torch.no_grad():
        want = trained(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = load_adapter(LlamaForCausalLM.from_pretrained(tmp_path / "model"), tmp_path / "out")
        via_peft = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "model"),
                                                  str(tmp_path / "out"))
    scale = float(want.abs().max())
    torch.testing.assert_close(fresh(x).logits, want, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(via_peft(x).logits, want, rtol=1e-4, atol=1e-5 * scale)
    est = estimate(resolve_spec(cfg.base_model_path), settings_from_config(cfg, "cpu"))
    assert est.params["trainable"] == sum(p.numel() for p in trained.parameters() if p.requires_grad)


def test_gpt2_wte_and_a_regex_save_the_keys_peft_saves(tmp_path):
    """PEFT adds the embeddings' base weights to the file only when target_modules names embed_tokens or lm_head
    (GPT-2's ``wte`` is not such a name); lorafit follows the same rule, so the key sets are equal."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB,
                                                       n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    for name, base, targets in [("gpt2", gpt2, ["c_attn", "wte"]),
                                ("regex", tiny_llama(False), r".*\.(q_proj|embed_tokens)")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets))
            pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets,
                                                                          fan_in_fan_out=name == "gpt2"))
            save_adapter(ours, tmp_path / name / "ours")
            pm.save_pretrained(tmp_path / name / "peft")
        files = [set(load_file(tmp_path / name / w / "adapter_model.safetensors")) for w in ("ours", "peft")]
        assert files[0] == files[1], name


def test_dora_head_takes_the_unchunked_path_and_matches_peft():
    base = tiny_llama(False)
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=["v_proj", "lm_head"],
                                                      use_dora=True))
    randomize(ours)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "lm_head"],
                                                                  use_dora=True))
    own = dict(ours.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(own[peft_name(n)])
    x = ids()
    check_loss_and_grads(ours, pm, x)


def test_chunked_loss_with_lora_head_bf16():
    g = torch.Generator().manual_seed(0)
    n, d, v, r, s = 13, 16, 40, 4, 2.0
    h = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    w = torch.randn(v, d, generator=g).bfloat16()
    u = torch.randn(n, r, generator=g, requires_grad=True)
    b = torch.randn(v, r, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    for half in ("native", "fp32"):
        loss = LinearCrossEntropy.apply(h, w, y, 5, None, RuntimeOptions.resolve(half_matmul=half), u, b, s)
        gh, gu, gb = torch.autograd.grad(loss, (h, u, b))
        assert gh.dtype == torch.bfloat16 and gu.dtype == gb.dtype == torch.float32
        z = h.float() @ w.float().t() + s * u @ b.t()
        ref = torch.nn.functional.cross_entropy(z, y, reduction="sum")
        torch.testing.assert_close(loss, ref, atol=0.05, rtol=1e-2)
        for got, want in zip((gh, gu, gb), torch.autograd.grad(ref, (h, u, b)), strict=True):
            torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=2e-2)


@pytest.mark.parametrize("tied,kw", [
    (True, dict(targets=["q_proj", "v_proj", "embed_tokens", "lm_head"], dtype="float32")),
    (False, dict(targets=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"], dtype="bfloat16")),
], ids=["lora-tied-fp32", "saved-untied-bf16"])
def test_estimate_within_10_percent_of_measured(tied, kw):
    """Estimate vs a measured step (lorafit.measure, CPU) with the head and embeddings trained; ±1.3% when
    written (with tied fp32 q/v-only LoRA at -1.3% for reference). Eager kernels: the compiled ones' estimate is
    test_memory's; here the head and embeddings are the point."""
    from lorafit.measure import compare
    from lorafit.memory.estimate import Settings
    from lorafit.memory.spec import ModelSpec
    from lorafit.options import RuntimeOptions

    spec = ModelSpec("tiny", "llama", 64, 160, 2, 4, 2, 16, 512 if tied else 4096, tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est, m, err = compare(spec, Settings(method="lora", micro_batch=2, seq_len=64, r=8, device="cpu",
                                             runtime=RuntimeOptions.resolve(False), **kw), steps=2)
    assert m.peak > 0 and abs(err) <= 10, f"estimate {est.allocated_peak} vs measured {m.peak}: {err:+.1f}%"


def test_adapter_with_ensure_weight_tying_is_refused(tmp_path):
    from lorafit import LorafitError

    base = tiny_llama(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], ensure_weight_tying=True))
        pm.save_pretrained(tmp_path)
    with pytest.raises(LorafitError, match="ensure_weight_tying is true"):
        load_adapter(copy.deepcopy(base), tmp_path)


def test_continuing_an_adapter_with_head_and_embedding(tmp_path):
    """lora_model_dir's loader finds the embedding's layers by their PEFT keys."""
    from lorafit.train.setup import load_start_adapter

    base, ours, _ = pair(True, target_modules=HEAD_TARGETS)
    save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = apply_lora(copy.deepcopy(base), LoraConfig(r=4, alpha=8, target_modules=HEAD_TARGETS))
    load_start_adapter(again, tmp_path, "config.yaml")
    x = ids()
    torch.testing.assert_close(again(x).logits, ours(x).logits, atol=1e-6, rtol=1e-6)
