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
