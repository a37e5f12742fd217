"""The benchmarks' shared pieces: every results file's provenance, and peer.py's adapter comparison."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import provenance as prov  # noqa: E402


def test_provenance_records_commit_cpu_threads_versions_and_options():
    from lorafit.options import RuntimeOptions

    p = prov.provenance()
    for key in ("date", "git", "cpu", "threads", "torch", "versions", "runtime_options", "env"):
        assert key in p, key
    assert set(p["git"]) >= {"commit", "dirty"}
    if p["git"]["commit"] is not None:  # a checkout (an sdist has no git)
        assert len(p["git"]["commit"]) == 40 and isinstance(p["git"]["dirty"], bool)
    assert isinstance(p["cpu"]["model"], str)
    flags = p["cpu"]["flags"]
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"):
        assert isinstance(flags[flag], bool), flag
    assert isinstance(p["threads"], int) and p["threads"] >= 1
    for pkg in ("python", "torch", "transformers", "peft", "lorafit"):
        assert pkg in p["versions"], pkg
    assert set(p["env"]) >= {"LORAFIT_COMPILE", "LORAFIT_HALF_MATMUL"}
    ro = p["runtime_options"]
    assert set(ro) >= {"compile", "half_matmul", "slow_bf16_gemm", "describe", "bf16_matmuls_on_fp32_copies"}
    assert ro == {**ro, **RuntimeOptions.resolve().to_dict()}  # the options a run without config keys gets
    json.dumps(p)  # goes into a results file as it is


def test_provenance_records_the_options_in_force(monkeypatch):
    from lorafit.options import RuntimeOptions

    monkeypatch.setenv("LORAFIT_COMPILE", "0")
    monkeypatch.setenv("LORAFIT_HALF_MATMUL", "fp32")
    p = prov.provenance(threads=3)
    assert p["env"]["LORAFIT_COMPILE"] == "0" and p["env"]["LORAFIT_HALF_MATMUL"] == "fp32"
    assert p["runtime_options"]["compile"] is False and p["runtime_options"]["half_matmul"] == "fp32"
    assert p["runtime_options"]["bf16_matmuls_on_fp32_copies"] is True
    assert p["threads"] == 3
    # Explicit options (a run's config) win over the environment, as in training; a stored to_dict() works too.
    given = RuntimeOptions(compile=True, half_matmul="native", slow_bf16_gemm=True)
    for options in (given, given.to_dict()):
        ro = prov.provenance(options)["runtime_options"]
        assert ro["half_matmul"] == "native" and ro["compile"] is True and ro["bf16_matmuls_on_fp32_copies"] is False


def test_provenance_module_imports_no_torch():
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import provenance; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _adapter(seed: int, lr_scale: float = 1.0):
    """A fake trained adapter: initial weights, and an update ``lr_scale`` times a fixed one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        a0, b0 = torch.randn(4, 16, generator=g) * 0.1, torch.zeros(16, 4)
        da, db = torch.randn(4, 16, generator=g) * 1e-3, torch.randn(16, 4, generator=g) * 1e-3
        out |= {f"{m}.A": a0 + lr_scale * da, f"{m}.A.init": a0, f"{m}.B": b0 + lr_scale * db, f"{m}.B.init": b0}
    return out


def test_peer_adapter_comparison_passes_equal_and_fails_a_wrong_update():
    peer = pytest.importorskip("peer")
    same = peer.adapter_diff(_adapter(0), _adapter(0))
    assert same["max_update_rel"] == 0 and same["max_delta_rel"] == 0 and same["same_init"]
    off = peer.adapter_diff(_adapter(0, lr_scale=1.01), _adapter(0))  # every update 1% larger
    assert off["max_update_rel"] == pytest.approx(0.01, rel=1e-3)
    assert off["max_update_rel"] > peer.EXACT_UPDATE_RTOL and off["max_delta_rel"] > peer.EXACT_DELTA_RTOL
    # the final weights alone would hide it (A's start dominates them)
    assert off["max_weight_rel_A"] < 1e-3
    assert "error" in peer.adapter_diff(_adapter(0), {k: v for k, v in _adapter(0).items() if "q_proj" not in k})


# ---- peer.py's workers: lorafit's side is `lorafit train`'s recipe, every side reads the same batches ----------
def _peer_spec(tmp_path, tokenizer, adapter: str, impl: str = "lorafit", seq: int = 16) -> dict:
    import random

    from conftest import save_tiny_llama

    base, data = tmp_path / "base", tmp_path / "data.jsonl"
    if not base.exists():
        save_tiny_llama(base, tokenizer)
        rng = random.Random(0)
        with open(data, "w") as f:
            for _ in range(8):
                f.write(json.dumps({"text": " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "echo"])
                                                     for _ in range(40))}) + "\n")
    return {"config": "t", "impl": impl, "adapter": adapter, "workspace": {"base": str(base), "data": str(data)},
            "planned_steps": 100, "compile_kernels": False, "shape": "tiny", "layers": None, "dtype": "float32",
            "gc": False, "batch": 2, "seq": seq, "r": 4, "alpha": 8, "dropout": 0.0, "seed": 0, "threads": 1,
            "device": "cpu", "warmup": 1, "steps": 2, "memory": True, "profile": False, "floor": False}


@pytest.mark.parametrize("adapter", ["lora", "qlora", "dora"])
def test_peer_worker_writes_a_lorafit_config_and_takes_its_batches(tmp_path, demo_tokenizer, adapter):
    worker = pytest.importorskip("peer_worker")
    from lorafit.config import load_config

    spec = _peer_spec(tmp_path, demo_tokenizer, adapter)
    cfg = load_config(worker.write_config(spec, tmp_path))
    assert (cfg.adapter, cfg.load_in_4bit, cfg.peft_use_dora) == (
        "qlora" if adapter == "qlora" else "lora", adapter == "qlora", adapter == "dora")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm, cfg.lr_scheduler) == (
        4, 8, 1e-4, 0.0, 1.0, "constant")
    assert cfg.lora_target_linear and cfg.datasets[0].type == "completion" and cfg.max_steps == 100
    first, again = worker.pipeline_batches(spec, 4), worker.pipeline_batches(spec, 4)
    assert len(first) == 4 and all(tuple(b["input_ids"].shape) == (2, 16) for b in first)
    assert all(a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"]) for a, b in zip(first, again, strict=True))
    with pytest.raises(SystemExit, match="not 5 full ones"):  # 8 rows make 4 batches of 2
        worker.pipeline_batches(spec, 5)
    with pytest.raises(SystemExit, match="full ones"):  # rows shorter than the sequence length
        worker.pipeline_batches({**spec, "seq": 4096}, 1)


@pytest.mark.slow  # two worker runs with PEFT: ~80 s on a busy 2-core machine
def test_peer_worker_times_the_recipe_and_matches_the_peft_loop(tmp_path, demo_tokenizer):
    """The recipe-timed lorafit run and the PEFT loop, dropout 0, on the same batches: same losses; the timed
    steps and the memory step are where peer.py expects them."""
    worker = pytest.importorskip("peer_worker")
    pytest.importorskip("peft")
    import torch

    threads = torch.get_num_threads()
    try:
        ours = worker.main(_peer_spec(tmp_path, demo_tokenizer, "lora"))
        theirs = worker.main(_peer_spec(tmp_path, demo_tokenizer, "lora", impl="peft-loop"))
    finally:
        torch.set_num_threads(threads)
    for res in (ours, theirs):
        assert len(res["step_s"]) == len(res["step_cpu_s"]) == 2 and res["memory"]["peak"] > 0
        assert len(res["losses"]) == 3  # warm-up and 2 timed steps (not the memory step)
    assert ours["lean_kernels"]["options"]["compile"] is False
    a, b = torch.tensor(ours["losses"]), torch.tensor(theirs["losses"])
    assert ((a - b).abs() / b.abs()).max() < 1e-5, (ours["losses"], theirs["losses"])
    assert ours["rss"]["hwm_reset"] in (True, False) and "timed_hwm_kib" in ours["rss"]
