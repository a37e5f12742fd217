"""Base checkpoints that load in another form than they are stored: an MXFP4 checkpoint (gpt-oss) dequantized on
load (axolotl's ``model_quantization_config: Mxfp4Config``), and Llama 4's routed experts as per-expert linear
layers (axolotl's ``llama4_linearized_experts``)."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.errors import LorafitError

pytestmark = pytest.mark.usefixtures("one_thread")

# the 16 values of an FP4 (E2M1) code, as the OCP MX format defines them
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_pack(codes: torch.Tensor, exponents: torch.Tensor):
    """``(blocks, scales, values)`` of a matrix given as FP4 codes ``(..., rows, cols)`` and one power-of-two
    exponent per 32 values of a row: the checkpoint layout of gpt-oss (two codes a byte, the first in the low
    nibble; scales biased by 127), and the dense values they stand for."""
    *lead, rows, cols = codes.shape
    pairs = codes.reshape(*lead, rows, cols // 32, 16, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    scales = (exponents + 127).to(torch.uint8)
    values = FP4[codes] * torch.exp2(exponents.float()).repeat_interleave(32, -1)
    return blocks, scales, values


def tiny_gpt_oss(vocab: int = 128):
    import transformers

    cfg = transformers.GptOssConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8, use_cache=False,
                                    layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def save_mxfp4_gpt_oss(folder, tokenizer=None) -> dict[str, torch.Tensor]:
    """A tiny gpt-oss saved as MXFP4 (its expert tensors as blocks and scales of random codes, the config's
    quantization_config as the Hub's gpt-oss has it); returns ``parameter name -> the dense value encoded``, in
    the layout transformers' GptOssExperts holds (experts × in × out)."""
    from safetensors.torch import load_file, save_file

    tiny_gpt_oss(len(tokenizer) if tokenizer is not None else 128).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    state, encoded = load_file(folder / "model.safetensors"), {}
    g = torch.Generator().manual_seed(1)
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, n_in, n_out = state.pop(name).shape  # stored transposed: one row per output
        codes = torch.randint(0, 16, (experts, n_out, n_in), generator=g)
        exponents = torch.randint(-3, 2, (experts, n_out, n_in // 32), generator=g)
        state[name + "_blocks"], state[name + "_scales"], values = mxfp4_pack(codes, exponents)
        encoded[name] = values.transpose(1, 2)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config))
    return encoded


# ---- MXFP4 ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mxfp4") / "model"
    return folder, save_mxfp4_gpt_oss(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_mxfp4_checkpoint_loads_as_the_values_it_encodes(mxfp4, dtype):
    """lorafit's loader gives the experts the encoded values (exact: FP4 times a power of two fits bf16), as
    transformers' Mxfp4Config(dequantize=True) does, and a model that saves as a plain one."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from lorafit.models import load_model

    folder, encoded = mxfp4
    model = load_model(str(folder), dtype)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True))
    ours_state, theirs_state = model.state_dict(), theirs.state_dict()
    for name, values in encoded.items():
        assert ours_state[name].dtype == dtype
        assert torch.equal(ours_state[name], values.to(dtype)) and torch.equal(ours_state[name], theirs_state[name])
    assert getattr(model.config, "quantization_config", None) is None  # save_pretrained writes a plain model
    assert model.config._attn_implementation == "eager"  # gpt-oss has no sdpa (its attention sinks)
    assert "has no sdpa path in transformers; it runs eager attention" in model.attention_notice  # said, not silent


def gpt_oss_config(folder, out, **kw):
    from lorafit.config import TrainConfig

    d = dict(base_model=str(folder / "model"), model_quantization_config="Mxfp4Config",
             model_quantization_config_kwargs={"dequantize": True}, adapter="lora", lora_r=4, lora_alpha=8,
             lora_target_modules=["q_proj", "o_proj"], lora_target_parameters=["mlp.experts.gate_up_proj"],
             datasets=[{"path": str(folder / "data.jsonl"), "type": "chat_template"}], sequence_len=48,
             micro_batch_size=2, max_steps=2, learning_rate=5e-3, output_dir=str(folder / out), seed=3)
    return TrainConfig.from_dict({**d, **kw})


@pytest.mark.parametrize(("kw", "message"), [
    (dict(model_quantization_config="FineGrainedFP8Config"), "only Mxfp4Config .* is supported"),
    (dict(model_quantization_config_kwargs=None), "Mxfp4Config needs model_quantization_config_kwargs: .dequantize"),
    (dict(model_quantization_config_kwargs={"dequantize": False}), "needs .*dequantize: true"),
    (dict(model_quantization_config=None), "model_quantization_config_kwargs is set without"),
    (dict(load_in_8bit=True), "model_quantization_config with load_in_4bit or load_in_8bit"),
])
def test_what_is_not_mxfp4_dequantized_is_one_line(tmp_path, kw, message):
    with pytest.raises(LorafitError, match=message) as e:
        gpt_oss_config(tmp_path, "x", **kw)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def gpt_oss_workdir(tmp_path_factory):
    from lorafit.models import load_tokenizer

    folder = tmp_path_factory.mktemp("gptoss")
    save_mxfp4_gpt_oss(folder / "model", load_tokenizer("demo"))
    rows = [{"messages": [{"role": "user", "content": f"Repeat twice: {w}"},
                          {"role": "assistant", "content": f"{w} {w}"}]} for w in ["fig", "kiwi", "lime"] * 4]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_lora_on_gpt_oss_trains_and_merges_into_a_plain_model(gpt_oss_workdir, tmp_path, capsys):
    """axolotl's gpt-oss LoRA recipe on the MXFP4 checkpoint: attention and the experts' tensor
    (lora_target_parameters) train; the merged model loads in plain transformers with the trained weights."""
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main
    from lorafit.lora import merge_and_unload
    from lorafit.train import train

    run = train(gpt_oss_config(gpt_oss_workdir, "lora"))
    assert run.steps == 2 and run.train_loss == run.train_loss
    assert any(p.abs().max() > 0 for n, p in run.model.named_parameters() if "lora_B" in n)
    expected = merge_and_unload(run.model).state_dict()
    capsys.readouterr()
    assert main(["merge", str(gpt_oss_workdir / "model"), str(gpt_oss_workdir / "lora"), str(tmp_path / "m")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).state_dict()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(merged[name], expected[name])


def test_the_estimate_of_an_mxfp4_run(gpt_oss_workdir):
    """The config's settings count the dequantized dtype (no 4-bit base); the MoE model itself is refused by the
    estimate in one line, as every MoE model is."""
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec

    s = settings_from_config(gpt_oss_config(gpt_oss_workdir, "est", bf16=True), "cuda")
    assert s.dtype == "bfloat16" and not s.four_bit and not s.eight_bit
    with pytest.raises(LorafitError, match="mixture-of-experts model .4 experts.*cannot estimate"):
        resolve_spec(str(gpt_oss_workdir / "model"))


# ---- Llama 4 linearized experts ------------------------------------------------------------------------------
def tiny_llama4(vocab: int = 128):
    """A 2-layer random Llama 4 text model, both layers MoE (4 experts, 1 per token), fp32, seeded."""
    import transformers

    cfg = transformers.Llama4TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=32,
                                        intermediate_size_mlp=96, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                                        interleave_moe_layer_step=1, use_cache=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
EXPERT_TARGETS = r".*\.experts\.(gate|up|down)_projs\.[0-9]+"


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A tiny Llama 4 saved fused (transformers' layout) and linearized (axolotl's layout); its logits."""
    import copy

    from lorafit.linearized import linearize

    root = tmp_path_factory.mktemp("llama4")
    model = tiny_llama4()
    model.save_pretrained(root / "fused")
    linear = copy.deepcopy(model)
    linearize(linear)
    linear.save_pretrained(root / "linear")  # keys …experts.gate_projs.N.weight, as axolotl's checkpoints
    with torch.no_grad():
        return root, model, model(IDS).logits


def test_linearized_experts_hold_the_fused_weights_and_compute_the_same(llama4, tmp_path):
    """Each expert's Linear holds its slice of gate_up_proj / down_proj transposed; the experts and the whole
    model compute exactly what the fused ones do (fp32); the state fuses back to transformers' tensors."""
    import copy

    from lorafit.linearized import LinearizedLlama4Experts, fused_from, linearize

    _, fused_model, logits = llama4
    model = copy.deepcopy(fused_model)
    assert linearize(model) == ["model.layers.0.feed_forward.experts", "model.layers.1.feed_forward.experts"]
    fused, linear = fused_model.model.layers[1].feed_forward.experts, model.model.layers[1].feed_forward.experts
    assert isinstance(linear, LinearizedLlama4Experts)
    assert torch.equal(linear.gate_projs[2].weight, fused.gate_up_proj[2, :, :32].T)
    assert torch.equal(linear.up_projs[2].weight, fused.gate_up_proj[2, :, 32:].T)
    assert torch.equal(linear.down_projs[3].weight, fused.down_proj[3].T)
    x = torch.randn(4 * 5, 64)
    with torch.no_grad():
        assert torch.equal(linear(x), fused(x))
        assert torch.equal(model(IDS).logits, logits)
    back = fused_from(linear, model.config.get_text_config())  # what save_pretrained writes, layer by layer
    assert torch.equal(back.gate_up_proj, fused.gate_up_proj) and torch.equal(back.down_proj, fused.down_proj)
    with torch.no_grad():
        assert torch.equal(back(x), fused(x))
    # save_pretrained writes the fused layout (plain transformers loads it) and leaves the model linearized
    from transformers import AutoModelForCausalLM

    from lorafit.linearized import save_pretrained

    save_pretrained(model, tmp_path / "saved")
    assert isinstance(model.model.layers[1].feed_forward.experts, LinearizedLlama4Experts)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits) and torch.equal(reloaded.eval()(IDS).logits, logits)


@pytest.mark.parametrize("layout", ["fused", "linear"])
def test_both_checkpoint_layouts_load_linearized(llama4, layout):
    from lorafit.linearized import LinearizedLlama4Experts
    from lorafit.models import load_model

    root, _, logits = llama4
    model = load_model(str(root / layout), linearized_experts=True)
    assert isinstance(model.model.layers[0].feed_forward.experts, LinearizedLlama4Experts)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits)


def test_a_multimodal_llama4_checkpoint_loads_its_language_model_linearized(tmp_path):
    """Llama 4 as published (Llama4ForConditionalGeneration, axolotl's model_type) loads text-only through
    AutoModelForCausalLM; its linearized form (keys language_model.model.layers.N…gate_projs.M) loads too."""
    import transformers
    from safetensors.torch import load_file, save_file

    from lorafit.models import load_model

    text = tiny_llama4().config.to_dict()
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    torch.manual_seed(0)
    transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text, vision_config=vision)
                                                ).save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        logits = reference(IDS).logits
        assert torch.equal(load_model(str(tmp_path), linearized_experts=True)(IDS).logits, logits)
    state, linear = load_file(tmp_path / "model.safetensors"), {}
    for key, w in state.items():
        prefix, _, name = key.rpartition(".")
        if name == "gate_up_proj":
            for n in range(w.shape[0]):
                linear[f"{prefix}.gate_projs.{n}.weight"], linear[f"{prefix}.up_projs.{n}.weight"] = w[n].T.chunk(2)
        elif name == "down_proj" and prefix.endswith("experts"):
            linear.update({f"{prefix}.down_projs.{n}.weight": w[n].T for n in range(w.shape[0])})
        else:
            linear[key] = w
    assert "language_model.model.layers.1.feed_forward.experts.up_projs.3.weight" in linear
    save_file({k: v.contiguous() for k, v in linear.items()}, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path), linearized_experts=True)(IDS).logits, logits)


def test_a_linearized_checkpoint_without_the_key_is_one_line(llama4):
    """transformers would start the fused experts from random values and drop the checkpoint's."""
    from lorafit.models import load_model

    with pytest.raises(LorafitError, match="linearized Llama 4 checkpoint .*set llama4_linearized_experts: true"):
        load_model(str(llama4[0] / "linear"))


def test_the_key_on_a_model_that_is_not_llama4_is_one_line(mxfp4):
    from lorafit.models import load_model

    with pytest.raises(LorafitError, match="llama4_linearized_experts: .* is a gpt_oss model, not Llama 4; .*remove"):
        load_model(str(mxfp4[0]), linearized_experts=True)


def test_lora_targets_single_experts_and_4bit_quantizes_them(llama4):
    from lorafit.lora import LoraConfig, apply_lora
    from lorafit.models import load_model, quantize_base

    model = load_model(str(llama4[0] / "fused"), linearized_experts=True)
    quantize_base(model)
    assert type(model.model.layers[1].feed_forward.experts.down_projs[3]).__name__ == "Linear4bit"
    apply_lora(model, LoraConfig(r=2, alpha=4, target_modules=EXPERT_TARGETS))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 2 * 3 * 4 and "model.layers.0.feed_forward.experts.up_projs.3" in wrapped
    one = load_model(str(llama4[0] / "fused"), linearized_experts=True)
    apply_lora(one, LoraConfig(r=2, alpha=4, target_modules=["experts.gate_projs.0"]))
    assert {n for n, m in one.named_modules() if hasattr(m, "lora_A")} == {
        f"model.layers.{i}.feed_forward.experts.gate_projs.0" for i in (0, 1)}
    with pytest.raises(LorafitError, match=r"'experts.gate_projs.\[0-9\]\+\$' matches no Linear layer; .*gate_projs.N"
                                           r".*one regex string"):
        apply_lora(load_model(str(llama4[0] / "fused"), linearized_experts=True),
                   LoraConfig(r=2, alpha=4, target_modules=["q_proj", "experts.gate_projs.[0-9]+$"]))


def test_quantize_moe_experts_with_linearized_experts_is_one_line(tmp_path):
    from lorafit.config import TrainConfig

    with pytest.raises(LorafitError, match="quantize_moe_experts with llama4_linearized_experts"):
        TrainConfig.from_dict(dict(base_model="demo", datasets=[{"path": "d.jsonl", "type": "completion"}],
                                   adapter="qlora", load_in_4bit=True, lora_target_linear=True,
                                   quantize_moe_experts=True, llama4_linearized_experts=True))


def test_lora_on_linearized_experts_trains_and_merges_fused(llama4, tmp_path, capsys):
    """Training with the key saves an adapter over the per-expert layers; merge writes the fused layout, which
    plain transformers loads (no unused or missing keys) with the merged weights."""
    import copy

    from transformers import AutoModelForCausalLM

    from lorafit.cli import main
    from lorafit.config import TrainConfig
    from lorafit.linearized import fused_from
    from lorafit.lora import merge_and_unload
    from lorafit.models import load_tokenizer
    from lorafit.train import train

    tok = load_tokenizer("demo")
    base = tmp_path / "base"
    tiny_llama4(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    rows = [{"text": f"{w} {w} {w}"} for w in ["fig", "kiwi", "lime"] * 4]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict(dict(
        base_model=str(base), llama4_linearized_experts=True, adapter="lora", lora_r=2, lora_alpha=4,
        lora_target_modules=EXPERT_TARGETS, datasets=[{"path": str(tmp_path / "d.jsonl"), "type": "completion"}],
        sequence_len=16, micro_batch_size=2, max_steps=2, learning_rate=5e-3, output_dir=str(tmp_path / "out")))
    run = train(cfg)
    assert any(p.abs().max() > 0 for n, p in run.model.named_parameters() if "lora_B" in n)
    plain = merge_and_unload(copy.deepcopy(run.model))
    experts = plain.get_submodule("model.layers.1.feed_forward.experts")
    expected = {"model.layers.1.feed_forward.experts.gate_up_proj":
                fused_from(experts, plain.config.get_text_config()).gate_up_proj.detach()}
    capsys.readouterr()
    assert main(["merge", str(base), str(tmp_path / "out"), str(tmp_path / "merged")]) == 0
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    name = "model.layers.1.feed_forward.experts.gate_up_proj"
    torch.testing.assert_close(merged.state_dict()[name], expected[name])
    assert not torch.equal(expected[name], AutoModelForCausalLM.from_pretrained(base).state_dict()[name])


def test_the_demo_tokenizer_is_read_from_gguf_once_then_from_its_cached_folder(tmp_path, monkeypatch):
    """The GGUF vocabulary takes seconds to parse; the first load keeps the tokenizer as a folder, later loads
    read it and get the same tokenizer. A folder that is there is read, never rewritten."""
    from lorafit.models import load_tokenizer

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    first = load_tokenizer("demo")
    (folder,) = tmp_path.glob("*-tokenizer-*")
    written = (folder / "tokenizer.json").stat().st_mtime_ns
    second = load_tokenizer("demo")
    assert second.name_or_path == str(folder) and first.name_or_path != str(folder)
    text = "<|im_start|>user\nWhen did it open?<|im_end|>\n<|im_start|>assistant\n1887-03-04<|im_end|>"
    assert second(text).input_ids == first(text).input_ids
    assert (second.chat_template, second.eos_token, second.pad_token, len(second)) == \
        (first.chat_template, first.eos_token, first.pad_token, len(first))
    assert (folder / "tokenizer.json").stat().st_mtime_ns == written
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary folder left behind
