"""fp16 (axolotl's ``fp16: true``): an fp16 base under fp32 LoRA weights, trained with torch's GradScaler as HF's
Trainer does — the config's rules, a run next to an fp32 one, a skipped overflow step, and an exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_same_adapter_files, learnable_batches, metrics, save_repeat_twice, save_tiny_llama

from lorafit import LorafitError
from lorafit.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The repeat-twice chat data over a 2-layer random Llama with transformers' default initialisation (its
    gradients fit fp16 at the default scale, so a run's losses can be set next to an fp32 run's)."""
    from lorafit.models import load_tokenizer

    d = save_repeat_twice(tmp_path_factory.mktemp("fp16"), copies=2)
    save_tiny_llama(d / "quiet-model", load_tokenizer("demo"))
    return d


def config(workdir, out: str, **kw) -> dict:
    base = dict(base_model=str(workdir / "model"), adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                datasets=[{"path": str(workdir / "data.jsonl"), "type": "chat_template"}], sequence_len=64,
                micro_batch_size=4, max_steps=6, learning_rate=5e-3, lr_scheduler="constant",
                output_dir=str(workdir / out), seed=7, compile_kernels=False, fp16=True)
    base.update(kw)
    return base


# ---- the config ---------------------------------------------------------------------------------------------
def test_fp16_config_loads_and_picks_float16(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "cfg"))
    assert cfg.dtype_for(True) == cfg.dtype_for(False) == "float16"
    assert not cfg.notices
    # bf16: auto yields to fp16 (axolotl's resolve_dtype sets bf16 false when fp16 is set)
    assert TrainConfig.from_dict(config(workdir, "cfg", bf16="auto")).dtype_for(True) == "float16"


def test_fp16_with_bf16_true_trains_bf16_with_a_notice(workdir):
    """axolotl does not refuse both: bf16 wins (resolve_dtype sets fp16 false, the Trainer gets fp16 = fp16
    and not bf16). lorafit does the same and says so in one notice."""
    cfg = TrainConfig.from_dict(config(workdir, "cfg", bf16=True))
    assert cfg.dtype_for(False) == "bfloat16"
    assert [n for n in cfg.notices if n.startswith("fp16")] == [
        "fp16: ignored: bf16 is true, and bf16 wins, as in axolotl (it trains in bf16 then)"]
    # and so nothing fp16 refuses applies: full fine-tuning in bf16 loads
    TrainConfig.from_dict(config(workdir, "cfg", bf16=True, adapter=None))


@pytest.mark.parametrize("change, words", [
    (dict(adapter=None), "fp16 with full fine-tuning is not supported"),
    (dict(lora_modules_to_save=["lm_head"]), "fp16 with lora_modules_to_save is not supported"),
    (dict(fsdp_version=2), "fp16 with FSDP2 is not supported"),
])
def test_fp16_refuses_what_it_cannot_train_in_one_line(workdir, change, words):
    with pytest.raises(LorafitError) as e:
        TrainConfig.from_dict(config(workdir, "cfg", **change))
    assert words in str(e.value) and "\n" not in str(e.value) and "bf16: true" in str(e.value)


def test_fp16_key_is_supported_in_the_key_table():
    from lorafit.config.axolotl_keys import TOP_LEVEL

    status, note = TOP_LEVEL["fp16"]
    assert status == "supported" and "loss scaling" in note


def test_fp16_matmuls_follow_the_bf16_rule_on_a_cpu():
    """The CPU rule copies fp16 operands to fp32 exactly where it copies bf16 ones (fp32 is never copied)."""
    from lorafit.options import RuntimeOptions

    for mode in ("auto", "native", "fp32"):
        for slow in (True, False):
            o = RuntimeOptions(half_matmul=mode, slow_bf16_gemm=slow)
            for rows in (None, 1, 4096):
                assert o.upcasts("float16", "cpu", rows) == o.upcasts("bfloat16", "cpu", rows)
            assert not o.upcasts("float16", "cuda") and not o.upcasts("float32", "cpu")


def test_fp16_config_estimates_two_bytes_and_the_scaler(workdir):
    from dataclasses import replace

    from lorafit.memory.estimate import LOSS_SCALER_BYTES, estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import spec_from_hf_config

    cfg = TrainConfig.from_dict(config(workdir, "cfg"))
    s = settings_from_config(cfg, "cuda")
    assert s.dtype == "float16" and s.bytes == 2
    spec = spec_from_hf_config(json.loads((workdir / "model" / "config.json").read_text()), "tiny")
    fp16, bf16 = estimate(spec, s), estimate(spec, replace(s, dtype="bfloat16"))
    parts = {c.name: c for c in fp16.components}
    assert parts["optimizer states"].bytes == {c.name: c for c in bf16.components}["optimizer states"].bytes \
        + LOSS_SCALER_BYTES
    assert "loss scale" in parts["optimizer states"].formula
    assert parts["weights"].bytes == {c.name: c for c in bf16.components}["weights"].bytes


# ---- training -----------------------------------------------------------------------------------------------
def test_fp16_run_trains_like_fp32_and_logs_the_scale(workdir):
    """A tiny Llama, 6 steps: the base is float16, the adapter fp32; the losses follow an fp32 run's (fp16
    rounding only: the default scale overflows nothing on this model), and metrics.jsonl has the scale."""
    from lorafit.train import train

    quiet = dict(base_model=str(workdir / "quiet-model"))
    half = train(TrainConfig.from_dict(config(workdir, "half", **quiet)))
    train(TrainConfig.from_dict(config(workdir, "full", fp16=False, **quiet)))
    frozen = {p.dtype for p in half.model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in half.model.parameters() if p.requires_grad}
    assert frozen == {torch.float16} and trained == {torch.float32}
    rows = metrics(workdir / "half")
    assert [r["loss_scale"] for r in rows] == [2.0**16] * 6 and not any("skipped_steps" in r for r in rows)
    a, b = [r["loss"] for r in rows], [r["loss"] for r in metrics(workdir / "full")]
    assert a == pytest.approx(b, rel=2e-3) and a[-1] < a[0]
    assert "loss_scale" not in metrics(workdir / "full")[0]
    # merge writes --dtype (else the dtype the base is stored in, here float32): float16 gives the fp16 run's dtype back
    from safetensors import safe_open

    from lorafit.cli import main

    merged = workdir / "half-merged"
    assert main(["merge", str(workdir / "quiet-model"), str(workdir / "half"), str(merged), "--dtype", "float16"]) == 0
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_an_overflowing_step_is_skipped_and_the_next_one_runs():
    """Gradients with an inf: the optimizer does not step (its step count stays 0, same weights), the LR schedule does not
    advance, the scale halves; the next step (finite gradients) updates and advances both."""
    from conftest import options, tiny_causal_lm

    from lorafit.lora import LoraConfig, apply_lora
    from lorafit.patches import apply_lean_kernels
    from lorafit.train import train_step
    from lorafit.train.optim import build_optimizer, build_scheduler
    from lorafit.train.step import loss_scaler

    model = tiny_causal_lm().to(torch.float16)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), options=options(False))
    apply_lean_kernels(model, options=options(False))
    model.train()
    for name, p in model.named_parameters():  # a fresh adapter's B is zero: make A's gradient nonzero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    optimizer = build_optimizer(model, "adamw_torch", lr=1e-3)
    scheduler = build_scheduler(optimizer, "linear", 0, 10)
    scaler = loss_scaler(torch.float16, "cpu")
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    poison = a.register_hook(lambda g: torch.full_like(g, float("inf")))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batches = [{k: v % 100 if k == "input_ids" else v for k, v in b.items()} for b in learnable_batches(2)]
    for b in batches:
        b["labels"] = torch.where(b["labels"] >= 0, b["labels"] % 100, b["labels"])

    row = train_step(model, optimizer, scheduler, [batches[0]], 1.0, scaler=scaler)
    assert row["skipped"] and row["loss_scale"] == 2.0**16 and scaler.get_scale() == 2.0**15
    steps = lambda: {float(st["step"]) for st in optimizer.state_dict()["state"].values()}  # noqa: E731
    assert steps() <= {0.0} and scheduler.last_epoch == 0  # AdamW's state (if made up front) never stepped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step

    poison.remove()
    row = train_step(model, optimizer, scheduler, [batches[1]], 1.0, scaler=scaler)
    assert not row["skipped"] and row["loss_scale"] == 2.0**15 and scaler.get_scale() == 2.0**15
    assert steps() == {1.0} and scheduler.last_epoch == 1
    assert not torch.equal(a, before[next(n for n, p in model.named_parameters() if p is a)])


def test_skipped_steps_show_in_the_metrics_row():
    from lorafit.train.recipe import logged

    window = [{"loss": 1.0, "grad_norm": float("nan"), "tokens_per_s": 1.0, "trained_tokens": 3, "skipped": True,
               "loss_scale": 65536.0},
              {"loss": 1.0, "grad_norm": 1.0, "tokens_per_s": 1.0, "trained_tokens": 3, "skipped": False,
               "loss_scale": 32768.0}]
    row = logged(window)
    assert row["skipped_steps"] == 1 and row["loss_scale"] == 32768.0 and "skipped" not in row
    assert "skipped_steps" not in logged(window[1:])


def test_fp16_resume_after_a_kill_ends_bitwise_equal_with_the_scaler_state(workdir):
    """A run stopped after step 5 whose last checkpoint is step 4 (as if killed between saves; the model's
    large initial weights overflow the first step's scaled gradients, so the scale has moved) resumes from
    checkpoint-4 to the uninterrupted run's adapter, losses and scales, bitwise."""
    from lorafit.train import train

    straight = train(TrainConfig.from_dict(config(workdir, "straight", save_steps=2)))
    rows = metrics(workdir / "straight")
    assert rows[0]["loss_scale"] == 2.0**16 and rows[0]["skipped_steps"] == 1 and rows[1]["loss_scale"] == 2.0**15
    assert straight.steps == 6

    stopped = train(TrainConfig.from_dict(config(workdir, "resumed", save_steps=2)), stop_after=5)
    out = workdir / "resumed"
    assert stopped.interrupted
    shutil.rmtree(out / "checkpoint-5")  # killed after step 5, before its save: the newest checkpoint is step 4
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["scaler"]["scale"] == 2.0**15 and state["scaler"]["_growth_tracker"] == 3
    resumed = train(TrainConfig.from_dict(config(workdir, "resumed", save_steps=2)), resume=True)
    assert resumed.steps == 6 and not resumed.interrupted
    assert_same_adapter_files(workdir / "straight", out)
    again = metrics(out)
    assert [r["step"] for r in again] == list(range(1, 7))
    for key in ("loss", "loss_scale", "lr", "grad_norm"):
        assert [r[key] for r in again] == [r[key] for r in rows], key


@pytest.mark.parametrize("quant", [dict(adapter="qlora", load_in_4bit=True), dict(load_in_8bit=True)],
                         ids=["qlora", "8bit"])
def test_fp16_over_a_quantized_base_computes_in_float16(workdir, quant):
    """QLoRA and LoRA over an 8-bit base under fp16: the quantized layers compute in float16 (the dtype
    transformers' bnb_4bit_compute_dtype takes from an fp16 load in axolotl), the adapter stays fp32, the loss
    falls."""
    from conftest import tiny_quantizable_lm

    from lorafit.kernels import int8, nf4
    from lorafit.models import load_tokenizer
    from lorafit.train import train

    folder = workdir / "quantizable"
    if not folder.is_dir():
        tiny_quantizable_lm(vocab_size=len(load_tokenizer("demo"))).save_pretrained(folder)
        load_tokenizer("demo").save_pretrained(folder)
    r = train(TrainConfig.from_dict(config(workdir, f"q-{'-'.join(quant)}", base_model=str(folder), **quant)))
    layers = [m for m in r.model.modules() if nf4.is_4bit(getattr(m, "weight", None))
              or int8.is_int8(getattr(m, "weight", None))]
    assert layers and {m.compute_dtype for m in layers} == {torch.float16}
    assert {p.dtype for p in r.model.parameters() if p.requires_grad} == {torch.float32}
    losses = [x["loss"] for x in metrics(workdir / f"q-{'-'.join(quant)}")]
    assert all(x == x for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("kinds", [
    dict(peft_use_dora=True),
    dict(lora_target_linear=False, lora_target_modules=["q_proj", "embed_tokens", "lm_head"]),
    dict(lora_target_linear=False, lora_target_modules=["q_proj"], lora_target_parameters=["mlp.down_proj.weight"],
         lora_dropout=0.0),
], ids=["dora", "embedding-and-head", "parameter"])
def test_every_trainable_kind_stays_fp32_under_fp16(workdir, kinds):
    """DoRA's magnitude, LoRA on the embedding and the head, LoRA on a parameter: fp32 master weights over
    the fp16 base, as LoRA A/B are (GradScaler refuses fp16 gradients), and a run of them trains."""
    from lorafit.train import train

    out = f"kinds-{'-'.join(kinds)}"
    r = train(TrainConfig.from_dict(config(workdir, out, base_model=str(workdir / "quiet-model"), max_steps=3,
                                           **kinds)))
    trained = {n: p.dtype for n, p in r.model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained
    assert {p.dtype for p in r.model.parameters() if not p.requires_grad} == {torch.float16}
    assert all(x["loss"] == x["loss"] for x in metrics(workdir / out))


@pytest.mark.slow
def test_fp16_sigkill_then_resume_is_bitwise_identical(workdir, tmp_path):
    """``lorafit train`` killed with SIGKILL after a checkpoint, then ``--resume``: the adapter and every step's
    loss and scale end bitwise equal to an uninterrupted run's (the scaler's state came back from the checkpoint)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    def run(name, *extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config(workdir, f"cli-{name}", max_steps=24, save_steps=4, lora_dropout=0.1,
                                              gradient_accumulation_steps=2, micro_batch_size=2)))
        return subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", str(path), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    assert run("straight").wait(timeout=300) == 0
    proc, out = run("killed"), workdir / "cli-killed"
    deadline = time.time() + 240
    while not (out / "checkpoint-8").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run("killed", "--resume")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumed from" in log, log
    assert_same_adapter_files(workdir / "cli-straight", out)
    a, b = metrics(workdir / "cli-straight"), metrics(out)
    assert [r["step"] for r in b] == list(range(1, 25))
    assert [(r["loss"], r["loss_scale"]) for r in a] == [(r["loss"], r["loss_scale"]) for r in b]
    assert any("skipped_steps" in r for r in a)


def test_bf16_auto_falls_back_to_fp16_on_a_gpu_without_bf16(workdir):
    """axolotl's resolve_dtype: bf16: auto on a GPU without bf16 (T4, V100) trains in fp16 when fp16 is not set;
    lorafit does so where fp16 can train the run, and keeps fp32 on a CPU and where fp16 is refused."""
    auto = TrainConfig.from_dict(config(workdir, "auto", bf16="auto", fp16=False))
    assert auto.dtype_for(False, cuda=True) == "float32"  # fp16: false said so
    unset = {k: v for k, v in config(workdir, "auto", bf16="auto").items() if k != "fp16"}
    cfg = TrainConfig.from_dict(unset)
    assert cfg.dtype_for(False, cuda=True) == "float16"
    assert cfg.dtype_for(False, cuda=False) == "float32" and cfg.dtype_for(True, cuda=True) == "bfloat16"
    full = TrainConfig.from_dict({**unset, "adapter": None})
    assert full.dtype_for(False, cuda=True) == "float32"  # fp16 cannot train the full model
    saved = TrainConfig.from_dict({**unset, "lora_modules_to_save": ["lm_head"]})
    assert saved.dtype_for(False, cuda=True) == "float32"
