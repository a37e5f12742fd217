"""Several processes under torchrun (gloo, 2 processes on CPU): a 2-rank run steps exactly as one process on the
union of the ranks' batches, writes its files from rank 0, resumes, and ends with a failing rank's error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SRC, metrics, run_2_ranks, save_tiny_llama
from safetensors.torch import load_file

from lorafit.config import TrainConfig
from lorafit.models import load_tokenizer
from lorafit.train import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    save_tiny_llama(d / "model", load_tokenizer("demo"), initializer_range=0.5)
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
    rows = [{"messages": [{"role": "user", "content": f"Repeat twice: {w}" + " please" * (i % 5)},
                          {"role": "assistant", "content": f"{w} {w}"}]} for i, w in enumerate(words * 6)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def config(workdir: Path, out: str, **kw) -> dict:
    base = dict(base_model=str(workdir / "model"), adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                datasets=[{"path": str(workdir / "data.jsonl"), "type": "chat_template"}], sequence_len=64,
                micro_batch_size=2, gradient_accumulation_steps=2, max_steps=5, learning_rate=5e-3,
                lr_scheduler="constant", output_dir=str(workdir / out), seed=7, lora_dropout=0.0,
                compile_kernels=False, val_set_size=0.1, eval_steps=5)
    base.update(kw)
    return base


def assert_same_adapter(a: Path, b: Path, rel: float = 1e-5) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7 * 2  # A and B of 7 targets in 2 layers
    for k in wa:
        scale = float(wa[k].abs().max())
        torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=rel * scale, msg=k)


# FSDP2's run is in CI's slow selection: the default suite keeps one torchrun launch of ~30 s
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=[pytest.mark.slow, pytest.mark.ci])])
def test_two_ranks_equal_one_process_on_the_union_batch(workdir, mode, monkeypatch):
    """2 ranks × micro-batch 2 × accumulation 2 = 1 process × micro-batch 4 × accumulation 2: rank r reads
    micro-batches r, r+2, ... of the one-process layout at micro-batch 2, so each step's union is the same 8 rows;
    the loss is normalised by the trained tokens of all ranks, so losses and adapter agree to 1e-5. Ranks run
    every row through the whole stack (no shared-prefix pass under torchrun), so the one process does too: the
    comparison is of the same sums in the same order."""
    extra = {"fsdp_version": 2, "fsdp_config": {"reshard_after_forward": True}} if mode == "fsdp" else {}
    done = run_2_ranks(workdir, config(workdir, f"two-{mode}", save_steps=2, **extra))
    assert done.returncode == 0, done.stdout + done.stderr
    one = train(TrainConfig.from_dict(config(workdir, f"one-{mode}", micro_batch_size=4, shared_prefix=False)))
    two_rows = metrics(workdir / f"two-{mode}")
    losses_1 = [r["loss"] for r in one.history if "loss" in r]
    losses_2 = [r["loss"] for r in two_rows if "loss" in r]
    assert len(losses_1) == len(losses_2) == 5
    assert losses_2 == pytest.approx(losses_1, rel=1e-5)
    tokens_1 = [r["trained_tokens"] for r in one.history if "loss" in r]
    assert [r["trained_tokens"] for r in two_rows if "loss" in r] == tokens_1  # global counts, not rank 0's
    eval_1 = [r["eval_loss"] for r in one.history if "eval_loss" in r]
    assert [r["eval_loss"] for r in two_rows if "eval_loss" in r] == pytest.approx(eval_1, rel=1e-5)
    assert_same_adapter(workdir / f"one-{mode}", workdir / f"two-{mode}")
    out = workdir / f"two-{mode}"
    assert {"adapter_config.json", "loss.png", "lorafit-run.json"} <= {p.name for p in out.iterdir()}
    assert done.stdout.count("done: 5 steps") == 1  # rank 0 reports for the job
    if mode == "ddp":  # a 2-rank checkpoint does not resume in 1 process (another data order); one line says how
        from lorafit.errors import LorafitError

        with pytest.raises(LorafitError, match=r"written by 2 process\(es\), this run has 1; resume with --nproc 2"):
            train(TrainConfig.from_dict(config(workdir, "two-ddp", save_steps=2, max_steps=6)), resume=True)
    if mode == "fsdp":  # the weights really are sharded: rank 0 holds about half of them
        local, whole = (int(x.replace(",", "")) for x in
                        done.stdout.split("rank 0 holds ", 1)[1].split(" parameter")[0].split(" of "))
        assert 0.4 * whole < local < 0.6 * whole


@pytest.mark.parametrize("bits", [4, 8])
def test_shardable_quantized_layers_compute_what_bitsandbytes_layers_compute(bits, one_thread):
    """What FSDP2 shards in place of bitsandbytes' Linear4bit / Linear8bitLt: the same logits and gradients,
    bitwise, through LoRA layers and bare ones (LoRA on q/v only), training and eval; outside forward, where
    FSDP2 leaves a rank only its shard, reading the weight is one line, not a wrong dequantization."""
    import copy

    from conftest import tiny_quantizable_lm

    from lorafit.errors import LorafitError
    from lorafit.kernels import int8, nf4
    from lorafit.lora import LoraConfig, apply_lora
    from lorafit.models import quantize_base, quantize_base_8bit

    module, quantize, shardable = {4: (nf4, quantize_base, nf4.ShardableLinear4bit),
                                   8: (int8, quantize_base_8bit, int8.ShardableLinear8bit)}[bits]
    ours = tiny_quantizable_lm()
    quantize(ours)
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.nn.init.normal_(ours.model.layers[0].self_attn.q_proj.lora_B.weight)  # B ≠ 0: the branch counts
    sharded = copy.deepcopy(ours)
    assert module.make_shardable(sharded) == 14  # 7 linears × 2 layers, LoRA bases and bare ones
    ids = torch.randint(0, 256, (2, 16))
    for m in (ours, sharded):
        m.train()
        m(ids).logits.square().mean().backward()
    trained = {n: p.grad for n, p in sharded.named_parameters() if p.requires_grad}
    assert {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}.keys() == trained.keys()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, trained[name]), name
    with torch.no_grad():
        assert torch.equal(ours.eval()(ids).logits, sharded.eval()(ids).logits)
    layer = sharded.model.layers[0].mlp.down_proj
    assert isinstance(layer, shardable)
    layer.codes = torch.nn.Parameter(_FakeShard(layer.codes), requires_grad=False)
    with pytest.raises(LorafitError, match="holds only its shard of the codes outside forward"):
        _ = layer.weight


class _FakeShard(torch.Tensor):
    """Stands for a DTensor shard (what FSDP2 leaves on a module outside forward): a tensor with ``to_local``."""

    def to_local(self):
        return self


# (bytes of codes of the tiny Llama's 2 layers: q, o 32 × 32; k, v 16 × 32; gate, up, down 64 × 32)
QUANTIZED = {"4bit": (dict(adapter="qlora", load_in_4bit=True), 2 * 9216 // 2),
             "8bit": (dict(load_in_8bit=True), 2 * 9216)}


# one torchrun launch each (~25-30 s): slow, the 4-bit one in CI's selection (the default suite keeps the DDP launch)
@pytest.mark.parametrize("quant", [pytest.param("4bit", marks=[pytest.mark.slow, pytest.mark.ci]),
                                   pytest.param("8bit", marks=pytest.mark.slow)])
def test_fsdp2_over_a_quantized_base_equals_one_process_and_shards_the_codes(workdir, monkeypatch, quant):
    """QLoRA (4-bit) and LoRA over an 8-bit base under FSDP2: the codes and their statistics are sharded
    parameters, all-gathered for each block's forward and again for its backward. 2 ranks step exactly as one
    process over the same quantized base on the union batch (losses, eval loss and adapter to 1e-5, the adapter
    keys PEFT's), and rank 0 holds half of the codes."""
    keys, code_bytes = QUANTIZED[quant]
    # Rows padded to sequence_len: a micro-batch is otherwise as wide as its longest row, which differs between a
    # rank's 2 rows and the one process's 4, and the causal attention kernel's sums run over that width (2.7e-5 in
    # one B matrix after 5 AdamW steps)
    keys = {**keys, "pad_to_sequence_len": True}
    done = run_2_ranks(workdir, config(workdir, f"two-{quant}", fsdp_version=2, save_steps=2,
                                       fsdp_config={"reshard_after_forward": True}, **keys))
    assert done.returncode == 0, done.stdout + done.stderr
    one = train(TrainConfig.from_dict(config(workdir, f"one-{quant}", micro_batch_size=4, shared_prefix=False,
                                             **keys)))
    two_rows = metrics(workdir / f"two-{quant}")
    losses_1 = [r["loss"] for r in one.history if "loss" in r]
    assert [r["loss"] for r in two_rows if "loss" in r] == pytest.approx(losses_1, rel=1e-5)
    assert len(losses_1) == 5 and losses_1[-1] < losses_1[0]
    eval_1 = [r["eval_loss"] for r in one.history if "eval_loss" in r]
    # LLM.int8's inference matmul sends a column through fp16 when any row of the batch has an outlier there: its
    # eval loss depends on how rows are batched (2 ranks batch them otherwise), its training matmul does not
    rel = 1e-5 if quant == "4bit" else 1e-3
    assert [r["eval_loss"] for r in two_rows if "eval_loss" in r] == pytest.approx(eval_1, rel=rel)
    # 8-bit layers run one at a time, GEMM by GEMM at each rank's batch shape: AdamW lifts their rounding to ~2e-5
    # (2 DDP ranks differ from one process as much)
    assert_same_adapter(workdir / f"one-{quant}", workdir / f"two-{quant}", rel=1e-5 if quant == "4bit" else 1e-4)
    assert (workdir / f"two-{quant}" / "checkpoint-4" / "adapter_model.safetensors").exists()
    local, whole = (int(x.replace(",", "")) for x in
                    done.stdout.split("parameter elements (", 1)[1].split(" bytes of quantized codes")[0].split(" of "))
    assert whole == code_bytes and local == whole // 2


# ---- config: what FSDP2 takes, what it refuses ---------------------------------------------------------------
def _cfg(**kw) -> dict:
    return {"base_model": "demo", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "adapter": "lora",
            "lora_target_linear": True, **kw}


@pytest.mark.parametrize("keys", [{"fsdp_version": 2}, {"fsdp": ["full_shard", "auto_wrap"]},
                                  {"fsdp_config": {"reshard_after_forward": False}}])
def test_any_fsdp_key_asks_for_fsdp2(keys):
    assert TrainConfig.from_dict(_cfg(**keys)).fsdp_enabled
    assert TrainConfig.from_dict(_cfg(**keys, adapter="qlora", load_in_4bit=True)).fsdp_enabled  # QLoRA shards too
    assert TrainConfig.from_dict(_cfg(**keys, load_in_8bit=True)).fsdp_enabled  # and an 8-bit base
    assert not TrainConfig.from_dict(_cfg()).fsdp_enabled


@pytest.mark.parametrize("keys, needle", [
    ({"fsdp_version": 1}, "fsdp_version 1: lorafit shards with FSDP2 only"),
    ({"fsdp_version": 2, "adapter": None}, "full fine-tuning with FSDP2 is not supported yet"),
    ({"deepspeed": "zero3.json", "adapter": None}, "full fine-tuning with FSDP2 (deepspeed ZeRO-3 maps to it here) is not supported"),
])
def test_fsdp_refusals_are_one_line(keys, needle):
    from lorafit.errors import LorafitError

    with pytest.raises(LorafitError, match=None) as e:
        TrainConfig.from_dict(_cfg(**keys), source="c.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fsdp_without_torchrun_says_how_to_launch(workdir):
    from lorafit.errors import LorafitError

    with pytest.raises(LorafitError, match="torchrun --nproc-per-node N"):
        train(TrainConfig.from_dict(config(workdir, "fsdp-alone", fsdp_version=2)))


FAILING_RANK = '''
import sys
from lorafit.errors import LorafitError
from lorafit.train import recipe

step = recipe.Recipe.step
def failing(self, group):
    if self.world.rank == 1 and self.state.step == 2:
        raise LorafitError("rank 1 cannot go on")
    return step(self, group)
recipe.Recipe.step = failing
from lorafit.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
'''


@pytest.mark.slow
@pytest.mark.ci
def test_a_failing_rank_ends_the_job_with_its_error(workdir, tmp_path):
    """Rank 1 raises at its third step while rank 0 waits in the step's all-reduce: the job ends at once (no hang
    until a timeout), non-zero, with rank 1's one-line error and rank 0's line saying it stopped for it."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(config(workdir, "failing")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LORAFIT_DIST_TIMEOUT": "300"}  # far beyond the test's own limit: the end must not come from the timeout
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(cfg)], capture_output=True, text=True, env=env, timeout=150)
    assert done.returncode != 0
    assert "lorafit train: error (rank 1): rank 1 cannot go on" in done.stderr
    assert "lorafit train: stopped (rank 0): another process of the job failed" in done.stderr
    assert not (workdir / "failing" / "adapter_model.safetensors").exists()


def mode_keys(mode: str) -> dict:
    """The config keys of a launch mode: DDP, FSDP2, or QLoRA under FSDP2."""
    return {"ddp": {}, "fsdp": {"fsdp_version": 2},
            "qlora-fsdp": {"fsdp_version": 2, "adapter": "qlora", "load_in_4bit": True}}[mode]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "qlora-fsdp"])
def test_two_rank_resume_is_bitwise_identical(workdir, mode):
    """With dropout on (each rank its own masks), a 2-rank run stopped after step 3 (its checkpoint at step 2) and
    resumed to step 6 ends bitwise equal to a straight 6-step 2-rank run: adapter, optimizer, every rank's RNG and
    data position are restored."""
    extra = mode_keys(mode)
    # a schedule that does not depend on max_steps (the first run stops early through --max-steps)
    common = dict(max_steps=6, save_steps=2, lora_dropout=0.1, lr_scheduler="constant_with_warmup", warmup_steps=1,
                  weight_decay=0.01, val_set_size=0, eval_steps=None, **extra)
    straight = run_2_ranks(workdir, config(workdir, f"straight-{mode}", **common))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    cfg = config(workdir, f"resumed-{mode}", **common)
    first = run_2_ranks(workdir, cfg, "--max-steps", "3")
    assert first.returncode == 0, first.stdout + first.stderr
    ckpt = workdir / f"resumed-{mode}" / "checkpoint-2"
    assert len(torch.load(ckpt / "trainer_state.pt", weights_only=True)["rng_ranks"]) == 2
    again = run_2_ranks(workdir, cfg, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout
    a = load_file(workdir / f"straight-{mode}" / "adapter_model.safetensors")
    b = load_file(workdir / f"resumed-{mode}" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in metrics(workdir / f"resumed-{mode}")] == [r["loss"] for r in metrics(workdir / f"straight-{mode}")]


def test_one_process_trains_on_the_gpu_when_there_is_one(monkeypatch):
    """Outside torchrun the world is one process on CUDA when it is available, else the CPU; wrap moves the model
    there (checked with a recording ``to``, as this machine may have no GPU)."""
    import torch

    from lorafit.train import distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.init_world().device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    world = distributed.init_world()
    assert world.device == torch.device("cuda", 0) and not world.distributed
    moved = []
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(model, "to", lambda device: moved.append(device) or model)
    distributed.wrap(model, world)
    assert moved == [world.device]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "qlora-fsdp"])
def test_kill_9_of_the_whole_job_then_resume_is_bitwise_identical(workdir, mode):
    """The whole 2-rank job (launcher, torchrun and both ranks) killed with SIGKILL as soon as a checkpoint past a
    random step exists, then ``--resume``: the adapter and every step's loss end bitwise equal to an uninterrupted
    2-rank run (CPU, fp32, DDP, FSDP2 and QLoRA under FSDP2, dropout on)."""
    import random
    import signal
    import time

    kill_after = random.Random().choice([2, 4, 6])  # the checkpoint to wait for; printed if the test fails
    common = dict(max_steps=10, save_steps=2, lora_dropout=0.1, val_set_size=0, eval_steps=None, **mode_keys(mode))
    straight = run_2_ranks(workdir, config(workdir, f"straight-kill-{mode}", **common))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    cfg = config(workdir, f"killed-{mode}", **common)
    path = workdir / f"killed-{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LORAFIT_DIST_TIMEOUT": "60"}
    job = subprocess.Popen([sys.executable, "-m", "lorafit.cli", "train", str(path), "--nproc", "2"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    out, deadline = workdir / f"killed-{mode}", time.monotonic() + 240
    try:
        while not (out / f"checkpoint-{kill_after}").exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # launcher, torchrun and every rank at once, wherever they are
        job.wait()
    assert job.returncode == -signal.SIGKILL, f"the job ended before the kill (kill_after={kill_after})"
    assert not (out / "adapter_model.safetensors").exists(), f"the job finished first (kill_after={kill_after})"
    again = run_2_ranks(workdir, cfg, "--resume")
    assert again.returncode == 0, f"kill_after={kill_after}\n" + again.stdout + again.stderr
    assert "resumed from" in again.stdout
    a = load_file(workdir / f"straight-kill-{mode}" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} (kill_after={kill_after})"
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(workdir / f"straight-kill-{mode}")]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_measure_under_torchrun_reports_every_rank_near_the_estimate(workdir, tmp_path, fsdp):
    """``torchrun -m lorafit measure``: each rank measures its own peak (MemTracker), rank 0 prints them all beside
    the estimate per rank, within ±5%."""
    cfg = config(workdir, "measured", **({"fsdp_version": 2} if fsdp else {}))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                           "lorafit", "measure", str(path), "--steps", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert [m["rank"] for m in report["measured"]] == [0, 1]
    assert report["estimate"]["settings"]["nproc"] == 2 and report["estimate"]["settings"]["fsdp"] == fsdp
    assert all(abs(e) <= 5 for e in report["error_pct"]), report["error_pct"]


@pytest.mark.slow
def test_a_deepspeed_zero3_config_trains_under_fsdp2_and_in_one_process(workdir):
    """axolotl's deepspeed key: ZeRO-3 maps onto FSDP2 under torchrun, and one process trains on its device."""
    cfg = config(workdir, "zero3-two", deepspeed="deepspeed_configs/zero3_bf16.json", max_steps=2)
    done = run_2_ranks(workdir, cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FSDP2" in done.stdout and "deepspeed: ZeRO-3" in done.stdout
    one = train(TrainConfig.from_dict(config(workdir, "zero3-one", deepspeed="zero3.json", max_steps=2)))
    assert one.steps == 2
