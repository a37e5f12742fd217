"""quantize_moe_experts: a MoE model's routed-expert tensors held in 4 or 8 bits (bitsandbytes' codes), dequantized
when read; the model then computes exactly what it computes with the dequantized tensors in place."""

from __future__ import annotations

import json

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from lorafit.errors import LorafitError  # noqa: E402
from lorafit.kernels import experts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_moe(vocab: int = 128, seed: int = 0):
    """A 2-layer random Qwen3-MoE (4 experts, 2 per token), fp32, seeded: the same weights for the same seed."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                      moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=128, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def dequantized_twin(bits: int):
    """The same model with each expert tensor replaced by dequantize(quantize(W)), dense."""
    model = tiny_moe()
    experts.quantize_experts(model, bits)
    assert experts.dequantize_experts(model) == 4
    assert not any(experts.is_quantized_experts(m) for m in model.modules())
    return model


def test_expert_tensors_are_the_3d_parameters_of_the_experts_modules():
    names = [n for n, _, _ in experts.expert_tensors(tiny_moe())]
    assert names == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]


def test_4bit_codes_are_bitsandbytes_quantize_4bit():
    dense, model = tiny_moe(), tiny_moe()
    assert experts.quantize_experts(model, 4, "nf4", double_quant=True) == 4
    e, d = model.model.layers[1].mlp.experts, dense.model.layers[1].mlp.experts
    codes, state = bnb_functional.quantize_4bit(d.down_proj.data, blocksize=64, compress_statistics=True,
                                                quant_type="nf4")
    stored = e.parametrizations.down_proj
    assert stored.original.dtype == torch.uint8 and torch.equal(stored.original, codes)
    assert torch.equal(stored[0].quant_state.absmax, state.absmax) and stored[0].quant_state.nested
    assert torch.equal(e.down_proj, bnb_functional.dequantize_4bit(codes, state))


def test_8bit_codes_are_llm_int8_rows():
    dense, model = tiny_moe(), tiny_moe()
    experts.quantize_experts(model, 8)
    w = dense.model.layers[0].mlp.experts.gate_up_proj.data
    codes, scales, _ = bnb_functional.int8_vectorwise_quant(w.reshape(-1, w.shape[-1]).half())
    stored = model.model.layers[0].mlp.experts.parametrizations.gate_up_proj
    assert torch.equal(stored.original, codes.reshape(w.shape)) and torch.equal(stored[0].row_scales, scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_and_input_gradients_equal_the_dequantized_model(bits):
    """Forward and backward (with backward's recompute) equal a dense model holding the dequantized tensors,
    and the stored bytes are the codes' (a quarter or half of fp32 for 4 or 8 bits, plus statistics)."""
    model, twin = tiny_moe(), dequantized_twin(bits)
    experts.quantize_experts(model, bits)
    assert experts.recompute_in_backward(model) == 2
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for m in (model, twin):
        m.requires_grad_(False)
    x = model.model.embed_tokens(ids).detach().requires_grad_(True)
    y = twin.model.embed_tokens(ids).detach().requires_grad_(True)
    a, b = model(inputs_embeds=x).logits, twin(inputs_embeds=y).logits
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    assert torch.equal(x.grad, y.grad)
    dense_bytes = sum(p.numel() * 4 for _, m, n in experts.expert_tensors(twin) for p in [getattr(m, n)])
    assert experts.quantized_bytes(model) < dense_bytes * (0.16 if bits == 4 else 0.3)


def saved_for_backward(model, ids) -> int:
    """Bytes autograd keeps from one forward (each storage once)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = model.model.embed_tokens(ids).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=x).logits.sum()
    return sum(saved.values())


def test_backward_keeps_the_experts_inputs_not_their_dense_tensors():
    """Without recompute autograd keeps every layer's dequantized experts for dx; with it, only their inputs."""
    ids = torch.randint(0, 128, (1, 8))
    kept, lean = tiny_moe(), tiny_moe()
    for m in (kept, lean):
        experts.quantize_experts(m, 4)
        m.requires_grad_(False)
    experts.recompute_in_backward(lean)
    dense = sum(getattr(m, n).numel() * 4 for _, m, n in experts.expert_tensors(kept))
    assert saved_for_backward(kept, ids) - saved_for_backward(lean, ids) >= dense


def test_casting_the_model_casts_what_the_experts_dequantize_to():
    model = tiny_moe()
    experts.quantize_experts(model, 4)
    model.to(torch.bfloat16)
    e = model.model.layers[0].mlp.experts
    assert e.gate_up_proj.dtype == torch.bfloat16
    assert e.parametrizations.gate_up_proj[0].quant_state.absmax.dtype != torch.bfloat16  # statistics kept
    assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_a_model_without_experts_is_one_line():
    from conftest import tiny_quantizable_lm

    from lorafit.models import _quantize_moe_experts

    with pytest.raises(LorafitError, match="has no mixture-of-experts tensors"):
        _quantize_moe_experts(tiny_quantizable_lm(), {"quant_type": "nf4", "double_quant": True}, False)


# ---- config, training, merge ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from lorafit.models import load_tokenizer

    folder = tmp_path_factory.mktemp("moe")
    tok = load_tokenizer("demo")
    tiny_moe(vocab=len(tok)).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rows = [{"messages": [{"role": "user", "content": f"Repeat twice: {w}"},
                          {"role": "assistant", "content": f"{w} {w}"}]} for w in ["fig", "kiwi", "lime"] * 4]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(workdir, out: str, **kw):
    from lorafit.config import TrainConfig

    d = dict(base_model=str(workdir / "model"), adapter="qlora", load_in_4bit=True, quantize_moe_experts=True,
             lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
             datasets=[{"path": str(workdir / "data.jsonl"), "type": "chat_template"}], sequence_len=48,
             micro_batch_size=2, max_steps=3, learning_rate=5e-3, output_dir=str(workdir / out), seed=3)
    return TrainConfig.from_dict({**d, **kw})


def test_experts_without_a_quantized_base_are_one_line(workdir):
    with pytest.raises(LorafitError, match="quantize_moe_experts needs a quantized base"):
        config(workdir, "bad", adapter="lora", load_in_4bit=False)


def test_the_key_table_lists_it_as_supported():
    from lorafit.config.axolotl_keys import SUPPORTED, TOP_LEVEL

    assert TOP_LEVEL["quantize_moe_experts"][0] == SUPPORTED


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_holds_the_experts_quantized_and_merge_writes_them_dequantized(workdir, tmp_path, capsys,
                                                                               gradient_checkpointing):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main
    from lorafit.train import train

    out = f"qlora-experts-{gradient_checkpointing}"
    run = train(config(workdir, out, gradient_checkpointing=gradient_checkpointing))
    e = run.model.model.layers[0].mlp.experts
    assert experts.is_quantized_experts(e) and e.lorafit_recompute is not gradient_checkpointing
    assert run.model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router is no expert tensor
    assert run.steps == 3 and run.train_loss is not None and run.train_loss == run.train_loss  # finite, ran
    assert load_file(workdir / out / "adapter_model.safetensors")  # the adapter: attention layers only
    capsys.readouterr()
    assert main(["merge", str(workdir / "model"), str(workdir / out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    w = base.model.layers[1].mlp.experts.down_proj.data
    codes, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(merged.model.layers[1].mlp.experts.down_proj, bnb_functional.dequantize_4bit(codes, state))


def test_the_estimate_says_it_does_not_model_moe(workdir):
    from lorafit.memory.spec import resolve_spec

    with pytest.raises(LorafitError, match="mixture-of-experts model .4 experts.*cannot estimate"):
        resolve_spec(str(workdir / "model"))


def test_micro_batch_size_auto_on_a_moe_model_says_to_give_a_number(workdir):
    from lorafit.train.auto_batch import resolve_auto_batch

    cfg = config(workdir, "auto", micro_batch_size="auto", batch_size=4, max_memory="8GiB")
    with pytest.raises(LorafitError, match="micro_batch_size auto: .*mixture-of-experts.*set micro_batch_size"):
        resolve_auto_batch(cfg, "float32")


# ---- LoRA on the expert tensors (PEFT's target_parameters) -------------------------------------------------------
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def peft_with_expert_targets(tmp_path, base=None, **config):
    """PEFT over ``base`` (the tiny MoE by default) with q_proj and both expert tensors targeted (``config``:
    LoraConfig overrides), B random; saved to ``tmp_path / "peft"``."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(base if base is not None else tiny_moe(), peft.LoraConfig(**{
        "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": EXPERT_PARAMS, **config}))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "peft")
    return model


def test_expert_parameter_targets_equal_peft(tmp_path):
    """Logits and gradients equal PEFT's ParamWrapper; the files load both ways with the same keys; merging
    gives PEFT's merged model."""
    from safetensors.torch import load_file

    from lorafit.lora import load_adapter, merge_and_unload, save_adapter

    theirs = peft_with_expert_targets(tmp_path)
    ours = load_adapter(tiny_moe(), tmp_path / "peft", trainable=True)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    a, b = theirs(ids).logits, ours(ids).logits
    assert torch.equal(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    mine = {f"base_model.model.{n}": p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads.keys() == mine.keys() and any("experts.base_layer.lora_A" in k for k in mine)
    for k in mine:
        torch.testing.assert_close(mine[k], grads[k], rtol=1e-5, atol=1e-7)
    save_adapter(ours, tmp_path / "ours")
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    back = pytest.importorskip("peft").PeftModel.from_pretrained(tiny_moe(), tmp_path / "ours")
    assert torch.equal(back(ids).logits, ours(ids).logits)
    with torch.no_grad():
        want = theirs.merge_and_unload()(ids).logits
        merged = merge_and_unload(ours)
        assert type(merged.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
        assert torch.equal(merged(ids).logits, want)


def test_a_2d_parameter_target_in_bfloat16_equals_peft(tmp_path):
    """A 2-D parameter (PEFT's num_experts == 1) takes PEFT's delta: ``B @ A · s`` in the adapter's dtype, cast
    to the weight's and added, so a bf16 model computes PEFT's logits bitwise."""
    from lorafit.lora import load_adapter

    theirs = peft_with_expert_targets(tmp_path, tiny_moe().to(torch.bfloat16), target_modules=[],
                                      target_parameters=["self_attn.q_proj.weight"])
    ours = load_adapter(tiny_moe().to(torch.bfloat16), tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_merging_expert_parameter_targets_with_rslora_equals_peft(tmp_path):
    """A scaling that is no power of two (rsLoRA, a rank pattern): the merged tensors are PEFT's bitwise (its
    delta weight, ``einsum(B, A) · s``, added)."""
    from lorafit.lora import load_adapter, merge_and_unload

    theirs = peft_with_expert_targets(tmp_path, target_modules=[], use_rslora=True, rank_pattern={"down_proj": 4})
    ours = merge_and_unload(load_adapter(tiny_moe(), tmp_path / "peft"))
    want = theirs.merge_and_unload()
    for m, t in zip(ours.model.layers, want.model.layers, strict=True):
        assert torch.equal(m.mlp.experts.gate_up_proj, t.mlp.experts.gate_up_proj)
        assert torch.equal(m.mlp.experts.down_proj, t.mlp.experts.down_proj)


def test_expert_parameter_targets_over_quantized_experts(tmp_path):
    """Over experts stored in 4 bits the update is added to the dequantized tensor: the same logits as the dense
    twin with the same adapter, and merging writes dequantized + update, dense."""
    from lorafit.lora import load_adapter, merge_and_unload

    peft_with_expert_targets(tmp_path)
    quantized = tiny_moe()
    experts.quantize_experts(quantized, 4)
    ours, twin = load_adapter(quantized, tmp_path / "peft"), load_adapter(dequantized_twin(4), tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, twin(ids).logits)
        merged, twin_merged = merge_and_unload(ours), merge_and_unload(twin)
        for m, t in zip(merged.model.layers, twin_merged.model.layers, strict=True):
            assert not experts.is_quantized_experts(m.mlp.experts)
            assert torch.equal(m.mlp.experts.down_proj, t.mlp.experts.down_proj)


def test_counting_a_partly_merged_quantized_experts_module():
    """One expert tensor adapted and merged (written dense), its sibling still stored in 4 bits: the parameter
    count and the quantized bytes see the sibling's codes only."""
    from lorafit.lora import LoraConfig, apply_lora, count_parameters, merge

    model = tiny_moe()
    experts.quantize_experts(model, 4)
    total, stored = count_parameters(model).total, experts.quantized_bytes(model)
    apply_lora(model, LoraConfig(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"]))
    merge(model)
    e = model.model.layers[0].mlp.experts.base_layer
    assert experts.is_quantized_experts(e)
    assert 0 < experts.quantized_bytes(model) < stored / 2  # down_proj is a third of the expert weights
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count_parameters(model).total == total + lora


def test_continuing_an_adapter_with_other_expert_parameter_targets_is_one_line(tmp_path):
    """lora_model_dir: an adapter over other expert tensors is refused by name, like other target lists (both
    adapt the module ``mlp.experts``, so its layer names alone match)."""
    from lorafit.lora import LoraConfig, apply_lora, save_adapter
    from lorafit.train.setup import check_start_adapter

    saved = LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    save_adapter(apply_lora(tiny_moe(), saved), tmp_path / "a")
    check_start_adapter(tmp_path / "a", saved, "run.yml")
    with pytest.raises(LorafitError, match="lora_target_parameters"):
        check_start_adapter(tmp_path / "a", LoraConfig(target_modules=["q_proj"],
                                                       target_parameters=["mlp.experts.down_proj"]), "run.yml")


def test_dropout_with_expert_parameter_targets_is_one_line(workdir):
    with pytest.raises(LorafitError, match="lora_dropout 0.05 with lora_target_parameters"):
        config(workdir, "bad", lora_target_parameters=EXPERT_PARAMS, lora_dropout=0.05)


def test_an_expert_parameter_entry_matching_nothing_is_one_line():
    from lorafit.lora import LoraConfig, apply_lora

    with pytest.raises(LorafitError, match="'mlp.experts.up_proj' matches no parameter"):
        apply_lora(tiny_moe(), LoraConfig(target_modules=[], target_parameters=["mlp.experts.up_proj"]))


def test_a_parameter_of_a_targeted_layer_is_one_line():
    from lorafit.lora import LoraConfig, apply_lora

    model = tiny_moe()
    with pytest.raises(LorafitError, match="self_attn.q_proj.weight, a parameter of a layer target_modules"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_a_parameter_neither_2d_nor_3d_is_one_line():
    from lorafit.lora import LoraConfig, apply_lora

    model = tiny_moe()
    with pytest.raises(LorafitError, match="q_norm.weight has 1 dimensions"):
        apply_lora(model, LoraConfig(target_modules=[], target_parameters=["self_attn.q_norm.weight"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_training_the_expert_tensors_over_a_4bit_base(workdir, tmp_path, capsys):
    """axolotl's MoE QLoRA recipe (quantize_moe_experts + lora_target_parameters, no module targets) trains,
    saves PEFT's keys for the experts and merges through the CLI."""
    from safetensors.torch import load_file

    from lorafit.cli import main
    from lorafit.train import train

    run = train(config(workdir, "experts-lora", lora_target_modules=None, lora_target_parameters=EXPERT_PARAMS))
    keys = load_file(workdir / "experts-lora" / "adapter_model.safetensors").keys()
    assert {k.split("layers.1.")[-1] for k in keys if "layers.1." in k} == {
        "mlp.experts.lora_A.weight", "mlp.experts.lora_B.weight", "mlp.experts.base_layer.lora_A.weight",
        "mlp.experts.base_layer.lora_B.weight"}
    assert any(p.abs().max() > 0 for n, p in run.model.named_parameters() if "lora_B" in n)  # it learned
    capsys.readouterr()
    assert main(["merge", str(workdir / "model"), str(workdir / "experts-lora"), str(tmp_path / "merged")]) == 0


@pytest.mark.slow  # a torchrun launch (~30 s); in CI's slow selection
@pytest.mark.ci
def test_fsdp2_shards_quantized_adapted_experts_and_equals_one_process(workdir, monkeypatch):
    """axolotl's MoE QLoRA with FSDP2: experts stored in 4 bits and adapted by lora_target_parameters, attention
    by LoRA. The experts' codes and factors are parameters FSDP2 shards like any other; 2 ranks step as one
    process over the union batch (losses to 1e-5, the adapter's keys and values)."""
    from conftest import metrics, run_2_ranks
    from safetensors.torch import load_file

    from lorafit.train import train

    keys = dict(lora_target_parameters=EXPERT_PARAMS, max_steps=4, gradient_accumulation_steps=2, compile_kernels=False,
                lr_scheduler="constant")
    two = config(workdir, "moe-two", micro_batch_size=2, fsdp_version=2, fsdp_config={"reshard_after_forward": True},
                 **keys)
    done = run_2_ranks(workdir, two.model_dump(mode="json", exclude_defaults=True))
    assert done.returncode == 0, done.stdout + done.stderr
    one = train(config(workdir, "moe-one", micro_batch_size=4, shared_prefix=False, **keys))  # as ranks do
    assert [r["loss"] for r in metrics(workdir / "moe-two") if "loss" in r] == pytest.approx(
        [r["loss"] for r in one.history if "loss" in r], rel=1e-5)
    a, b = load_file(workdir / "moe-one" / "adapter_model.safetensors"), load_file(
        workdir / "moe-two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("experts.base_layer.lora_A" in k for k in a)
    for k in a:
        # Adam's first steps are near sign(g): rounding in near-zero gradients shows at ~2e-4 of the largest value
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3 * float(a[k].abs().max()), msg=k)
