"""The estimator selects LoRA targets as training does: same matcher, on the paths the real model has.

Each case builds the transformers model of a tiny :class:`ModelSpec` (``lorafit.measure.hf_config``),
attaches the adapter with ``lorafit.lora.apply_lora`` and counts what trains; the estimate must count the
same. Also: the estimator imports no torch, and ``settings_from_config`` carries a config's adapter choices
into the estimate.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import saved_by_loss

from lorafit import LorafitError
from lorafit.memory.estimate import Settings, estimate, lora_targets
from lorafit.memory.spec import HEAD, ModelSpec

LLAMA = ModelSpec("tiny-llama", "llama", 64, 128, 3, 4, 2, 16, 256, True)
QWEN2 = ModelSpec("tiny-qwen2", "qwen2", 64, 128, 3, 4, 2, 16, 256, True, qkv_bias=True)
MISTRAL = ModelSpec("tiny-mistral", "mistral", 64, 128, 3, 4, 2, 16, 256, False)
GEMMA = ModelSpec("tiny-gemma", "gemma", 64, 128, 3, 4, 1, 16, 256, True)
GEMMA2 = ModelSpec("tiny-gemma2", "gemma2", 64, 128, 3, 4, 2, 16, 256, True, final_logit_softcap=30.0,
                   attn_logit_softcap=50.0)
PHI3 = ModelSpec("tiny-phi3", "phi3", 64, 128, 3, 4, 4, 16, 256, False)
GPT2 = ModelSpec("tiny-gpt2", "gpt2", 64, 256, 3, 4, 4, 16, 256, True, norm="layer", mlp="plain",
                 max_positions=64)


def _model(spec: ModelSpec):
    import torch
    import transformers

    from lorafit.measure import hf_config

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(hf_config(spec))


def _linear_paths(model) -> dict[str, int]:
    """Every linear layer of the model but the head: path -> in + out."""
    from lorafit.lora.layer import WRAPPABLE

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WRAPPABLE) and name != HEAD:
            out[name] = sum(m.weight.shape)  # Linear (out, in), GPT-2's Conv1D (in, out)
    return out


@pytest.mark.parametrize("spec", [LLAMA, QWEN2, MISTRAL, GEMMA, GEMMA2, PHI3, GPT2], ids=lambda s: s.arch)
def test_spec_paths_are_the_models(spec):
    model = _model(spec)
    want = {f"{spec.block_prefix(layer)}.{n}": i + o
            for layer in range(spec.layers) for n, i, o, _ in spec.linear_layers()}
    assert _linear_paths(model) == want
    assert sum(p.numel() for p in model.parameters()) == spec.total_params()


CASES = [
    (LLAMA, dict(targets=["q_proj", "v_proj"])),
    (LLAMA, dict(targets="all-linear")),
    (LLAMA, dict(targets=r"model\.layers\.\d+\.mlp\.(gate|up)_proj")),
    (LLAMA, dict(targets="all-linear", layers_to_transform=[1])),
    (LLAMA, dict(targets=["self_attn.o_proj", "down_proj"], layers_to_transform=[0, 2])),
    (LLAMA, dict(targets="all-linear", rank_pattern={"o_proj": 4, r"mlp\.(up|down)_proj": 2})),
    (QWEN2, dict(targets=["k_proj", "o_proj"], layers_to_transform=[2], rank_pattern={"k_proj": 3})),
    (QWEN2, dict(targets="all-linear")),
    (GPT2, dict(targets="all-linear")),
    (GPT2, dict(targets=["c_proj"])),  # both projections, attention's and the MLP's
    (GPT2, dict(targets=r"transformer\.h\.[01]\.attn\.c_.*", rank_pattern={"c_attn": 4})),
    (GPT2, dict(targets=["c_attn", "c_fc"], layers_to_transform=[0])),
    (PHI3, dict(targets="all-linear")),
    (PHI3, dict(targets=["qkv_proj", "gate_up_proj"], layers_to_transform=[1, 2],
                rank_pattern={"gate_up_proj": 2})),
]


@pytest.mark.parametrize("spec,kw", CASES, ids=[f"{s.arch}-{i}" for i, (s, _) in enumerate(CASES)])
def test_trainable_count_matches_the_trained_model(spec, kw):
    from lorafit.lora import LoraConfig, apply_lora

    model = _model(spec)
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=kw["targets"],
                                 layers_to_transform=kw.get("layers_to_transform"),
                                 rank_pattern=kw.get("rank_pattern", {})))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = estimate(spec, Settings(method="lora", dtype="float32", r=8, seq_len=64, device="cpu", **kw))
    assert est.params["trainable"] == est.params["adapter"] == trained


def test_a_regex_matches_the_whole_path():
    with pytest.raises(LorafitError, match="whole path") as e:
        estimate(LLAMA, Settings(targets="q_proj|v_proj"))  # re.search would have found them
    assert "\n" not in str(e.value) and "q_proj" in str(e.value)
    assert estimate(LLAMA, Settings(targets=r".*\.(q|v)_proj")).params["adapter"] == \
        estimate(LLAMA, Settings(targets=["q_proj", "v_proj"])).params["adapter"]


def test_targets_matching_nothing_are_one_line_errors():
    with pytest.raises(LorafitError, match="'qkv_proj' matches no linear layer of tiny-llama; this model has"):
        estimate(LLAMA, Settings(targets=["q_proj", "qkv_proj"]))
    with pytest.raises(LorafitError, match=r"in layers \[7\]; this model has"):
        estimate(LLAMA, Settings(targets="all-linear", layers_to_transform=[7]))


def test_unadapted_layers_save_less():
    """Blocks below the lowest adapter save nothing (no gradient flows there); frozen blocks above it save
    what the gradient passing through them needs, but no LoRA input."""
    s = dict(method="lora", dtype="float32", micro_batch=2, seq_len=64, r=8, device="cpu")
    per = {}
    for layers in (None, [0], [2]):
        est = estimate(LLAMA, Settings(**s, layers_to_transform=layers))
        per[str(layers)] = est.component("activations").bytes
    assert per["[2]"] < per["[0]"] < per["None"]
    from lorafit.memory import activations as act

    st = Settings(**s, layers_to_transform=[1])
    blocks = act.layer_bytes(LLAMA, st, lora_targets(LLAMA, st))
    assert blocks[0] == 0 and blocks[1] > blocks[2] > 0


@pytest.mark.parametrize("kw", [
    dict(layers_to_transform=[1]),
    dict(targets=["v_proj", "down_proj"], layers_to_transform=[1, 2]),
    dict(rank_pattern={"down_proj": 4, "q_proj": 12}),
    dict(targets=["o_proj"], layers_to_transform=[2]),
], ids=["layer1", "v-down-layers12", "rank-pattern", "o-layer2"])
def test_saved_tensors_per_layer_match_the_model(kw):
    """What one forward + loss saves for backward equals the estimator's per-layer sum (see test_memory, which
    checks the compiled kernels' saves; eager kernels here: which layers save what does not depend on it)."""

    from lorafit.measure import _batch, build_model
    from lorafit.memory import activations as act
    from lorafit.options import RuntimeOptions

    s = Settings(method="lora", dtype="float32", micro_batch=2, seq_len=32, r=8, dropout=0.1, device="cpu",
                 runtime=RuntimeOptions.resolve(False), **kw)
    model = build_model(LLAMA, s)
    _, _, saved = saved_by_loss(model, _batch(LLAMA.vocab, s, 0), s.runtime)
    assert saved == act.saved_for_backward(LLAMA, s, lora_targets(LLAMA, s))


def test_settings_from_config():
    from lorafit.config import TrainConfig
    from lorafit.memory.settings import settings_from_config

    cfg = TrainConfig.from_dict(dict(
        base_model="llama-3.1-8b", adapter="lora", lora_r=8, lora_alpha=32,
        lora_target_modules=["q_proj", "v_proj"], lora_layers_to_transform=[0, 2],
        datasets=[{"path": "x.jsonl", "type": "alpaca"}], bf16=True,
        micro_batch_size=2, sequence_len=512, optimizer="adamw_torch_fused", loss_chunk_tokens=64,
        compile_kernels=False, half_matmul="native"))
    s = settings_from_config(cfg, "cpu")
    got = (s.method, s.dtype, s.micro_batch, s.seq_len, s.r, s.alpha, s.targets, s.layers_to_transform,
           s.optimizer, s.optimizer_kind, s.loss_chunk_tokens, s.device)
    assert got == ("lora", "bfloat16", 2, 512, 8, 32, ["q_proj", "v_proj"], [0, 2], "adamw_torch_fused",
                   "adamw", 64, "cpu")
    assert (s.runtime.compile, s.runtime.half_matmul) == (False, "native")
    auto = cfg.model_copy(update={"bf16": "auto"})
    assert settings_from_config(auto, "cuda").dtype == "bfloat16"  # a GPU target has bf16
    assert settings_from_config(auto, "cpu").dtype == "float32"


def test_demo_names_are_the_loaders():
    """``resolve_spec`` knows the demo model's names without importing ``lorafit.models`` (torch): one table."""
    from lorafit.config import DEMO_ALIASES
    from lorafit.memory.spec import resolve_spec

    assert all(resolve_spec(n).name.startswith("demo") for n in DEMO_ALIASES)


def test_the_estimator_imports_no_torch():
    code = ("import sys, lorafit.memory.estimate, lorafit.memory.plan, lorafit.memory.settings, lorafit.cli\n"
            "from lorafit.memory import catalog\n"
            "from lorafit.memory.estimate import Settings, estimate\n"
            "from lorafit.memory.plan import search\n"
            "spec = catalog.get_model('llama-3.1-8b')\n"
            "for device in ('cuda', 'cpu'):\n"
            "    estimate(spec, Settings(device=device, dtype='bf16', dropout=0.05))\n"
            "search(spec, Settings(), catalog.gpu_memory('rtx-4090'))\n"
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


OUTSIDE_CASES = [
    (LLAMA, dict(targets=["q_proj", "lm_head", "embed_tokens"])),  # tied
    (MISTRAL, dict(targets=["lm_head", "embed_tokens"])),  # untied, nothing in the blocks
    (GPT2, dict(targets=["c_attn", "wte"])),
    (LLAMA, dict(targets=r".*\.(q_proj|embed_tokens)")),
    (LLAMA, dict(targets=["q_proj", "lm_head"], layers_to_transform=[1], expect_error="lm_head")),
    (LLAMA, dict(targets=["v_proj"], modules_to_save=["embed_tokens", "lm_head"])),  # tied: one copy
    (MISTRAL, dict(targets=["v_proj"], modules_to_save=["embed_tokens", "lm_head"])),
    (MISTRAL, dict(targets=["v_proj", "lm_head"], modules_to_save=["embed_tokens"])),
]


@pytest.mark.parametrize("spec,kw", OUTSIDE_CASES, ids=[f"{s.arch}-{i}" for i, (s, _) in enumerate(OUTSIDE_CASES)])
def test_head_and_embedding_counts_match_the_trained_model(spec, kw):
    """LoRA on lm_head / the embeddings, and modules_to_save: trainable parameters, and the weights (a tied table
    trained in full gets its own copy) as the model has them."""
    import warnings

    from lorafit.lora import LoraConfig, apply_lora

    kw = dict(kw)
    error = kw.pop("expect_error", None)
    settings = Settings(method="lora", dtype="float32", r=8, seq_len=64, device="cpu", **kw)
    model = _model(spec)
    cfg = LoraConfig(r=8, alpha=16, target_modules=kw["targets"], layers_to_transform=kw.get("layers_to_transform"),
                     modules_to_save=kw.get("modules_to_save"))
    if error:  # outside the blocks: layers_to_transform leaves them out, in training and in the estimate
        with pytest.raises(LorafitError, match=error):
            apply_lora(model, cfg)
        with pytest.raises(LorafitError, match=error):
            estimate(spec, settings)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(model, cfg)
    est = estimate(spec, settings)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert est.params["trainable"] == trained and est.params["adapter"] == lora
    frozen_and_saved = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    assert est.component("weights").bytes == frozen_and_saved * 4


@pytest.mark.parametrize("spec,kw", [
    (LLAMA, dict(targets=["embed_tokens", "o_proj"])),
    pytest.param(LLAMA, dict(targets=["q_proj", "lm_head"], dtype="bfloat16"), marks=pytest.mark.slow),  # compiles bf16
    (LLAMA, dict(targets=["q_proj", "lm_head"])),
    (MISTRAL, dict(targets=["lm_head"])),
    (MISTRAL, dict(targets=["v_proj"], modules_to_save=["embed_tokens"])),
    (MISTRAL, dict(targets=["v_proj"], modules_to_save=["lm_head"])),
], ids=["embed-o", "q-head-bf16", "q-head", "head-only", "save-embed", "save-head"])
def test_saved_tensors_with_head_and_embedding_match_the_model(spec, kw):
    """The embeddings' and the head's saved tensors (LoRA or modules_to_save) are the estimator's (eager kernels,
    as test_saved_tensors_per_layer_match_the_model: the head and embeddings are not compiled parts)."""
    import warnings

    from lorafit.measure import _batch, build_model
    from lorafit.memory import activations as act
    from lorafit.options import RuntimeOptions

    kw = {"dtype": "float32", "runtime": RuntimeOptions.resolve(False), **kw}
    s = Settings(method="lora", micro_batch=2, seq_len=32, r=8, dropout=0.1, device="cpu", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(spec, s)
    _, _, saved = saved_by_loss(model, _batch(spec.vocab, s, 0), s.runtime)
    assert saved == act.saved_for_backward(spec, s, lora_targets(spec, s))
