"""The estimator per rank (``--nproc N [--fsdp]``): DDP's replica and buckets, FSDP2's shards, and the plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from lorafit import LorafitError
from lorafit.cli import main
from lorafit.config import TrainConfig
from lorafit.memory import catalog
from lorafit.memory.estimate import Settings, estimate
from lorafit.memory.parallel import Tensor, fsdp_share
from lorafit.memory.plan import search, to_yaml
from lorafit.memory.settings import settings_from_config

SHARDED = ("weights", "trainable weights (LoRA A, B)", "gradients", "optimizer states")
SPEC = catalog.get_model("llama-3.1-8b")  # dims divisible by 2, 4, 8: no padding


def test_fsdp2_shards_of_one_rank_equal_the_single_device_estimate():
    s = Settings(dtype="bfloat16", micro_batch=2, seq_len=1024, device="cpu")
    one, fsdp1 = estimate(SPEC, s), estimate(SPEC, replace(s, fsdp=True))
    for name in SHARDED:
        assert fsdp1.component(name).bytes == one.component(name).bytes, name
    assert fsdp1.component("activations").bytes == one.component("activations").bytes


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp2_weights_gradients_and_states_fall_as_one_over_n(n):
    s = Settings(dtype="bfloat16", micro_batch=1, seq_len=512, device="cpu")
    one, per_rank = estimate(SPEC, s), estimate(SPEC, replace(s, nproc=n, fsdp=True))
    for name in SHARDED:
        assert per_rank.component(name).bytes * n == one.component(name).bytes, name
    # activations and logits are the rank's own micro-batch's: never sharded
    assert per_rank.component("activations").bytes == one.component("activations").bytes
    assert per_rank.component("logits/loss").bytes == one.component("logits/loss").bytes
    # what is gathered at the peak: the root (untied head + final norm; the untied embeddings are their own group,
    # gathered only for the lookup) and one or two whole decoder layers (base in bf16 + LoRA A, B in fp32)
    d, i, kv = SPEC.hidden, SPEC.intermediate, SPEC.kv_dim
    root = SPEC.vocab * d * 2 + d * 2
    lora = 16 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + i))  # q, o; k, v; gate, up, down
    layer, emb = SPEC.layer_params() * 2 + lora * 4, SPEC.vocab * d * 2
    expected = {"loss": root + layer, "loss backward": root + 2 * layer, "backward start": root + 2 * layer,
                # FSDP2 keeps each all-gather's buffer until the next group is copied out: root and embeddings twice
                "forward start": max(2 * root + 2 * emb, root + emb + 2 * layer)}
    assert per_rank.component("FSDP2 unsharded (root + layers)").at_peak == expected[per_rank.peak_moment]
    long = estimate(SPEC, replace(s, nproc=n, fsdp=True, seq_len=4096))  # activations outgrow the first gathers
    assert long.peak_moment != "forward start"
    assert per_rank.allocated_peak < one.allocated_peak


def test_fsdp2_qlora_shards_the_4bit_codes_and_absmax_and_gathers_them_per_layer():
    """QLoRA under FSDP2: each rank holds half of the packed codes (½ B an element) and of the 8-bit block absmax;
    the codebook and double quantization's own statistics are buffers every rank keeps whole; a running layer is
    gathered as its codes and absmax whole (not dense), and the dequantized weight stays a backward temporary."""
    s = Settings(method="qlora", dtype="bfloat16", micro_batch=1, seq_len=512, device="cpu")
    one, two = estimate(SPEC, s), estimate(SPEC, replace(s, nproc=2, fsdp=True))
    linears = [i * o for _, i, o, _ in SPEC.linear_layers()]
    kept = SPEC.layers * sum(16 * 4 + 4 * (n // 64 // 256) + 4 + 256 * 4 for n in linears)
    assert two.component("weights").bytes == (one.component("weights").bytes - kept) // 2 + kept
    for name in SHARDED[1:]:
        assert two.component(name).bytes * 2 == one.component(name).bytes, name
    d, i, kv = SPEC.hidden, SPEC.intermediate, SPEC.kv_dim
    lora = 16 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + i))
    linear = sum(linears)
    layer = linear // 2 + linear // 64 + (SPEC.layer_params() - linear) * 2 + lora * 4
    root, emb = SPEC.vocab * d * 2 + d * 2, SPEC.vocab * d * 2
    expected = {"loss": root + layer, "loss backward": root + 2 * layer, "backward start": root + 2 * layer,
                "forward start": max(2 * root + 2 * emb, root + emb + 2 * layer)}
    assert two.component("FSDP2 unsharded (root + layers)").at_peak == expected[two.peak_moment]
    # backward's temporaries (the dequantized weight among them) are one process's; FSDP2 adds the prefetched layer
    gap_one, gap_two = (e.moments["backward start"] - e.moments["loss"] for e in (one, two))
    assert gap_two == gap_one + layer


def test_fsdp2_over_an_8bit_base_shards_the_int8_codes_and_row_scales():
    """LoRA over an 8-bit base under FSDP2: each rank holds half of the int8 codes and fp32 row scales, and a
    running layer is gathered as its codes (1 B an element) and scales (4 B a row), not dense."""
    s = Settings(eight_bit=True, dtype="bfloat16", micro_batch=1, seq_len=512, device="cpu")
    one, two = estimate(SPEC, s), estimate(SPEC, replace(s, nproc=2, fsdp=True))
    for name in SHARDED:
        assert two.component(name).bytes * 2 == one.component(name).bytes, name
    d, i, kv = SPEC.hidden, SPEC.intermediate, SPEC.kv_dim
    lora = 16 * (2 * (d + d) + 2 * (d + kv) + 3 * (d + i))
    shapes = [(i, o) for _, i, o, _ in SPEC.linear_layers()]
    linear = sum(i * o for i, o in shapes)
    layer = linear + 4 * sum(o for _, o in shapes) + (SPEC.layer_params() - linear) * 2 + lora * 4
    gap_one, gap_two = (e.moments["backward start"] - e.moments["loss"] for e in (one, two))
    assert gap_two == gap_one + layer  # the prefetched layer, gathered as int8 codes and scales


def test_padding_rounds_dim0_up_to_a_multiple_of_the_ranks():
    assert Tensor(numel=10 * 3, dim0=10, elt=2).shard(4) == 3 * 3  # rows 10 -> 12, 3 per rank
    share = fsdp_share(catalog.get_model("smollm2-135m"), 7, 2, [{}] * 30, False, [], [], 0)
    assert share.weights * 7 >= catalog.get_model("smollm2-135m").total_params() * 2


def test_ddp_adds_its_gradient_buckets_to_a_whole_replica():
    s = Settings(dtype="bfloat16", micro_batch=1, seq_len=512, device="cpu")
    one, ddp = estimate(SPEC, s), estimate(SPEC, replace(s, nproc=4))
    bucket = one.component("gradients").bytes  # the trainable gradients once more, in flat buckets
    assert ddp.component("DDP gradient buckets").at_peak == bucket
    assert all(ddp.moments[k] - one.moments[k] == bucket for k in one.moments)
    for name in SHARDED:
        assert ddp.component(name).bytes == one.component(name).bytes


def test_fsdp_refuses_what_training_refuses():
    with pytest.raises(LorafitError, match="full fine-tuning over FSDP2 is not supported yet"):
        Settings(method="full", nproc=2, fsdp=True)
    with pytest.raises(LorafitError, match="nproc"):
        Settings(nproc=0)


def test_settings_from_config_reads_axolotl_fsdp_keys(tmp_path):
    for keys in ({"fsdp_version": 2}, {"fsdp": ["full_shard", "auto_wrap"]}, {"fsdp_config": {"reshard_after_forward": True}}):
        cfg = TrainConfig(base_model="demo", datasets=[{"path": "x.jsonl", "type": "alpaca"}], adapter="lora",
                          lora_target_linear=True, **keys)
        s = settings_from_config(cfg, "cuda", nproc=2)
        assert s.fsdp and s.nproc == 2, keys
        assert not settings_from_config(cfg, "cuda").fsdp  # one process is never sharded


def test_cli_estimate_per_rank(capsys, tmp_path):
    assert main(["estimate", "llama-3.1-8b", "--nproc", "2", "--fsdp", "--gpu", "rtx-4090"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "per rank of 2 processes" in out and "FSDP2" in out and "FSDP2 unsharded" in out
    assert main(["estimate", "llama-3.1-8b", "--nproc", "2"]) == 0
    assert "DDP gradient buckets" in capsys.readouterr().out
    assert main(["estimate", "llama-3.1-8b", "--nproc", "2", "--fsdp", "--compare", "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)  # LoRA and QLoRA per rank (full fine-tuning is not sharded yet)
    assert [e["settings"]["four_bit"] for e in compared] == [None, "nf4"]
    assert all(e["settings"]["fsdp"] for e in compared)
    assert main(["estimate", "llama-3.1-8b", "--nproc", "2", "--compare"]) == 0
    capsys.readouterr()
    assert main(["estimate", "llama-3.1-8b", "--fsdp"]) == 2
    assert "--nproc N" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": "llama-3.1-8b", "adapter": "lora", "fsdp_version": 2,
                                   "lora_target_linear": True,
                                   "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}))
    assert main(["estimate", "--config", str(cfg)]) == 2
    assert "give --nproc N" in capsys.readouterr().err
    assert main(["estimate", "--config", str(cfg), "--nproc", "4", "--json"]) == 0
    assert '"fsdp": true' in capsys.readouterr().out


def test_plan_over_several_devices_turns_to_fsdp2_when_a_replica_does_not_fit(tmp_path, capsys):
    spec, gpu = catalog.get_model("llama-3.1-70b"), catalog.gpu_memory("a100-80gb")
    plan = search(spec, Settings(nproc=8), gpu, effective_batch=8)
    assert plan.fits and plan.estimate.settings.fsdp and "FSDP2" in plan.note
    text = to_yaml(plan, "./models/llama-3.1-70b", 8)
    cfg = yaml.safe_load(text)
    assert cfg["fsdp_version"] == 2 and cfg["micro_batch_size"] * cfg["gradient_accumulation_steps"] * 8 == 8
    assert "--nproc 8" in text
    # a model a replica holds stays on DDP
    small = search(catalog.get_model("llama-3.2-1b"), Settings(nproc=2), gpu, effective_batch=8)
    assert small.fits and not small.estimate.settings.fsdp and not small.note
    out = tmp_path / "plan.yaml"
    assert main(["plan", "llama-3.1-70b", "--gpu", "a100-80gb", "--nproc", "8", "-o", str(out)]) == 0
    said = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal width
    assert "one device cannot hold a whole replica" in said and "--nproc 8" in said
    assert yaml.safe_load(out.read_text())["fsdp_version"] == 2
    assert main(["plan", "llama-3.1-70b", "--gpu", "a100-80gb", "--nproc", "3", "-o", str(out), "--force"]) == 2
    assert "not a multiple of --nproc 3" in capsys.readouterr().err


def test_plan_turns_to_qlora_with_fsdp2_when_a_4bit_replica_does_not_fit():
    """Llama 3.1 70B on 2 × 40 GB: LoRA fits neither as DDP nor as FSDP2, nor QLoRA with a whole 4-bit replica
    (about 37 GiB of codes) per device; QLoRA with FSDP2 does, and the config it writes asks for both."""
    plan = search(catalog.get_model("llama-3.1-70b"), Settings(nproc=2), catalog.gpu_memory("a100-40gb"),
                  effective_batch=8)
    assert plan.fits and plan.estimate.settings.four_bit == "nf4" and plan.estimate.settings.fsdp
    assert "QLoRA with FSDP2" in plan.note
    cfg = yaml.safe_load(to_yaml(plan, "./models/llama-3.1-70b", 8))
    assert cfg["adapter"] == "qlora" and cfg["load_in_4bit"] and cfg["fsdp_version"] == 2
    TrainConfig.from_dict({**cfg, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]})  # it validates
