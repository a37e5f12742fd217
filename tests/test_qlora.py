"""QLoRA (issue 16): a 4-bit NF4 base with double quantization, exactly transformers + bitsandbytes + PEFT.

The oracle runs here: transformers loads the same saved tiny model with ``BitsAndBytesConfig(load_in_4bit=True,
nf4, double quant, fp32 compute)`` and ``device_map={"": "cpu"}``, PEFT puts its LoRA on top. Tiny random Llama
and Qwen2 (hidden 64, so bitsandbytes' 64-element blocks divide every layer), fp32, dropout 0.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from conftest import assert_same_adapter_files, learnable_batches, same_adapters_as_peft, tiny_quantizable_lm  # noqa: E402

from lorafit.errors import LorafitError  # noqa: E402
from lorafit.kernels import nf4  # noqa: E402
from lorafit.lora import (  # noqa: E402
    LoraConfig,
    apply_lora,
    load_adapter,
    merge_and_unload,
    named_lora_layers,
    save_adapter,
)
from lorafit.models import dequantize_base, quantize_base  # noqa: E402
from lorafit.train import train_step  # noqa: E402

R, ALPHA, LR, STEPS = 8, 16, 5e-3, 20


pytestmark = pytest.mark.usefixtures("one_thread")


def bnb_loaded(folder):
    """transformers + bitsandbytes: the QLoRA base every QLoRA tutorial loads, on the CPU."""
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map={"": "cpu"},
                                                             dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    """(dense base, its folder, lorafit's 4-bit copy, transformers' 4-bit load of the folder)."""
    base = tiny_quantizable_lm(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    base.save_pretrained(folder)
    ours = copy.deepcopy(base)
    quantize_base(ours)
    return {"arch": request.param, "base": base, "folder": folder, "ours": ours, "theirs": bnb_loaded(folder)}


def four_bit_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if nf4.is_4bit(getattr(m, "weight", None))}


batches = learnable_batches


def with_same_adapters(ours, theirs, b_std: float = 0.0):
    return same_adapters_as_peft(ours, theirs, "qlora", R, ALPHA, b_std)


# ---- loading ----------------------------------------------------------------------------------------------
def test_4bit_codes_and_statistics_are_bitsandbytes_quantize_4bit(pair):
    ours, theirs, base = pair["ours"], pair["theirs"], pair["base"]
    layers, oracle = four_bit_layers(ours), four_bit_layers(theirs)
    assert set(layers) == set(oracle) and len(layers) == 14  # every decoder linear, nothing else
    dense = dict(base.named_modules())
    for name, m in layers.items():
        codes, state = bnb_functional.quantize_4bit(dense[name].weight.data, blocksize=64, compress_statistics=True,
                                                    quant_type="nf4")
        got = m.weight.quant_state
        assert torch.equal(m.weight.data, codes) and torch.equal(m.weight.data, oracle[name].weight.data), name
        assert got.quant_type == "nf4" and got.blocksize == 64 and got.nested
        assert torch.equal(got.absmax, state.absmax) and torch.equal(got.offset, state.offset)
        assert torch.equal(got.state2.absmax, state.state2.absmax) and torch.equal(got.state2.code, state.state2.code)
    # embeddings and the head stay dense, as in transformers
    assert ours.lm_head.weight.dtype == torch.float32 and type(ours.lm_head) is torch.nn.Linear
    assert torch.equal(ours.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_layer_size_the_block_size_does_not_divide_is_one_line():
    model = tiny_quantizable_lm("llama", hidden_size=40, intermediate_size=64)  # k_proj: 20 × 40 = 800 elements
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(LorafitError, match=r"^load_in_4bit: layer model\.layers\.0\.self_attn\.k_proj .*block size 64$"):
        quantize_base(model)
    assert {n: type(m) for n, m in model.named_modules()} == before  # nothing half-quantized


# ---- exactness against transformers + bitsandbytes + PEFT ------------------------------------------------
def test_logits_loss_and_gradients_equal_peft(pair):
    ours, peft_model, theirs_layers = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]),
                                                         b_std=0.05)
    b = batches(1)[0]
    ours.train(), peft_model.train()
    out_ours = ours(input_ids=b["input_ids"], labels=b["labels"])
    out_theirs = peft_model(input_ids=b["input_ids"], labels=b["labels"])
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=1e-6, atol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in named_lora_layers(ours):
        for side in ("A", "B"):
            got = getattr(layer, f"lora_{side}").weight.grad
            want = getattr(theirs_layers[name], f"lora_{side}")["default"].weight.grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=name + side)


def test_training_20_steps_tracks_peft(pair):
    """The lean kernels ``lorafit train`` switches on (q/k/v and gate/up groups and the fused SiLU·up·down_proj
    over 4-bit weights, norms, RoPE, attention) and its step, against PEFT + bitsandbytes, 20 steps."""
    from conftest import options

    from lorafit.patches import apply_lean_kernels

    ours, peft_model, theirs_layers = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]))
    apply_lean_kernels(ours, options=options(compile_=False))
    ours.train()
    data = batches(STEPS)

    peft_model.train()
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
    from lorafit.kernels.gated_mlp import ActMulLoraDown
    from lorafit.kernels.lora_group import LoraGroupFunction

    calls = {LoraGroupFunction: 0, ActMulLoraDown: 0}
    originals = {f: f.apply for f in calls}

    def counted(f):
        def apply(*a):
            calls[f] += 1
            return originals[f](*a)
        return apply

    for f in calls:
        f.apply = counted(f)
    try:
        mine = [train_step(ours, opt, sched, [b], 1.0)["loss"] for b in data]
    finally:
        for f, original in originals.items():
            f.apply = original
    # every block's q/k/v and gate/up ran as groups, and its down_proj in the fused gated MLP
    assert calls == {LoraGroupFunction: 4 * STEPS, ActMulLoraDown: 2 * STEPS}
    rel = max(abs(a - b) / abs(b) for a, b in zip(mine, theirs, strict=True))
    assert rel <= 1e-4, f"max relative loss difference {rel:.3e}"
    assert theirs[0] - theirs[-1] > 0.05  # training moved the model
    for name, layer in named_lora_layers(ours):
        want = theirs_layers[name].lora_B["default"].weight
        torch.testing.assert_close(layer.lora_B.weight, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_a_step_dequantizes_each_4bit_weight_once_per_use(pair, monkeypatch, checkpointing):
    """A training step dequantizes each 4-bit weight once in forward (again in checkpointing's recompute) and
    once in backward where its input needs a gradient: not for the first block's q/k/v, whose input is the
    frozen embedding's output. As PEFT + bitsandbytes do (their forward dequantizes inside ``gemm_4bit``); the
    dense weight is never kept from forward to backward, so this is the least a step can do."""
    from conftest import options

    from lorafit.train.setup import make_trainable

    lora = LoraConfig(r=R, alpha=ALPHA, dropout=0.05, target_modules="all-linear")
    model = make_trainable(copy.deepcopy(pair["ours"]), lora, checkpointing, options(compile_=False))
    n = len(four_bit_layers(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    calls = []
    real = bnb_functional.dequantize_4bit  # what nf4.dequantize calls
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    for b in batches(2):
        calls.clear()
        train_step(model, opt, sched, [b], 1.0)
        first_qkv = 3
        assert n == 14 and len(calls) == n * (3 if checkpointing else 2) - first_qkv


def test_adapters_go_both_ways_with_the_same_logits(pair, tmp_path):
    ours, peft_model, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]), b_std=0.05)
    ids = batches(1)[0]["input_ids"]
    ours.eval(), peft_model.eval()
    save_adapter(ours, tmp_path / "lorafit")
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert (want - pair["theirs"](input_ids=ids).logits).abs().max() > 1e-2  # the adapter changes the output
        # lorafit's file in PEFT over transformers' 4-bit base
        loaded = peft.PeftModel.from_pretrained(bnb_loaded(pair["folder"]), tmp_path / "lorafit").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        # PEFT's file in lorafit over lorafit's 4-bit base
        mine = load_adapter(copy.deepcopy(pair["ours"]), tmp_path / "peft").eval()
        torch.testing.assert_close(mine(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_parameter_count_is_the_weights_not_the_packed_bytes(pair):
    """The header's count of a 4-bit model: PEFT's (a 4-bit parameter stands for twice its stored elements)."""
    from lorafit.lora.inject import count_parameters

    ours, peft_model, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    count = count_parameters(ours)
    assert (count.trainable, count.total) == (trainable, total)


# ---- merging ----------------------------------------------------------------------------------------------
def test_merge_writes_dequantized_base_plus_update(pair):
    ours, _, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]), b_std=0.05)
    ours.eval()
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        before = ours(input_ids=ids).logits
    expected = {name: (nf4.dequantize(layer.base_layer.weight).float()
                       + (layer.lora_B.weight.float() @ layer.lora_A.weight.float()) * layer.scaling)
                for name, layer in named_lora_layers(ours)}
    merge_and_unload(ours)
    assert dequantize_base(ours) == 0  # every 4-bit layer was a target: none left
    for name, w in expected.items():
        layer = ours.get_submodule(name)
        assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, w), name
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_unmerge_restores_the_4bit_layer(pair):
    ours, _, _ = with_same_adapters(copy.deepcopy(pair["ours"]), copy.deepcopy(pair["theirs"]), b_std=0.05)
    layer = next(layer for _, layer in named_lora_layers(ours))
    packed = layer.base_layer
    layer.merge()
    assert type(layer.base_layer) is torch.nn.Linear and layer.merged
    layer.unmerge()
    assert layer.base_layer is packed and not layer.merged


def test_dora_over_a_4bit_base_is_one_line(pair):
    with pytest.raises(LorafitError, match="4-bit base: DoRA and PiSSA need the dense weight"):
        apply_lora(copy.deepcopy(pair["ours"]), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))


# ---- lorafit train with adapter: qlora, 8-bit and paged optimizers -------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import save_repeat_twice

    return save_repeat_twice(tmp_path_factory.mktemp("qlora-train"), copies=4)


def train_config(workdir, out: str, **kw):
    from lorafit.config import TrainConfig

    d = dict(base_model=str(workdir / "model"), adapter="qlora", load_in_4bit=True, lora_r=4, lora_alpha=8,
             lora_target_linear=True, datasets=[{"path": str(workdir / "data.jsonl"), "type": "chat_template"}],
             sequence_len=48, micro_batch_size=4, max_steps=8, learning_rate=5e-3, lr_scheduler="cosine",
             warmup_steps=2, weight_decay=0.01, output_dir=str(workdir / out), seed=7)
    return TrainConfig.from_dict({**d, **kw})


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit"])
def test_qlora_run_stopped_and_resumed_equals_a_straight_run(workdir, optimizer):
    """The optimizer's (8-bit, block-quantized) states are in the checkpoint: stopping after step 3 and resuming
    ends with bitwise the adapter of an uninterrupted run."""

    from lorafit.train import train

    straight = train(train_config(workdir, f"straight-{optimizer}", optimizer=optimizer))
    assert isinstance(straight.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state,
                      bnb_functional.QuantState)
    stopped = train(train_config(workdir, f"resumed-{optimizer}", optimizer=optimizer), stop_after=3)
    assert stopped.interrupted and (workdir / f"resumed-{optimizer}" / "checkpoint-3").is_dir()
    resumed = train(train_config(workdir, f"resumed-{optimizer}", optimizer=optimizer), resume=True)
    assert resumed.steps == 8
    a = assert_same_adapter_files(workdir / f"straight-{optimizer}", workdir / f"resumed-{optimizer}")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_8bit_optimizer_keeps_8bit_states():
    from lorafit.train.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(4, 4))  # 8192 elements and 16
    opt = build_optimizer(model, "adamw_bnb_8bit", 1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    big, small = opt.state[model[0].weight], opt.state[model[1].weight]
    assert big["state1"].dtype == torch.uint8 and big["state2"].dtype == torch.uint8
    assert small["state1"].dtype == torch.float32  # bitsandbytes keeps tensors under 4096 elements in 32 bits
    paged = build_optimizer(model, "paged_adamw_8bit", 1e-3)
    assert type(paged).__name__ == "AdamW8bit" and "need CUDA" in paged.lorafit_notice


def test_load_in_4bit_under_adapter_lora_follows_axolotl(workdir):
    cfg = train_config(workdir, "lora4", adapter="lora")
    assert cfg.four_bit == {"quant_type": "fp4", "double_quant": False}
    assert any("as axolotl does" in n for n in cfg.notices)
    assert train_config(workdir, "q", bnb_config_kwargs={"bnb_4bit_use_double_quant": False}).four_bit == {
        "quant_type": "nf4", "double_quant": False}


def test_cli_merge_of_a_qlora_adapter_is_dense_dequantized_plus_update(workdir, tmp_path, capsys):
    """The run record says the adapter was trained over NF4, so merge needs no --qlora; --qlora off merges
    into the dense weights instead."""
    from transformers import AutoModelForCausalLM

    from lorafit.cli import main
    from lorafit.lora import read_adapter_weights
    from lorafit.train import train

    train(train_config(workdir, "for-merge", max_steps=3))
    capsys.readouterr()
    assert main(["merge", str(workdir / "model"), str(workdir / "for-merge"), str(tmp_path / "merged")]) == 0
    assert "trained over a 4-bit nf4 base" in capsys.readouterr().out
    assert main(["merge", str(workdir / "model"), str(workdir / "for-merge"), str(tmp_path / "dense"),
                 "--qlora", "off"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    assert getattr(merged.config, "quantization_config", None) is None  # a plain 16/32-bit model
    adapter = read_adapter_weights(workdir / "for-merge")
    for name, m in base.named_modules():
        if type(m) is not torch.nn.Linear or name == "lm_head":
            continue
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        update = (b.float() @ a.float()) * (8 / 4)
        want = nf4.dequantize(nf4.quantize(m.weight.data)).float() + update
        assert torch.equal(merged.get_submodule(name).weight, want), name
        torch.testing.assert_close(dense.get_submodule(name).weight, m.weight.data + update)


# ---- the estimator counts what bitsandbytes holds -------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(64, 64), (576, 1536), (32, 576 * 3)])
def test_estimated_4bit_bytes_are_the_real_bytes(shape, double_quant):
    from lorafit.memory.estimate import four_bit_bytes

    w = nf4.quantize(torch.randn(shape), double_quant=double_quant)
    assert four_bit_bytes(shape[0] * shape[1], double_quant) == nf4.packed_bytes(w)


def test_estimated_8bit_states_are_the_real_bytes():
    from lorafit.memory.estimate import _bnb_state_bytes
    from lorafit.train.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(576, 16, bias=False), torch.nn.Linear(16, 8, bias=False))
    opt = build_optimizer(model, "adamw_8bit", 1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for p in model.parameters():
        real = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t) and t.dim())
        assert _bnb_state_bytes(p.numel()) == real


def test_qlora_estimate_from_a_config(workdir):
    from lorafit.memory.estimate import estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec

    cfg = train_config(workdir, "est", optimizer="adamw_8bit")
    s = settings_from_config(cfg, "cpu")
    assert s.four_bit == "nf4" and s.double_quant and s.lean
    spec = resolve_spec(str(workdir / "model"))
    q, dense = estimate(spec, s), estimate(spec, dense_settings(s))
    assert q.component("weights").bytes < dense.component("weights").bytes


def dense_settings(s):
    from dataclasses import replace

    return replace(s, four_bit=None, optimizer="adamw")


def test_plan_tries_qlora_when_lora_does_not_fit(tmp_path):
    import yaml

    from lorafit.config import TrainConfig
    from lorafit.memory import catalog
    from lorafit.memory.estimate import Settings
    from lorafit.memory.plan import search, to_yaml

    spec = catalog.get_model("llama-3.1-8b")
    plan = search(spec, Settings(seq_len=2048), 12 * 1024**3)
    assert plan.fits and plan.estimate.settings.four_bit == "nf4" and "QLoRA" in plan.note
    written = yaml.safe_load(to_yaml(plan, "./model", 8))
    assert written["adapter"] == "qlora" and written["load_in_4bit"] is True
    TrainConfig.from_dict(written)  # a config lorafit trains
    assert search(spec, Settings(seq_len=2048), 24 * 1024**3).estimate.settings.four_bit is None  # LoRA fits


@pytest.mark.slow
def test_a_gguf_base_is_dequantized_then_quantized_to_nf4():
    from lorafit.models import demo_model_file, load_model, load_model_and_tokenizer

    try:
        gguf = demo_model_file()
    except LorafitError:
        pytest.skip("demo GGUF not installed")
    model, _ = load_model_and_tokenizer(str(gguf), four_bit={"quant_type": "nf4", "double_quant": True})
    dense = load_model(str(gguf))
    layers = four_bit_layers(model)
    assert len(layers) == 30 * 7 and type(model.lm_head) is not type(layers["model.layers.0.mlp.down_proj"])
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        codes, state = bnb_functional.quantize_4bit(dense.get_submodule(name).weight.data, blocksize=64,
                                                    compress_statistics=True, quant_type="nf4")
        assert torch.equal(layers[name].weight.data, codes)
        assert torch.equal(layers[name].weight.quant_state.absmax, state.absmax)


@pytest.mark.slow
def test_qlora_sigkill_then_resume_is_bitwise_identical(workdir, tmp_path):
    """kill -9 after a checkpoint, then ``--resume``: the 8-bit optimizer's states come back from the checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    def cli(*args):
        return subprocess.Popen([sys.executable, "-m", "lorafit.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    common = dict(max_steps=60, save_steps=10, optimizer="adamw_8bit", lora_dropout=0.1)
    files = {}
    for name in ("straight", "killed"):
        cfg = train_config(workdir, f"sigkill-{name}", **common)
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    assert cli("train", str(files["straight"])).wait(timeout=600) == 0
    proc, out = cli("train", str(files["killed"])), workdir / "sigkill-killed"
    deadline = time.time() + 300
    while not (out / "checkpoint-20").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = cli("train", str(files["killed"]), "--resume")
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resumed from" in log, log
    assert_same_adapter_files(workdir / "sigkill-straight", out)
