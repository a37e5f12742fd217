"""``gradient_checkpointing: offload`` (axolotl's): checkpointing with every layer's saved input in host memory,
through transformers' ``activation_checkpointing_enable(offload=True)`` (torch's ``save_on_cpu``)."""

from __future__ import annotations

import copy

import pytest
import torch

from lorafit.config import TrainConfig
from lorafit.errors import LorafitError

BASE = {"base_model": "demo", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "adapter": "lora",
        "lora_target_linear": True}


def test_offload_is_accepted_and_offload_disk_is_one_line():
    cfg = TrainConfig.from_dict({**BASE, "gradient_checkpointing": "offload"})
    assert cfg.gradient_checkpointing == "offload"
    assert any(n.startswith("gradient_checkpointing offload:") for n in cfg.notices)
    with pytest.raises(LorafitError, match="gradient_checkpointing.*disk is not supported; use offload"):
        TrainConfig.from_dict({**BASE, "gradient_checkpointing": "offload_disk"})


def test_offloaded_checkpoints_save_layer_inputs_through_save_on_cpu_and_give_the_same_gradients(monkeypatch):
    import transformers.modeling_utils as mu
    from conftest import options, tiny_causal_lm

    from lorafit.lora import LoraConfig
    from lorafit.train.setup import make_trainable

    packed = []

    class Recording(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "pin_memory": False})  # no pinned memory without CUDA
            pack = self.pack_hook

            def record(t):
                packed.append(tuple(t.shape))
                return pack(t)

            self.pack_hook = record

    monkeypatch.setattr(mu, "save_on_cpu", Recording)
    monkeypatch.setattr("lorafit.train.setup.has_accelerator", lambda: True)  # take the GPU path on this CPU
    base = tiny_causal_lm()
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    grads = {}
    for mode in (True, "offload"):
        torch.manual_seed(0)  # the same LoRA A both times
        model = make_trainable(copy.deepcopy(base), lora, mode, options(compile_=False))
        ids = torch.arange(24).view(2, 12) % 100
        model(input_ids=ids, labels=ids).loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads["offload"].keys() and len(grads[True]) > 0
    assert all(torch.equal(grads[True][n], grads["offload"][n]) for n in grads[True])
    # each of the 2 decoder layers' input (batch × tokens × hidden) went through save_on_cpu's pack hook
    assert packed.count((2, 12, 32)) >= 2


def test_the_estimator_keeps_offloaded_layer_inputs_off_the_gpu():
    from dataclasses import replace

    from lorafit.memory import catalog
    from lorafit.memory.estimate import Settings, estimate

    spec = catalog.get_model("llama-3.1-8b")
    plain = Settings(seq_len=4096, gradient_checkpointing=True)
    offload = replace(plain, offload_checkpoints=True)
    gpu_plain = estimate(spec, plain).component("activations").bytes
    gpu_offload = estimate(spec, offload).component("activations").bytes
    inputs = spec.layers * 4096 * spec.hidden * 2  # bf16 layer inputs
    assert gpu_plain - gpu_offload == inputs - 4096 * spec.hidden * 2  # all but the one being recomputed
    on_cpu = replace(plain, device="cpu")
    assert estimate(spec, replace(on_cpu, offload_checkpoints=True)).component("activations").bytes == \
        estimate(spec, on_cpu).component("activations").bytes  # host memory is the CPU's memory


def test_offload_without_an_accelerator_is_plain_checkpointing():
    from conftest import options, tiny_causal_lm

    from lorafit.lora import LoraConfig
    from lorafit.train.setup import has_accelerator, make_trainable

    if has_accelerator():
        pytest.skip("this machine has an accelerator")
    model = make_trainable(tiny_causal_lm(), LoraConfig(r=4, alpha=8, target_modules="all-linear"), "offload",
                           options(compile_=False))
    assert model.model.layers[0].gradient_checkpointing
    ids = torch.arange(24).view(2, 12) % 100
    model(input_ids=ids, labels=ids).loss.backward()  # no pinned-memory error on a CPU-only machine
