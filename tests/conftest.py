"""Shared fixtures: the demo model's real tokenizer (loaded once per session), tiny models, lean-kernel switches."""

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs ``-n auto``) each worker gets its share of the cores, so N workers
    with torch's default of one thread per core do not oversubscribe the machine; CLI subprocesses inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        import torch  # a plugin may have imported it before the variable was set

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The tests that compile lean kernels (torch.compile), by file or by test. They run together on one xdist worker,
# first: a kernel graph is compiled once per process, so spread over two workers most graphs were compiled twice.
# With empty caches a suite spent about 400 s of its 720–780 s of test time compiling some 100 graphs, about half
# of them a second time in the other worker.
COMPILING = (
    "tests/test_lean_kernels.py::", "tests/test_gated_mlp.py::", "tests/test_group.py::",
    "tests/test_memory.py::test_measured_rows_within_10_percent[", "tests/test_memory.py::test_saved_tensors_match_the_model[",
    "tests/test_train.py::test_kernels_compile_a_bounded_number_of_times_whatever_the_lengths",
    "tests/test_lora.py::test_dropout_backward_matches_autograd_reference[",
    "tests/test_lora.py::test_dropout_mask_rate_independence_and_kernels_agree[",
    "tests/test_int8.py::test_lora_branch_gradients_with_dropout_match_autograd",
    "tests/test_patches.py::test_restore_brings_back_transformers_computation[",
)
COMPILING_UNIT = "compiling tests"


def compiles(nodeid: str) -> bool:
    return nodeid.startswith(COMPILING)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest -p no:xdist runs without it
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (pyproject's addopts), but the compiling tests are one unit of work, handed out
    first: the other tests of a file stay on one worker (its module fixtures are made there, and once more
    where its compiling tests run), and all compiling tests share one worker."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LoadFileCompilingTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return COMPILING_UNIT if compiles(nodeid) else nodeid.split("::", 1)[0]

        def _assign_work_unit(self, node) -> None:
            if COMPILING_UNIT in self.workqueue:  # the largest unit by time, so it goes first
                self.workqueue.move_to_end(COMPILING_UNIT, last=False)
            super()._assign_work_unit(node)

    return LoadFileCompilingTogether(config, log)


@pytest.fixture(scope="session", autouse=True)
def _recompile_limit():
    """One process runs every compiling test, so a kernel meets more dtypes and gradient patterns than in any run;
    past torch's recompile limit (8 a function) dynamo would quietly run it eager, and a compiled-vs-eager test
    would compare eager with eager. (A fixture, not pytest_configure: xdist's controller runs no test and need
    not import torch.)"""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


SWITCHES = ("shared_inputs", "swiglu", "rms_norm", "rope", "attention")


def options(compile_=True, half_matmul="auto"):
    """Runtime options for a test (``compile_`` may be the strings "1"/"0" of a parametrization)."""
    from lorafit.options import RuntimeOptions

    return RuntimeOptions.resolve(compile_ in (True, "1"), half_matmul)


def rope_users(module: str = "transformers.models.llama.modeling_llama") -> int:
    """How many live patched models use the RoPE dispatcher of ``module`` (it goes when this drops to 0)."""
    from lorafit.patches import rotary

    return rotary._INSTALLED.get(module, [None, None, 0])[2]


def lean_kernels(model, compile_=True, half_matmul="auto", **only):
    """``apply_lean_kernels`` with only the switches named in ``only`` on; returns the handle."""
    from lorafit.patches import apply_lean_kernels

    switches = {name: bool(only.get(name, False)) for name in SWITCHES}
    return apply_lean_kernels(model, options=options(compile_, half_matmul), **switches)


@pytest.fixture(autouse=True)
def _eval_cache(tmp_path_factory, monkeypatch):
    """``lorafit eval``'s stored base columns go to a temporary folder, never the user's cache."""
    import lorafit.eval.cache as cache

    folder = tmp_path_factory.mktemp("eval-cache")
    monkeypatch.setattr(cache, "cache_dir", lambda: folder)


@pytest.fixture(scope="session")
def demo_tokenizer():
    from lorafit.models import load_tokenizer

    return load_tokenizer("demo")


def save_tiny_llama(folder, tokenizer, **config):
    """A 2-layer random Llama with the demo tokenizer's vocabulary, saved as a HF folder; returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(tokenizer))
    model = LlamaForCausalLM(LlamaConfig(**{**kw, **config}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def tiny_causal_lm(arch: str = "llama"):
    """A 2-layer random Llama, Qwen2 or Gemma (hidden 32, intermediate 64, vocab 100), seeded."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
              vocab_size=100)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[arch](**kw)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): its models are
    tiny, and on a busy 2-core machine two threads spin against other processes (the same tests took 80 s
    instead of 1 s). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_quantizable_lm(arch: str = "llama", **over):
    """A 2-layer random Llama or Qwen2 whose linear layers bitsandbytes quantizes (hidden 64, one 64-block per
    row), untied head, fp32, sdpa, seeded; ``over``: config overrides."""
    import torch
    import transformers

    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, use_cache=False)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config(**{**kw, **over}), dtype=torch.float32,
                                                         attn_implementation="sdpa")


def saved_by_loss(model, batch, options):
    """``(loss, trained tokens, bytes)`` of one forward + chunked loss of ``batch``: the bytes autograd saves for
    backward, each storage once, weights (saved by reference) not counted."""
    import torch

    from lorafit.data import model_inputs
    from lorafit.train.loss import causal_lm_loss

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:  # weights are saved by reference: no memory of their own
            saved[st.data_ptr()] = st.nbytes()  # one storage saved by several layers counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = causal_lm_loss(model, model_inputs(batch), batch["labels"], options=options)
    return loss, n, sum(saved.values())


def saved_bytes(model, ids):
    """``model(ids).logits`` and the bytes autograd saved for backward during that forward (each saved tensor)."""
    import torch

    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids).logits
    return out, total


def learnable_batches(n: int, seq: int = 24) -> list[dict]:
    """``n`` batches of 2 rows over a 256-token vocabulary, each row an arithmetic sequence (so the loss moves),
    the first 6 labels masked."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, seq), generator=g)
        ids[:, 1:] = (ids[:, :1] + 7 * torch.arange(1, seq)) % 256
        labels = ids.clone()
        labels[:, :6] = -100
        out.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                    "num_trained_tokens": int((labels[:, 1:] != -100).sum())})
    return out


def same_adapters_as_peft(ours, theirs, variant: str, r: int, alpha: int, b_std: float = 0.0):
    """lorafit's LoRA (every layer of kind ``variant``) on ``ours`` and PEFT's on ``theirs`` over all linear layers,
    with PEFT's A and, when ``b_std``, the same random B; returns ``(ours, peft_model, PEFT's layers by name)``."""
    import peft
    import torch

    from lorafit.lora import LoraConfig, apply_lora, named_lora_layers

    peft_model = peft.get_peft_model(theirs, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                              target_modules="all-linear", task_type="CAUSAL_LM"))
    apply_lora(ours, LoraConfig(r=r, alpha=alpha, target_modules="all-linear"))
    theirs_layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer)}
    g = torch.Generator().manual_seed(2)
    layers = dict(named_lora_layers(ours))
    assert set(layers) == set(theirs_layers) and len(layers) == 14
    with torch.no_grad():
        for name, layer in layers.items():
            assert layer.variant.name == variant
            layer.lora_A.weight.copy_(theirs_layers[name].lora_A["default"].weight)
            if b_std:
                b = torch.randn(layer.lora_B.weight.shape, generator=g) * b_std
                layer.lora_B.weight.copy_(b)
                theirs_layers[name].lora_B["default"].weight.copy_(b)
    return ours, peft_model, theirs_layers


def save_repeat_twice(folder, copies: int):
    """``folder/model`` (a tiny Llama whose LoRA can move the logits) and ``folder/data.jsonl``: chat rows asking to
    repeat one of 8 words twice, ``copies`` times each; returns ``folder``."""
    import json

    from lorafit.models import load_tokenizer

    save_tiny_llama(folder / "model", load_tokenizer("demo"), initializer_range=0.5)
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
    rows = [{"messages": [{"role": "user", "content": f"Repeat twice: {w}"},
                          {"role": "assistant", "content": f"{w} {w}"}]} for w in words * copies]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def assert_same_adapter_files(a_dir, b_dir) -> dict:
    """The saved adapters in ``a_dir`` and ``b_dir`` hold the same keys, bitwise equal; returns ``a_dir``'s."""
    import torch
    from safetensors.torch import load_file

    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a


SRC = Path(__file__).resolve().parent.parent / "src"


def run_2_ranks(workdir, cfg: dict, *args: str, timeout: int = 240):
    """``lorafit train CONFIG --nproc 2`` (which starts torchrun), one thread per rank; the CompletedProcess."""
    import subprocess
    import sys

    import yaml

    path = workdir / f"{Path(cfg['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LORAFIT_DIST_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "lorafit.cli", "train", str(path), "--nproc", "2", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def metrics(out) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
