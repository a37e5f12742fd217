"""End-to-end training on a tiny random Llama (with the demo tokenizer): loss, files, accumulation, resume."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_same_adapter_files, save_repeat_twice
from transformers import LlamaForCausalLM

from lorafit import LorafitError
from lorafit.cli import main
from lorafit.config import TrainConfig, load_config
from lorafit.data import batches
from lorafit.lora import load_adapter, lora_layers, named_lora_layers
from lorafit.models import load_tokenizer
from lorafit.train import prepare_model, train, train_step
from lorafit.train.loss import causal_lm_loss


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return save_repeat_twice(tmp_path_factory.mktemp("train"), copies=6)


def config(workdir: Path, out: str, **kw) -> dict:
    base = dict(base_model=str(workdir / "model"), adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                datasets=[{"path": str(workdir / "data.jsonl"), "type": "chat_template"}], sequence_len=64,
                micro_batch_size=4, gradient_accumulation_steps=1, max_steps=30, learning_rate=5e-3,
                lr_scheduler="constant", output_dir=str(workdir / out), seed=7)
    base.update(kw)
    return base


@pytest.mark.parametrize("strategy, evals", [("no", []), ("steps", [2, 4]), (None, [2, 4])])
def test_eval_strategy_no_skips_every_evaluation(workdir, strategy, evals):
    """axolotl's eval_strategy: "no" evaluates neither during training nor at its end (the split stays for
    `lorafit eval`); "steps" is eval_steps' schedule, as with no strategy at all."""
    cfg = TrainConfig.from_dict(config(workdir, f"evals-{strategy}", val_set_size=0.1, eval_steps=2, max_steps=4,
                                       eval_strategy=strategy))
    result = train(cfg)
    assert [r["step"] for r in result.history if "eval_loss" in r] == evals
    assert (result.eval_loss is None) == (not evals)


def test_eval_strategy_epoch_alone_evaluates_at_each_epoch_end(workdir):
    """eval_strategy: epoch with neither eval_steps nor evals_per_epoch: HF's Trainer evaluates after every
    epoch, and so does lorafit."""
    # compile_kernels off: a run of num_epochs plans no token count, so "auto" would compile (13 graphs cold)
    cfg = TrainConfig.from_dict(config(workdir, "evals-epoch", val_set_size=0.1, max_steps=None, num_epochs=2,
                                       eval_strategy="epoch", compile_kernels=False))
    result = train(cfg)
    per_epoch = result.steps // 2
    assert result.steps == 2 * per_epoch > 2
    assert [r["step"] for r in result.history if "eval_loss" in r] == [per_epoch, 2 * per_epoch]


def test_training_lowers_loss_and_saves_a_reloadable_adapter(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "run1", val_set_size=0.1, eval_steps=10, learning_rate=3e-2))
    result = train(cfg)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    out = workdir / "run1"
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"} <= {p.name for p in out.iterdir()}
    assert any("eval_loss" in r for r in result.history)
    # the saved adapter on a fresh base gives the trained model's logits
    trained, tok = result.model.eval(), load_tokenizer("demo")
    fresh = LlamaForCausalLM.from_pretrained(workdir / "model")
    load_adapter(fresh, out)
    ids = torch.tensor([tok("Repeat twice: fig").input_ids])
    # the trained model runs the lean kernels, the fresh one the plain path: other summation orders, so the
    # bound is relative to the logits' scale (1 thread vs 2 moves the worst element by ~3e-5 at scale ~10)
    want = fresh(ids).logits
    torch.testing.assert_close(trained(ids).logits, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    base = LlamaForCausalLM.from_pretrained(workdir / "model")
    assert not torch.allclose(base(ids).logits, fresh(ids).logits)


def test_full_finetuning_lowers_loss_and_changes_every_weight(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "full", adapter=None, max_steps=12, learning_rate=1e-3))
    result = train(cfg)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert result.steps == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    before = LlamaForCausalLM.from_pretrained(workdir / "model").state_dict()
    saved = LlamaForCausalLM.from_pretrained(workdir / "full" / "model").state_dict()
    moved = [k for k in before if not torch.equal(before[k], saved[k])]
    assert set(moved) == {k for k in before if "rotary" not in k}  # every parameter trained and saved


def test_rank_and_alpha_patterns_reach_the_layers_and_the_estimate(workdir):
    from lorafit.memory.estimate import estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec

    cfg = TrainConfig.from_dict(config(workdir, "pattern", lora_rank_pattern={"q_proj": 8},
                                       lora_alpha_pattern={"v_proj": 2}))
    model, _ = prepare_model(cfg)
    ranks = {name.rsplit(".", 1)[-1]: (layer.r, layer.scaling) for name, layer in named_lora_layers(model)}
    assert ranks["q_proj"] == (8, 8 / 8) and ranks["v_proj"] == (4, 2 / 4) and ranks["k_proj"] == (4, 8 / 4)
    spec = resolve_spec(cfg.base_model_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate(spec, settings_from_config(cfg, "cpu"))
    assert est.component("trainable weights (LoRA A, B)").bytes == 4 * trainable  # fp32


def test_logging_steps_averages_the_window(workdir):
    every = train(TrainConfig.from_dict(config(workdir, "log1", max_steps=5, compile_kernels=False)))
    sparse = train(TrainConfig.from_dict(config(workdir, "log2", max_steps=5, logging_steps=2, compile_kernels=False)))
    assert [r["step"] for r in sparse.history] == [2, 4, 5]
    losses = [r["loss"] for r in every.history]
    assert sparse.history[0]["loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    assert sparse.history[2]["loss"] == pytest.approx(losses[4], rel=1e-6) and "logged_steps" not in sparse.history[2]


def test_accumulating_4x1_equals_one_batch_of_4(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "acc", lora_dropout=0.0))
    model, tok = prepare_model(cfg)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    from lorafit.data import build_datasets

    samples, _, _ = build_datasets(cfg, tok)
    samples = sorted(samples[:4], key=len)  # different lengths: padding and per-batch token counts differ
    one = batches(samples, micro_batch_size=4, sequence_len=64, pad_id=tok.pad_token_id, packing=False, shuffle=False, seed=0, epoch=0)
    four = batches(samples, micro_batch_size=1, sequence_len=64, pad_id=tok.pad_token_id, packing=False, shuffle=False, seed=0, epoch=0)
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    results = []
    for group in (one, four):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        row = train_step(m, opt, sched, group, max_grad_norm=0.0)
        results.append((row["loss"], [p.detach().clone() for p in m.parameters() if p.requires_grad]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    # The updates agree up to fp32 summation order, which differs between a 4-row and a 1-row matmul and
    # between CPUs (vector width); weighting micro-batches wrongly would move them by percents, not 1e-5.
    for p0, a, b in zip(start, results[0][1], results[1][1], strict=True):
        scale = float((a - p0).abs().max())
        torch.testing.assert_close(a - p0, b - p0, atol=1e-5 * scale, rtol=1e-4)
    # and it is the token-weighted mean, not the mean of per-batch means
    sums = [causal_lm_loss(model, {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"]) for b in four]
    token_mean = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)
    assert results[1][0] == pytest.approx(token_mean, rel=1e-6)


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "lorafit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_then_resume_is_bitwise_identical(workdir, tmp_path):
    common = dict(max_steps=50, save_steps=5, lora_dropout=0.1, gradient_accumulation_steps=2, micro_batch_size=2,
                  lr_scheduler="cosine", warmup_steps=5, weight_decay=0.01)
    straight = tmp_path / "straight.yaml"
    straight.write_text(yaml.safe_dump(config(workdir, "straight", **common)))
    killed = tmp_path / "killed.yaml"
    killed.write_text(yaml.safe_dump(config(workdir, "killed", **common)))
    train(load_config(straight))  # in this process: only the killed run needs one of its own

    same_threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # as the run in this process
    proc = _run_cli(["train", str(killed)], env=same_threads)
    out = workdir / "killed"
    deadline = time.time() + 240
    while not (out / "checkpoint-15").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists()
    resumed = _run_cli(["train", str(killed), "--resume"], env=same_threads)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert "resumed from" in log
    assert not list(out.glob(".tmp-*")), "a temporary checkpoint folder of the killed run was left behind"
    assert_same_adapter_files(workdir / "straight", out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[: len(steps)] == sorted(steps) and steps[-1] == 50


def test_stop_saves_a_checkpoint_and_resume_continues(workdir):
    d = config(workdir, "stopped", max_steps=12)
    r = train(TrainConfig.from_dict(d), stop_after=5)
    assert r.interrupted and (workdir / "stopped" / "checkpoint-5" / "state.json").is_file()
    meta = json.loads((workdir / "stopped" / "checkpoint-5" / "state.json").read_text())
    run = json.loads((workdir / "stopped" / "lorafit-run.json").read_text())
    assert meta["fingerprint"] == run["fingerprint"] and meta["fingerprint"]["lora_r"] == 4
    assert len(meta["fingerprint"]["datasets"][0]["data_sha256"]) == 64 and "max_steps" not in meta["fingerprint"]
    r2 = train(TrainConfig.from_dict(d), resume=True)
    assert not r2.interrupted and r2.steps == 12


def test_nan_loss_stops_with_a_clear_message(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "nan", max_steps=50, learning_rate=1e30, lr_scheduler="constant"))
    with pytest.raises(LorafitError, match="loss became"):
        train(cfg)
    assert not (workdir / "nan" / "adapter_model.safetensors").exists()


def test_cli_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: demo\nadapter: lora\nlora_rr: 8\ndatasets: [{path: x.jsonl, type: alpaca}]\n")
    proc = _run_cli(["train", str(bad)])
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) == 1 and "lora_rr" in lines[0] and "lora_r" in lines[0], log


def test_bad_output_dir_and_max_steps_fail_at_once_in_one_line(workdir, tmp_path, capsys):
    """An output_dir that is a file fails before anything loads (a base model that does not exist is never
    reached); --max-steps below 1 is refused instead of writing an untrained adapter or running an epoch."""
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    with pytest.raises(LorafitError, match="output_dir .*taken: is a file"):
        train(TrainConfig.from_dict(config(workdir, "unused", base_model=str(tmp_path / "no-model"),
                                           output_dir=str(blocker))))
    assert blocker.read_text() == "mine"
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump(config(workdir, "never")))
    proc = _run_cli(["train", str(cfg), "--max-steps", "-1"])  # all a user sees, imports' warnings included
    log, _ = proc.communicate(timeout=120)
    lines = [line for line in log.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--max-steps" in lines[0], log
    capsys.readouterr()
    assert main(["train", str(cfg), "--max-steps", "0"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-steps" in lines[0]
    assert not (workdir / "never").exists()


@pytest.mark.parametrize("keys, words", [
    ({"micro_batch_size": "auto", "gradient_accumulation_steps": "auto"}, "set batch_size"),
    ({"micro_batch_size": "auto", "batch_size": 8, "gradient_accumulation_steps": 2}, "leave gradient_accumulation"),
    ({"micro_batch_size": 3, "gradient_accumulation_steps": "auto", "batch_size": 8}, "not a multiple"),
    ({"micro_batch_size": 2, "gradient_accumulation_steps": 2, "batch_size": 8}, "set two of the three"),
    ({"micro_batch_size": True}, "true/false"),
])
def test_batch_size_keys_are_checked(workdir, keys, words):
    with pytest.raises(LorafitError, match=words):
        TrainConfig.from_dict(config(workdir, "x", **keys))


def test_auto_micro_batch_picks_the_largest_that_fits(workdir):
    from lorafit.memory.estimate import estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec
    from lorafit.train.auto_batch import MARGIN, resolve_auto_batch

    def peak(micro):
        cfg = TrainConfig.from_dict(config(workdir, "x", micro_batch_size=micro, gradient_accumulation_steps=1))
        return estimate(resolve_spec(cfg.base_model_path), settings_from_config(cfg, "cpu")).total

    between = int((peak(2) + peak(4)) / 2 / (1 - MARGIN))  # room for 2 samples, not for 4
    for budget, micro in ((10 * 2**30, 8), (between, 2)):
        cfg = TrainConfig.from_dict(config(workdir, "x", micro_batch_size="auto", batch_size=8, max_memory=budget,
                                           gradient_accumulation_steps="auto"))
        note = resolve_auto_batch(cfg, "float32")
        assert (cfg.micro_batch_size, cfg.gradient_accumulation_steps) == (micro, 8 // micro), note
        assert f"{micro} × {8 // micro}" in note
    cfg = TrainConfig.from_dict(config(workdir, "x", micro_batch_size="auto", batch_size=8, max_memory=1000,
                                           gradient_accumulation_steps="auto"))
    with pytest.raises(LorafitError, match=r"even 1 sample\(s\) need"):
        resolve_auto_batch(cfg, "float32")
    cfg = TrainConfig.from_dict(config(workdir, "x", micro_batch_size=2, gradient_accumulation_steps="auto",
                                       batch_size=8))
    assert resolve_auto_batch(cfg, "float32") is None and cfg.gradient_accumulation_steps == 4
    result = train(TrainConfig.from_dict(config(workdir, "auto", micro_batch_size="auto", batch_size=4, max_steps=2,
                                                gradient_accumulation_steps="auto", compile_kernels=False)))
    assert result.steps == 2


def test_kernels_compile_a_bounded_number_of_times_whatever_the_lengths(workdir, caplog):
    """Batches of ever new sequence lengths: after the first steps (grad / no-grad inputs, groups of 2 and 3
    layers) nothing compiles again — shapes are dynamic, so a new length reuses the kernels."""
    rows = [{"messages": [{"role": "user", "content": "Repeat: " + " ".join(["fig"] * n)},
                          {"role": "assistant", "content": "ok"}]} for n in range(1, 25)]
    data = workdir / "lengths.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict(config(workdir, "lengths", datasets=[{"path": str(data), "type": "chat_template"}],
                                       micro_batch_size=2, max_steps=12, lora_dropout=0.1, compile_kernels=True))
    caplog.set_level("DEBUG", logger="lorafit.train.recipe")
    result = train(cfg)  # 24 prompts of 1..24 words in 12 shuffled pairs: most steps bring a new padded length
    compile_steps = [int(r.message.split()[1].rstrip(":")) for r in caplog.records if "compiled so far" in r.message]
    assert not compile_steps or max(compile_steps) <= 3, compile_steps  # new lengths (steps 4-12) compile nothing
    assert result.compiles == 0 or result.compile_s > 0


def test_loraplus_groups_are_pefts_create_loraplus_optimizer(workdir):
    """loraplus_lr_ratio / loraplus_lr_embedding: the same parameters in the same learning-rate groups as PEFT's
    create_loraplus_optimizer (what axolotl calls), no weight decay, and a run trains with them."""
    import peft
    from conftest import tiny_causal_lm
    from peft.optimizers import create_loraplus_optimizer

    from lorafit.lora import LoraConfig, apply_lora
    from lorafit.train.optim import build_optimizer

    targets = ["q_proj", "v_proj", "embed_tokens"]
    ours = apply_lora(tiny_causal_lm(), LoraConfig(r=4, alpha=8, target_modules=targets, bias="all"))
    theirs = peft.get_peft_model(tiny_causal_lm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   bias="all"))
    opt = build_optimizer(ours, "adamw_torch", 1e-3, weight_decay=0.1, loraplus=(16.0, 1e-5))
    ref = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                    loraplus_lr_embedding=1e-5)

    def by_lr(optimizer, named):
        name = {id(p): n.replace(".default", "").removeprefix("base_model.model.") for n, p in named}
        return {g["lr"]: (g["weight_decay"], sorted(name[id(p)] for p in g["params"]))
                for g in optimizer.param_groups if g["params"]}

    want = by_lr(ref, theirs.named_parameters())
    assert by_lr(opt, ours.named_parameters()) == want
    assert set(want) == {1e-3, 1e-5, 1.6e-2}
    cfg = TrainConfig.from_dict(config(workdir, "loraplus", max_steps=2, loraplus_lr_ratio=16, weight_decay=0.1))
    assert any("not applied under LoRA+" in n for n in cfg.notices)
    assert train(cfg).steps == 2
