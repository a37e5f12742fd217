"""torchao's low-bit AdamW (axolotl's ``adamw_torch_8bit`` / ``adamw_torch_4bit``): built as transformers' Trainer
builds it, its block-quantized states counted by the estimator, and kept in checkpoints so a resumed run ends
bitwise equal to a straight one."""

from __future__ import annotations

import json

import pytest
import torch

NAMES = ["adamw_torch_8bit", "adamw_torch_4bit"]


def lora_like_model():
    # a LoRA A (8 × 512, quantized states), a LoRA B (256 × 8: under 4096 elements, plain states), a bias
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 8, bias=False), torch.nn.Linear(8, 256))


# torchao compiles each parameter's update on the first step: ~30 s a case on a small CPU
@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("name", NAMES)
def test_torchao_optimizer_steps_as_transformers_trainer_does(name):
    """Same class and arguments as ``Trainer.get_optimizer_cls_and_kwargs`` for the name, and three steps leave
    bitwise the same weights and states; the estimator counts the bytes the states really hold."""
    from transformers import Trainer, TrainingArguments

    from lorafit.memory.estimate import optimizer_state_bytes
    from lorafit.train.optim import build_optimizer

    ours, theirs = lora_like_model(), lora_like_model()
    opt = build_optimizer(ours, name, 1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    args = TrainingArguments(output_dir="unused", optim=name, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.95,
                             adam_epsilon=1e-6, weight_decay=0.1, report_to=[])
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert type(opt) is cls
    decay = Trainer.get_decay_parameter_names(None, theirs)  # Trainer.create_optimizer's two groups
    named = list(theirs.named_parameters())
    ref = cls([{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
               {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}], **kwargs)
    assert opt.block_size == ref.block_size and opt.bf16_stochastic_round == ref.bf16_stochastic_round
    for _ in range(3):
        for model, o in ((ours, opt), (theirs, ref)):
            model(torch.linspace(-1, 1, 4 * 512).view(4, 512)).square().mean().backward()
            o.step()
            o.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    big = opt.state[ours[0].weight]["exp_avg"]
    assert type(big).__name__ == ("OptimState8bit" if "8bit" in name else "OptimState4bit")
    assert type(opt.state[ours[1].weight]["exp_avg"]) is torch.Tensor
    kind = {"adamw_torch_8bit": "torchao_8bit", "adamw_torch_4bit": "torchao_4bit"}[name]
    for p in ours.parameters():
        real = sum(_bytes(t) for k, t in opt.state[p].items() if k != "step")
        assert optimizer_state_bytes(kind, p.numel()) == real, p.shape


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(8, 512), (256, 8), (16, 1000), (4096,), (64, 576)])
def test_estimated_torchao_states_are_the_buffers_it_makes(name, shape):
    """The estimator's bytes for both moments are those of the buffers torchao creates (no step, no compile)."""
    from lorafit.memory.estimate import optimizer_state_bytes
    from lorafit.train.optim import build_optimizer

    p = torch.nn.Linear(1, 1).weight
    p.data = torch.zeros(shape)
    opt = build_optimizer(torch.nn.ParameterList([p]), name, 1e-3)
    real = sum(_bytes(opt._new_buffer(p, signed)) for signed in (True, False))  # exp_avg, exp_avg_sq
    kind = {"adamw_torch_8bit": "torchao_8bit", "adamw_torch_4bit": "torchao_4bit"}[name]
    assert optimizer_state_bytes(kind, p.numel()) == real


def _bytes(t):
    inner = [getattr(t, n) for n in ("codes", "scale", "qmap") if hasattr(t, n)] or [t]
    return sum(x.numel() * x.element_size() for x in inner)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from conftest import save_tiny_llama

    from lorafit.models import load_tokenizer

    d = tmp_path_factory.mktemp("torchao-train")
    save_tiny_llama(d / "model", load_tokenizer("demo"), hidden_size=512, intermediate_size=1024,
                    num_hidden_layers=1, initializer_range=0.5)
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
    rows = [{"text": f"{w} and {w} make two {w}s"} for w in words * 4]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def train_config(workdir, out: str, **kw):
    from lorafit.config import TrainConfig

    d = dict(base_model=str(workdir / "model"), adapter="lora", lora_r=8, lora_alpha=16, lora_target_linear=True,
             datasets=[{"path": str(workdir / "data.jsonl"), "type": "completion"}], sequence_len=32,
             micro_batch_size=4, max_steps=6, learning_rate=5e-3, lr_scheduler="cosine", warmup_steps=2,
             weight_decay=0.01, output_dir=str(workdir / out), seed=7, compile_kernels=False)
    return TrainConfig.from_dict({**d, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", NAMES)
def test_torchao_run_stopped_and_resumed_equals_a_straight_run(workdir, optimizer):
    """The quantized states are in the checkpoint: stopping after step 3 and resuming ends with bitwise the
    adapter of an uninterrupted run."""
    from conftest import assert_same_adapter_files

    from lorafit.train import train

    train(train_config(workdir, f"straight-{optimizer}", optimizer=optimizer))
    stopped = train(train_config(workdir, f"resumed-{optimizer}", optimizer=optimizer), stop_after=3)
    ckpt = workdir / f"resumed-{optimizer}" / "checkpoint-3"
    assert stopped.interrupted and ckpt.is_dir()
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]["state"].values()
    assert any(type(s["exp_avg"]).__name__.startswith("OptimState") for s in saved)
    resumed = train(train_config(workdir, f"resumed-{optimizer}", optimizer=optimizer), resume=True)
    assert resumed.steps == 6
    a = assert_same_adapter_files(workdir / f"straight-{optimizer}", workdir / f"resumed-{optimizer}")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    rows = [json.loads(x) for x in (workdir / f"straight-{optimizer}" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["lr"], float) for r in rows if "lr" in r)
