"""LoRA over an 8-bit base (``load_in_8bit: true``, LLM.int8): exactly transformers + bitsandbytes + PEFT.

The oracle runs here: transformers loads the same saved tiny Llama with ``BitsAndBytesConfig(load_in_8bit=True)``
and ``device_map={"": "cpu"}``, PEFT puts its LoRA on top. fp32 compute, dropout 0.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from conftest import learnable_batches, same_adapters_as_peft, tiny_quantizable_lm  # noqa: E402

from lorafit.errors import LorafitError  # noqa: E402
from lorafit.kernels import int8  # noqa: E402
from lorafit.lora import (  # noqa: E402
    LoraConfig,
    apply_lora,
    load_adapter,
    merge_and_unload,
    named_lora_layers,
    save_adapter,
)
from lorafit.models import dequantize_base, quantize_base_8bit  # noqa: E402
from lorafit.train import train_step  # noqa: E402

R, ALPHA, LR, STEPS = 8, 16, 5e-3, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def bnb_loaded(folder):
    """transformers + bitsandbytes: the 8-bit base ``load_in_8bit`` loads, on the CPU."""
    q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map={"": "cpu"},
                                                             dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(dense base, its folder, lorafit's 8-bit copy, transformers' 8-bit load of the folder)."""
    base = tiny_quantizable_lm()
    folder = tmp_path_factory.mktemp("llama8")
    base.save_pretrained(folder)
    ours = copy.deepcopy(base)
    quantize_base_8bit(ours)
    return {"base": base, "folder": folder, "ours": ours, "theirs": bnb_loaded(folder)}


def int8_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if int8.is_int8(getattr(m, "weight", None))}


batches = learnable_batches


def with_same_adapters(ours, theirs, b_std: float = 0.0):
    return same_adapters_as_peft(ours, theirs, "int8", R, ALPHA, b_std)


# ---- loading ----------------------------------------------------------------------------------------------
def test_int8_codes_and_scales_are_transformers_load_in_8bit(pair):
    ours, theirs, base = pair["ours"], pair["theirs"], pair["base"]
    layers, oracle = int8_layers(ours), int8_layers(theirs)
    assert set(layers) == set(oracle) and len(layers) == 14  # every decoder linear, nothing else
    dense = dict(base.named_modules())
    for name, m in layers.items():
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(dense[name].weight.data.half())
        assert type(m).__name__ == "Linear8bitLt" and m.state.threshold == oracle[name].state.threshold == 6.0
        assert torch.equal(m.weight.data, oracle[name].weight.data) and torch.equal(m.weight.data, codes), name
        assert torch.equal(int8.scales(m), int8.scales(oracle[name])) and torch.equal(int8.scales(m), scales), name
    # embeddings and the head stay dense, as in transformers
    assert ours.lm_head.weight.dtype == torch.float32 and type(ours.lm_head) is torch.nn.Linear
    assert torch.equal(ours.model.embed_tokens.weight, base.model.embed_tokens.weight)


# ---- exactness against transformers + bitsandbytes + PEFT ------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_loss_and_gradients_equal_peft(pair, mode):
    """Training mode (bitsandbytes' dequantize-and-multiply on the CPU) and eval mode (its LLM.int8 matmul)."""
    ours, peft_model, theirs_layers = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]),
                                                         b_std=0.05)
    b = batches(1)[0]
    ours.train(mode == "train"), peft_model.train(mode == "train")
    out_ours = ours(input_ids=b["input_ids"], labels=b["labels"])
    out_theirs = peft_model(input_ids=b["input_ids"], labels=b["labels"])
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=1e-6, atol=0)
    if mode == "eval":
        return
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in named_lora_layers(ours):
        for side in ("A", "B"):
            got = getattr(layer, f"lora_{side}").weight.grad
            want = getattr(theirs_layers[name], f"lora_{side}")["default"].weight.grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=name + side)


def test_lora_branch_gradients_with_dropout_match_autograd():
    """The LoRA branch's own backward (dropout on) against autograd over the same mask."""
    from lorafit.kernels import dropout
    from lorafit.options import RuntimeOptions

    torch.manual_seed(3)
    x = torch.randn(2, 5, 16, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    base = torch.randn(2, 5, 8, requires_grad=True)
    options = RuntimeOptions.resolve()
    state = torch.get_rng_state()
    y = int8.LoraDeltaFunction.apply(base, x, a, b, 2.0, 0.25, options)
    torch.set_rng_state(state)
    seed = dropout.new_seed(x.device, options.compile)
    keep = dropout.keep_mask(seed, (10, 16), 0.25).view(2, 5, 16)
    want = base + 2.0 * ((x * keep / 0.75) @ a.t()) @ b.t()
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (base, x, a, b), g)
    for u, v in zip(got, torch.autograd.grad(want, (base, x, a, b), g), strict=True):
        torch.testing.assert_close(u, v)


def test_training_steps_track_peft(pair):
    from conftest import options

    from lorafit.patches import apply_lean_kernels

    ours, peft_model, theirs_layers = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]))
    apply_lean_kernels(ours, options=options(compile_=False))  # the 8-bit layers stay outside groups and fusions
    ours.train(), peft_model.train()
    data = batches(1) * STEPS  # one batch again and again: the loss must fall in a few steps
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    theirs = []
    for b in data:
        out = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        theirs.append(float(out.loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    mine = [train_step(ours, opt, sched, [b], 1.0)["loss"] for b in data]
    rel = max(abs(a - b) / abs(b) for a, b in zip(mine, theirs, strict=True))
    assert rel <= 1e-4, f"max relative loss difference {rel:.3e}"
    assert theirs[0] - theirs[-1] > 0.02  # training moved the model
    for name, layer in named_lora_layers(ours):
        want = theirs_layers[name].lora_B["default"].weight
        torch.testing.assert_close(layer.lora_B.weight, want, rtol=1e-3, atol=1e-3 * float(want.detach().abs().max()))


def test_checkpointing_and_dropout_give_the_same_step(pair):
    """Checkpointing recomputes each block, the int8 forward and the dropout mask included: loss and LoRA
    gradients equal an uncheckpointed step's."""
    from conftest import options

    from lorafit.train import make_trainable

    runs = []
    for ckpt in (False, True):
        model = copy.deepcopy(pair["ours"])
        torch.manual_seed(5)
        make_trainable(model, LoraConfig(r=R, alpha=ALPHA, dropout=0.1, target_modules="all-linear"), ckpt,
                       options(compile_=False))
        assert model.is_gradient_checkpointing == ckpt
        with torch.no_grad():
            for _, layer in named_lora_layers(model):
                layer.lora_B.weight.normal_(0, 0.05)
        model.train()
        b = batches(1)[0]
        torch.manual_seed(6)
        out = model(input_ids=b["input_ids"], labels=b["labels"])
        out.loss.backward()
        runs.append((out.loss.detach(), {n: layer.lora_A.weight.grad for n, layer in named_lora_layers(model)}))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-6, atol=0)
    for name, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_adapters_go_both_ways_with_the_same_logits(pair, tmp_path):
    ours, peft_model, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]), b_std=0.05)
    ids = batches(1)[0]["input_ids"]
    ours.eval(), peft_model.eval()
    save_adapter(ours, tmp_path / "lorafit")
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert (want - pair["theirs"](input_ids=ids).logits).abs().max() > 1e-2  # the adapter changes the output
        loaded = peft.PeftModel.from_pretrained(bnb_loaded(pair["folder"]), tmp_path / "lorafit").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        mine = load_adapter(copy.deepcopy(pair["ours"]), tmp_path / "peft").eval()
        torch.testing.assert_close(mine(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# ---- merging ----------------------------------------------------------------------------------------------
def test_merge_writes_dequantized_base_plus_update(pair):
    ours, _, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]), b_std=0.05)
    ours.eval()
    dense = dict(pair["base"].named_modules())
    expected = {}
    for name, layer in named_lora_layers(ours):
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(dense[name].weight.data.half())
        expected[name] = (codes.float() * (scales.view(-1, 1) / 127.0)
                          + (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling)
    merge_and_unload(ours)
    assert dequantize_base(ours) == 0  # every 8-bit layer was a target: none left
    for name, w in expected.items():
        layer = ours.get_submodule(name)
        assert type(layer) is torch.nn.Linear
        torch.testing.assert_close(layer.weight, w, rtol=1e-6, atol=1e-7, msg=name)


def test_unmerge_restores_the_8bit_layer(pair):
    ours, _, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]), b_std=0.05)
    layer = next(layer for _, layer in named_lora_layers(ours))
    packed = layer.base_layer
    layer.merge()
    assert type(layer.base_layer) is torch.nn.Linear and layer.merged
    layer.unmerge()
    assert layer.base_layer is packed and not layer.merged


def test_untargeted_8bit_layers_dequantize(pair):
    model = copy.deepcopy(pair["ours"])
    with torch.no_grad():
        model(input_ids=batches(1)[0]["input_ids"])  # bitsandbytes moves the scales into the layer's state
    want = int8.dequantize(model.model.layers[0].mlp.up_proj)
    assert dequantize_base(model) == 14 and not int8_layers(model)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, want)


def test_dora_over_an_8bit_base_is_one_line(pair):
    with pytest.raises(LorafitError, match="8-bit base: DoRA and PiSSA need the dense weight"):
        apply_lora(copy.deepcopy(pair["ours"]), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))


# ---- lorafit train with load_in_8bit, merge, and what is not supported ----------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import save_repeat_twice

    return save_repeat_twice(tmp_path_factory.mktemp("int8-train"), copies=4)


def train_config(workdir, out: str, **kw):
    from lorafit.config import TrainConfig

    d = dict(base_model=str(workdir / "model"), adapter="lora", load_in_8bit=True, lora_r=4, lora_alpha=8,
             lora_target_linear=True, datasets=[{"path": str(workdir / "data.jsonl"), "type": "chat_template"}],
             sequence_len=48, micro_batch_size=4, max_steps=3, learning_rate=5e-3, output_dir=str(workdir / out),
             seed=7)
    return TrainConfig.from_dict({**d, **kw})


@pytest.fixture(scope="module")
def trained(workdir):
    """A 3-step ``lorafit train`` run with ``load_in_8bit: true``; its output folder."""
    from lorafit.train import train
    from lorafit.train.run_record import fingerprint

    cfg = train_config(workdir, "for-merge", save_steps=2)
    assert fingerprint(cfg)["load_in_8bit"] is True
    run = train(cfg)
    assert int8.is_int8(run.model.model.layers[0].self_attn.q_proj.base_layer.weight)
    return workdir / "for-merge"


def test_the_run_record_says_the_base_was_8bit(trained, workdir):
    from lorafit.cli.loading import base_for
    from lorafit.train.run_record import recorded_quantization

    held = {"four_bit": None, "eight_bit": True, "moe_experts": False, "linearized_experts": False}
    assert recorded_quantization(trained) == held
    assert recorded_quantization(trained / "checkpoint-2") == held
    assert recorded_quantization(workdir / "model") is None  # no record: PEFT files do not say
    dense = {"four_bit": None, "eight_bit": False, "moe_experts": False, "linearized_experts": False}
    assert base_for(str(trained), None, "off") == dense
    assert base_for(str(workdir / "model"), None, None) == dense


def test_cli_generate_over_an_8bit_adapter_loads_the_8bit_base(trained, workdir, capsys):
    from lorafit.cli import main

    assert main(["generate", str(workdir / "model"), "Repeat twice: fig", "--adapter", str(trained),
                 "--max-new-tokens", "2"]) == 0
    assert "trained over an 8-bit (LLM.int8) base" in capsys.readouterr().out


def test_cli_merge_of_an_8bit_adapter_is_dense_dequantized_plus_update(trained, workdir, tmp_path, capsys):
    """The run record says the adapter was trained over an int8 base, so merge needs no flag; --base-8bit off
    merges into the dense weights instead."""
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main
    from lorafit.lora import read_adapter_weights

    capsys.readouterr()
    assert main(["merge", str(workdir / "model"), str(workdir / "for-merge"), str(tmp_path / "merged")]) == 0
    assert "trained over an 8-bit (LLM.int8) base" in capsys.readouterr().out
    assert main(["merge", str(workdir / "model"), str(workdir / "for-merge"), str(tmp_path / "dense"),
                 "--base-8bit", "off"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    assert getattr(merged.config, "quantization_config", None) is None  # a plain 32-bit model
    adapter = read_adapter_weights(workdir / "for-merge")
    for name, m in base.named_modules():
        if type(m) is not torch.nn.Linear or name == "lm_head":
            continue
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        update = (b.float() @ a.float()) * (8 / 4)
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(m.weight.data.half())
        want = codes.float() * (scales.view(-1, 1) / 127.0) + update
        torch.testing.assert_close(merged.get_submodule(name).weight, want, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(dense.get_submodule(name).weight, m.weight.data + update)
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)  # the head stayed dense throughout


def test_base_flags_conflict_is_one_line(workdir, tmp_path, capsys):
    from lorafit.cli import main

    assert main(["merge", str(workdir / "model"), str(workdir / "model"), str(tmp_path / "x"), "--qlora",
                 "--base-8bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--qlora and --base-8bit are both given" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("over", "message"), [
    ({"load_in_4bit": True}, "load_in_8bit and load_in_4bit are both set"),
    ({"adapter": None, "lora_target_linear": False}, "load_in_8bit needs adapter: lora"),
    ({"adapter": "qlora"}, "load_in_8bit with adapter: qlora: QLoRA is a 4-bit base"),
    ({"peft_use_dora": True}, "load_in_8bit and peft_use_dora cannot be combined"),
    ({"lora_init": "pissa"}, "load_in_8bit and lora_init: pissa cannot be combined"),
])
def test_what_is_not_supported_over_an_8bit_base_is_one_line(workdir, over, message):
    with pytest.raises(LorafitError, match=message) as e:
        train_config(workdir, "bad", **over)
    assert "\n" not in str(e.value)


# ---- the estimator counts what bitsandbytes holds -------------------------------------------------------------
def test_estimated_8bit_weights_are_the_real_bytes(workdir):
    from lorafit.memory.estimate import Settings, estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec
    from lorafit.models import load_model

    s = settings_from_config(train_config(workdir, "est"), "cpu")
    assert s.eight_bit and not s.lean and s.dtype == "float32"
    model = load_model(str(workdir / "model"))
    quantize_base_8bit(model)
    real = sum(int8.int8_bytes(m) if int8.is_int8(getattr(m, "weight", None)) else
               sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
               for m in model.modules())
    spec = resolve_spec(str(workdir / "model"))
    assert estimate(spec, s).component("weights").bytes == real
    dense = estimate(spec, Settings(**{**s.to_dict(), "eight_bit": False})).component("weights").bytes
    assert real < dense  # int8 linears are smaller than their fp32 originals


@pytest.mark.parametrize(("over", "message"), [(dict(method="full"), "an 8-bit base takes plain LoRA"),
                                               (dict(four_bit="nf4"), "an 8-bit base takes plain LoRA")])
def test_estimator_settings_refuse_what_training_refuses(over, message):
    from lorafit.memory.estimate import Settings

    with pytest.raises(LorafitError, match=message):
        Settings(eight_bit=True, **over)


def test_parameter_count_is_peft_s(pair):
    from lorafit.lora.inject import count_parameters

    ours, peft_model, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]))
    count = count_parameters(ours)
    assert (count.trainable, count.total) == peft_model.get_nb_trainable_parameters()


@pytest.mark.slow
def test_a_gguf_base_is_dequantized_then_quantized_to_int8():
    from lorafit.models import demo_model_file, load_model, load_model_and_tokenizer

    try:
        gguf = demo_model_file()
    except LorafitError:
        pytest.skip("demo GGUF not installed")
    model, _ = load_model_and_tokenizer(str(gguf), eight_bit=True)
    dense = load_model(str(gguf))
    layers = int8_layers(model)
    assert len(layers) == 30 * 7 and type(model.lm_head) is torch.nn.Linear
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(dense.get_submodule(name).weight.data.half())
        assert torch.equal(layers[name].weight.data, codes) and torch.equal(int8.scales(layers[name]), scales)
