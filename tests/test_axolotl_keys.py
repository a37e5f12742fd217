"""The axolotl key table (lorafit.config.axolotl_keys) is what the loader does, key by key, and what the README
shows; ``lora_model_dir`` starts training from a saved adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama
from safetensors.torch import load_file

from lorafit.config import DatasetSpec, TrainConfig
from lorafit.config.axolotl_keys import (
    DATASET_LEVEL,
    IGNORED,
    RENAMED,
    SUPPORTED,
    TOP_LEVEL,
    UNSUPPORTED,
    compatibility_markdown,
)
from lorafit.errors import LorafitError
from lorafit.lora.io import PREFIX
from lorafit.models import load_tokenizer

BASE = {"base_model": "demo", "datasets": [{"path": "data.jsonl", "type": "alpaca"}], "adapter": "lora",
        "lora_target_linear": True}

# a typical value for every supported axolotl key (a new supported key needs one here)
TYPICAL_TOP = {
    "base_model": "demo", "tokenizer_config": "./tok", "chat_template": "chatml", "chat_template_jinja": "{{ x }}",
    "attn_implementation": "sdpa", "special_tokens": {"pad_token": "<|pad|>"}, "adapter": "lora",
    "lora_model_dir": "./adapter", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"], "lora_target_linear": True, "lora_modules_to_save": ["lm_head"],
    "peft_use_rslora": True, "peft_use_dora": True, "peft_layers_to_transform": [0, 1],
    "datasets": [{"path": "d.jsonl", "type": "completion"}], "test_datasets": [{"path": "t.jsonl", "type": "alpaca"}],
    "val_set_size": 0.05, "sequence_len": 1024, "sample_packing": True, "pad_to_sequence_len": True,
    "train_on_inputs": True, "micro_batch_size": 2, "gradient_accumulation_steps": 4, "num_epochs": 3,
    "max_steps": 100, "learning_rate": 2e-4, "lr_scheduler": "linear", "warmup_steps": 10, "warmup_ratio": 0.03,
    "optimizer": "adamw_torch_fused", "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.95,
    "adam_epsilon": 1e-6, "max_grad_norm": 0.5, "gradient_checkpointing": True, "curriculum_sampling": True,
    "dataset_exact_deduplication": True, "bf16": "auto", "fp16": False,
    "tf32": True, "eval_steps": 20, "eval_strategy": "no", "evals_per_epoch": 4, "save_steps": 50, "saves_per_epoch": 1,
    "save_total_limit": 2, "logging_steps": 5, "output_dir": "./out", "seed": 3,
    "resume_from_checkpoint": "./out/checkpoint-10", "eot_tokens": ["<|im_end|>"], "train_on_eos": "last",
    "lora_rank_pattern": {"q_proj": 32}, "lora_alpha_pattern": {"v_proj": 8},
    "batch_size": 1, "max_memory": "16GiB",
    "default_system_message": "You are helpful.", "chat_template_kwargs": {"enable_thinking": False},
    "load_in_4bit": True, "bnb_config_kwargs": {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "load_in_8bit": True, "quantize_moe_experts": True, "loraplus_lr_ratio": 16, "loraplus_lr_embedding": 1e-6,
    "model_quantization_config": "Mxfp4Config", "model_quantization_config_kwargs": {"dequantize": True},
    "llama4_linearized_experts": True,
    "lora_target_parameters": ["mlp.experts.gate_up_proj"], "unfrozen_parameters": ["^model.layers.1.mlp"],
    "deepspeed": "deepspeed_configs/zero2.json",
    "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"reshard_after_forward": True}, "fsdp_version": 2,
    "rl": "dpo", "rl_beta": 0.1, "dpo_beta": 0.1, "orpo_alpha": 0.1,
    "kto_desirable_weight": 0.2, "kto_undesirable_weight": 1.0,
}
TYPICAL_DATASET = {
    "path": "chats.jsonl", "split": "train", "type": "chat_template", "data_files": "a.jsonl", "ds_type": "json",
    "name": "default", "field": "text", "field_messages": "conversations", "message_field_role": "from",
    "message_field_content": "value", "message_property_mappings": {"role": "from", "content": "value"},
    "roles": {"assistant": ["gpt"]}, "roles_to_train": ["assistant"], "train_on_eos": "turn",
    "drop_system_message": True, "train_on_eot": "turn", "message_field_training": "train", "split_thinking": True,
    "template_thinking_key": "reasoning_content", "field_thinking": "reasoning", "field_chosen": "chosen",
    "field_rejected": "rejected",
}
# keys lorafit has that axolotl does not (not in the table)
LORAFIT_ONLY_TOP = {"lora_init", "skip_bad_rows", "loss_chunk_tokens", "compile_kernels",
                    "half_matmul", "shared_prefix"}
LORAFIT_ONLY_DATASET = {"encoding"}


def load(extra: dict, dataset_extra: dict | None = None) -> TrainConfig:
    d = {**BASE, **extra}
    if dataset_extra is not None:
        d["datasets"] = [{**BASE["datasets"][0], **dataset_extra}]
    return TrainConfig.from_dict(d, source="c.yaml")


def keys_of(table: dict, status: str) -> list[str]:
    return [k for k, (s, _) in table.items() if s == status]


def test_the_table_is_well_formed_and_matches_the_schema():
    for table in (TOP_LEVEL, DATASET_LEVEL):
        for key, (status, message) in table.items():
            assert status in (SUPPORTED, IGNORED, UNSUPPORTED), key
            assert status == SUPPORTED or message, f"{key}: an {status} key needs its message"
    top_fields = set(TrainConfig.model_fields)
    supported_top = {RENAMED.get(k, k) for k in keys_of(TOP_LEVEL, SUPPORTED)}
    assert supported_top <= top_fields
    assert top_fields - supported_top == LORAFIT_ONLY_TOP  # every field is an axolotl key or a lorafit one
    assert set(keys_of(DATASET_LEVEL, SUPPORTED)) <= set(DatasetSpec.model_fields)
    assert set(DatasetSpec.model_fields) - set(keys_of(DATASET_LEVEL, SUPPORTED)) == LORAFIT_ONLY_DATASET
    assert set(keys_of(TOP_LEVEL, SUPPORTED)) == set(TYPICAL_TOP)
    assert set(keys_of(DATASET_LEVEL, SUPPORTED)) == set(TYPICAL_DATASET)


@pytest.mark.parametrize("key", keys_of(TOP_LEVEL, SUPPORTED))
def test_supported_top_level_key_validates(key):
    extra = {key: TYPICAL_TOP[key]}
    if key in ("warmup_ratio",):
        extra["warmup_steps"] = None
    if key == "test_datasets":
        extra["val_set_size"] = 0
    if key == "quantize_moe_experts":
        extra["load_in_4bit"] = True
    if key.startswith("model_quantization_config"):  # the two go together
        extra.update(model_quantization_config="Mxfp4Config", model_quantization_config_kwargs={"dequantize": True})
    if key == "rl":
        extra["datasets"] = [{"path": "d.jsonl", "type": "chat_template.default"}]
    cfg = load(extra)
    assert getattr(cfg, RENAMED.get(key, key)) is not None


@pytest.mark.parametrize("key", keys_of(DATASET_LEVEL, SUPPORTED))
def test_supported_dataset_key_validates(key):
    extra = {key: TYPICAL_DATASET[key]}
    if key in ("field_messages", "message_field_role", "message_field_content", "message_property_mappings",
               "roles", "roles_to_train", "train_on_eos"):
        extra["type"] = "chat_template"
    cfg = load({}, extra)
    assert getattr(cfg.datasets[0], key) is not None


@pytest.mark.parametrize("key", keys_of(TOP_LEVEL, IGNORED))
def test_ignored_top_level_key_gives_its_notice(key):
    cfg = load({key: True})
    assert f"{key}: ignored: {TOP_LEVEL[key][1]}" in cfg.notices
    assert load({key: None}).notices == load({key: False}).notices == []  # unset: silent


@pytest.mark.parametrize("key", keys_of(DATASET_LEVEL, IGNORED))
def test_ignored_dataset_key_gives_its_notice(key):
    cfg = load({}, {key: "x"})
    assert f"datasets[0].{key}: ignored: {DATASET_LEVEL[key][1]}" in cfg.notices
    assert load({}, {key: None}).notices == []


@pytest.mark.parametrize("key", keys_of(TOP_LEVEL, UNSUPPORTED))
def test_unsupported_top_level_key_is_an_error_with_its_reason(key):
    with pytest.raises(LorafitError) as exc:
        load({key: True})
    msg = str(exc.value)
    assert msg == f"c.yaml: key '{key}': got true, {TOP_LEVEL[key][1]}"
    load({key: None})  # axolotl's empty keys are accepted
    load({key: False})


@pytest.mark.parametrize("key", keys_of(DATASET_LEVEL, UNSUPPORTED))
def test_unsupported_dataset_key_is_an_error_with_its_reason(key):
    with pytest.raises(LorafitError) as exc:
        load({}, {key: 2})
    assert str(exc.value) == f"c.yaml: key 'datasets[0].{key}': got 2, {DATASET_LEVEL[key][1]}"


@pytest.mark.parametrize(("extra", "dataset_extra", "needle"), [
    ({"flash_attension": True}, None, "unknown key 'flash_attension'; did you mean `flash_attention`?"),
    ({"lora_modle_dir": "x"}, None, "unknown key 'lora_modle_dir'; did you mean `lora_model_dir`?"),
    ({"nonsense_key": 1}, None, "unknown key 'nonsense_key'"),
    ({}, {"roles_to_trian": ["gpt"]}, "unknown key 'datasets[0].roles_to_trian'; did you mean `roles_to_train`?"),
])
def test_unknown_keys_still_get_did_you_mean(extra, dataset_extra, needle):
    with pytest.raises(LorafitError, match=re.escape(needle)):
        load(extra, dataset_extra)


def test_newer_logging_keys_are_ignored_by_prefix():
    assert load({"wandb_tags": ["a"]}).notices[0].startswith("wandb_tags: ignored: no tracker")


def test_peft_layers_to_transform_is_read_as_lora_layers_to_transform():
    assert load({"peft_layers_to_transform": [1, 2]}).lora_layers_to_transform == [1, 2]


def test_readme_shows_the_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- axolotl-keys:start -->\n", 1)[1].split("<!-- axolotl-keys:end -->", 1)[0]
    assert section == compatibility_markdown(), "run: python -m lorafit.config.axolotl_keys, paste into README.md"


# ---- lora_model_dir ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("start")
    save_tiny_llama(d / "model", load_tokenizer("demo"), initializer_range=0.5)
    rows = [{"text": f"the {w} is ripe and the {w} is sweet"} for w in ["apple", "pear", "plum", "fig"] * 4]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run_config(workdir: Path, out: str, **kw) -> TrainConfig:
    d = dict(base_model="model", adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
             datasets=[{"path": "data.jsonl", "type": "completion"}], sequence_len=32, micro_batch_size=4,
             max_steps=2, learning_rate=5e-2, lr_scheduler="constant", output_dir=out, seed=5,
             compile_kernels=False)
    d.update(kw)
    return TrainConfig.from_dict(d, source="run.yaml", config_dir=workdir)


def test_lora_model_dir_starts_from_the_saved_adapter(workdir):
    from lorafit.train import prepare_model, train
    from lorafit.train.run_record import fingerprint

    train(run_config(workdir, "first"))
    saved = load_file(workdir / "first" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())  # B moved from 0

    # the starting weights are the saved adapter's, bit for bit (path relative to the config's folder)
    cfg = run_config(workdir, "second", lora_model_dir="first", max_steps=1, learning_rate=1e-12, seed=99)
    model, _ = prepare_model(cfg)
    own = {PREFIX + n: p for n, p in model.named_parameters()}
    for key, tensor in saved.items():
        assert torch.equal(own[key].detach(), tensor), key
    assert fingerprint(cfg)["lora_model_dir"] == "first"

    # one step at a tiny learning rate ends where the saved adapter is
    result = train(cfg)
    after = load_file(workdir / "second" / "adapter_model.safetensors")
    assert result.steps == 1 and set(after) == set(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(after[key], tensor, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"lora_r": 8}, "lora_r 4 in the adapter, 8 in the config"),
    ({"lora_alpha": 16, "peft_use_rslora": True}, "lora_alpha 8.0 in the adapter, 16.0 in the config; peft_use_rslora"),
    ({"lora_target_linear": False, "lora_target_modules": ["q_proj", "v_proj"]},
     "lora_target_modules ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'] in the adapter"),
    ({"lora_target_linear": False, "lora_target_modules": r".*\.(q|v)_proj"}, "target layers are not the config's"),
])
def test_lora_model_dir_refuses_an_adapter_with_other_settings(workdir, kw, needle):
    from lorafit.train import prepare_model, train

    if not (workdir / "first" / "adapter_model.safetensors").is_file():
        train(run_config(workdir, "first"))
    with pytest.raises(LorafitError) as exc:
        prepare_model(run_config(workdir, "x", lora_model_dir="first", **kw))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("run.yaml: lora_model_dir ") and needle in msg, msg


def test_lora_model_dir_needs_a_lora_adapter_and_an_existing_folder(workdir):
    from lorafit.train import prepare_model

    with pytest.raises(LorafitError, match="lora_model_dir is set but adapter is not lora"):
        load({"adapter": None, "lora_model_dir": "x"})
    with pytest.raises(LorafitError, match="adapter_config.json: not found"):
        prepare_model(run_config(workdir, "y", lora_model_dir="missing"))


def test_eval_defaults_to_lora_model_dir_until_the_run_has_saved_one(tmp_path):
    import argparse

    from lorafit.cli.eval import resolve_target

    (tmp_path / "c.yaml").write_text("base_model: demo\nadapter: lora\nlora_target_linear: true\n"
                                     "lora_model_dir: start\noutput_dir: out\n"
                                     "datasets:\n  - path: d.jsonl\n    type: completion\n")
    args = argparse.Namespace(config=str(tmp_path / "c.yaml"), adapter=None)
    assert resolve_target(args)[1] == str(tmp_path / "start")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_config.json").write_text("{}")
    assert resolve_target(args)[1] == str(tmp_path / "out")
