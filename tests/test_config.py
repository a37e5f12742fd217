"""The YAML config schema: axolotl-shaped files validate; each mistake is one line naming key and value."""

import json
from pathlib import Path

import pytest
import yaml

from lorafit.config import TrainConfig, load_config
from lorafit.errors import LorafitError

FIXTURES = Path(__file__).parent / "fixtures" / "axolotl"
BASE = {
    "base_model": "demo",
    "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
    "adapter": "lora",
    "lora_target_linear": True,
}


def make(**over) -> TrainConfig:
    return TrainConfig.from_dict({**BASE, **over}, source="config.yaml")


def error_of(**over) -> str:
    with pytest.raises(LorafitError) as exc:
        make(**over)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("config.yaml")
    return msg


def test_axolotl_lora_1b_example_validates():
    cfg = load_config(FIXTURES / "lora-1b.yml")
    assert cfg.is_lora and cfg.lora_r == 16 and cfg.lora_alpha == 32 and cfg.lora_dropout == 0.05
    assert cfg.lora_targets == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    assert cfg.datasets[0].type == "alpaca" and cfg.val_set_size == 0.1
    assert cfg.sample_packing and cfg.pad_to_sequence_len and cfg.gradient_checkpointing
    assert cfg.bf16 == "auto" and cfg.fp16 is False and cfg.warmup_steps == 10
    assert cfg.special_tokens == {"pad_token": "<|end_of_text|>"}
    assert cfg.config_dir == FIXTURES.resolve()
    assert any(n.startswith("flash_attention: ignored") for n in cfg.notices)
    assert not any(n.startswith("wandb_project") for n in cfg.notices)  # empty keys are silent


def test_axolotl_instruct_lora_8b_example_validates():
    cfg = load_config(FIXTURES / "instruct-lora-8b.yml")
    assert cfg.lora_targets == "all-linear"
    ds = cfg.datasets[0]
    assert ds.type == "chat_template" and ds.roles == {"user": ["user"], "assistant": ["assistant"]}
    assert cfg.chat_template == "llama3"
    assert cfg.load_in_8bit and not any("load_in_8bit" in n for n in cfg.notices)  # LoRA over an int8 base


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                                       "adamw_torch_8bit", "adamw_torch_4bit"])
def test_axolotl_8bit_and_paged_optimizers_validate(optimizer):
    assert make(optimizer=optimizer).optimizer == optimizer


@pytest.mark.parametrize("optimizer", ["paged_adamw_16bit", "adamw_bnb_4bit"])
def test_other_8bit_optimizers_are_a_clear_error(optimizer):
    msg = error_of(optimizer=optimizer)
    assert "'optimizer'" in msg and optimizer in msg and "adamw_8bit" in msg


def test_defaults_and_conveniences():
    cfg = make()
    assert cfg.lora_r == 8 and cfg.lora_alpha == 16 and cfg.lora_init == "kaiming"
    assert cfg.sequence_len == 2048 and cfg.micro_batch_size == 1 and cfg.learning_rate == 2e-4
    assert cfg.optimizer == "adamw_torch" and cfg.lr_scheduler == "cosine"
    assert cfg.datasets[0].split == "train" and cfg.datasets[0].roles_to_train == ["assistant"]
    assert cfg.dtype_for(bf16_supported=False) == "float32"
    assert make(bf16=True).dtype_for(bf16_supported=False) == "bfloat16"
    assert make(bf16="auto").dtype_for(bf16_supported=True) == "bfloat16"
    assert make(bf16="auto").dtype_for(bf16_supported=False) == "float32"
    full = TrainConfig.from_dict({**BASE, "adapter": None})
    assert not full.is_lora and full.lora_targets is None
    assert make(adapter="none").is_lora is False
    assert make(lora_target_linear=False, lora_target_modules=r".*\.(q|v)_proj").lora_targets == r".*\.(q|v)_proj"
    assert make(val_set_size=20).val_set_size == 20


@pytest.mark.parametrize(
    ("over", "needles"),
    [
        ({"lora_rr": 4}, ["unknown key 'lora_rr'", "did you mean `lora_r`?"]),
        ({"lora_r": -4}, ["key 'lora_r': got -4, must be an integer > 0"]),
        ({"lora_r": 0}, ["key 'lora_r': got 0"]),
        ({"lora_r": "abc"}, ["key 'lora_r': got 'abc', must be an integer"]),
        ({"lora_dropout": 1.0}, ["key 'lora_dropout': got 1.0", "[0, 1)"]),
        ({"sample_packing": "perhaps"}, ["key 'sample_packing': got 'perhaps', must be true or false"]),
        ({"datasets": [{"path": "x.jsonl", "type": "alpaca_w_system"}]},
         ["key 'datasets[0].type': got 'alpaca_w_system'", "alpaca, alpaca:chat, alpaca:chatml, alpaca:phi, "
          "chat_template, completion, input_output"]),
        ({"datasets": [{"path": "x.jsonl", "type": "alpaca", "feild": "t"}]},
         ["unknown key 'datasets[0].feild'", "did you mean `field`?"]),
        ({"datasets": [{"type": "alpaca"}]}, ["key 'datasets[0].path' is required"]),
        ({"datasets": []}, ["key 'datasets'"]),
        ({"adapter": "qlora"}, ["adapter is qlora but load_in_4bit is not set"]),
        ({"load_in_4bit": True, "adapter": None}, ["load_in_4bit needs adapter: qlora"]),
        ({"load_in_4bit": True, "adapter": "qlora", "peft_use_dora": True}, ["load_in_4bit and peft_use_dora"]),
        ({"load_in_4bit": True, "adapter": "qlora", "bnb_config_kwargs": {"bnb_4bit_quant_type": "int4"}},
         ["bnb_config_kwargs", "int4", "nf4, fp4"]),
        ({"load_in_4bit": True, "adapter": "qlora", "bnb_config_kwargs": {"bnb_4bit_blocksize": 32}},
         ["bnb_config_kwargs", "bnb_4bit_blocksize"]),
        ({"deepspeed": "ds.json"}, ["key 'deepspeed'"]),
        ({"fsdp_version": 1}, ["fsdp_version"]),
        ({"relora_steps": 100}, ["key 'relora_steps'"]),
        ({"fp16": True, "adapter": None}, ["fp16 with full fine-tuning is not supported", "use bf16: true"]),
        ({"warmup_steps": 10, "warmup_ratio": 0.1}, ["warmup_steps and warmup_ratio"]),
        ({"lora_target_linear": False}, ["lora_target_linear: true"]),
        ({"lora_target_linear": False, "lora_target_modules": "(["}, ["key 'lora_target_modules'", "regex"]),
        ({"lr_scheduler": "rex"}, ["key 'lr_scheduler': got 'rex'", "cosine"]),
        ({"bf16": "maybe"}, ["key 'bf16': got 'maybe', must be true, false or auto"]),
        ({"val_set_size": 1.5}, ["key 'val_set_size': got 1.5"]),
        ({"test_datasets": [{"path": "t.jsonl", "type": "alpaca"}], "val_set_size": 0.1}, ["test_datasets"]),
        ({"lora_init": "xavier"}, ["key 'lora_init': got 'xavier'", "pissa"]),
    ],
)
def test_bad_values_are_one_line_errors(over, needles):
    msg = error_of(**over)
    for needle in needles:
        assert needle in msg, msg


def test_missing_base_model():
    with pytest.raises(LorafitError, match="key 'base_model' is required"):
        TrainConfig.from_dict({"datasets": BASE["datasets"]}, source="c.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(LorafitError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("base_model: demo\ndatasets:\n  - path: [unclosed\nlora_r: 8\n")
    with pytest.raises(LorafitError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "bad.yaml: line" in msg and "invalid YAML" in msg and "\n" not in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_top_level_must_be_mapping(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(LorafitError, match=r"c\.yaml: "):
        load_config(p)


def test_yaml_round_trip_and_jinja_template(tmp_path):
    d = {**BASE, "chat_template": "jinja", "chat_template_jinja": "{{ messages }}"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    cfg = load_config(p)
    assert cfg.chat_template == "{{ messages }}" and cfg.config_dir == tmp_path.resolve()


def test_compile_auto_compiles_only_runs_long_enough_to_repay_it():
    from lorafit.options import COMPILE_MIN_TOKENS, RuntimeOptions

    base = dict(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], micro_batch_size=8,
                sequence_len=128, gradient_accumulation_steps=2)
    short = TrainConfig.from_dict({**base, "max_steps": 10})
    assert short.planned_tokens == 10 * 8 * 2 * 128 < COMPILE_MIN_TOKENS
    options = short.runtime_options()
    assert not options.compile and options.compile_auto and "would not repay" in options.describe()
    long = TrainConfig.from_dict({**base, "max_steps": COMPILE_MIN_TOKENS // (8 * 2 * 128)})
    assert long.runtime_options().compile
    assert TrainConfig.from_dict({**base, "num_epochs": 1}).runtime_options().compile  # length unknown: compile
    assert TrainConfig.from_dict({**base, "max_steps": 10, "compile_kernels": True}).runtime_options().compile
    assert not RuntimeOptions.resolve(env={"LORAFIT_COMPILE": "auto"}, planned_tokens=1).compile
    assert RuntimeOptions.resolve(env={"LORAFIT_COMPILE": "1"}, planned_tokens=1).compile
    with pytest.raises(LorafitError, match="1, 0 or auto"):
        RuntimeOptions.resolve(env={"LORAFIT_COMPILE": "maybe"})


def test_batch_size_without_accumulation_steps_sets_them_as_axolotl_does():
    cfg = make(batch_size=8, micro_batch_size=2)
    assert cfg.gradient_accumulation_steps == 4  # axolotl: batch_size // micro_batch_size
    assert "batch_size 10 is not a multiple of micro_batch_size 4" in error_of(batch_size=10, micro_batch_size=4)
    assert "set two of the three" in error_of(batch_size=8, micro_batch_size=2, gradient_accumulation_steps=2)


@pytest.mark.parametrize("value", ["xformers", "kernels-community/vllm-flash-attn3"])
def test_exact_attention_lorafit_does_not_load_runs_as_sdpa_with_a_notice(value):
    cfg = make(attn_implementation=value)
    assert cfg.attn_implementation == "sdpa"
    assert any(n.startswith(f"attn_implementation {value}: runs as sdpa") for n in cfg.notices)
    assert "attn_implementation" in error_of(attn_implementation="magic")


def test_flash_attention_without_its_package_or_cuda_runs_as_sdpa_with_a_notice():
    import transformers.utils

    from lorafit.train.setup import attention_choice

    assert attention_choice(None) == ("sdpa", None) and attention_choice("eager") == ("eager", None)
    for impl, check in (("flash_attention_2", "is_flash_attn_2_available"),
                        ("flash_attention_3", "is_flash_attn_3_available")):
        got, notice = attention_choice(impl)
        if getattr(transformers.utils, check)():
            assert (got, notice) == (impl, None)
        else:
            assert got == "sdpa" and notice.startswith(f"attn_implementation {impl}: ")


@pytest.mark.parametrize("value, stage, fsdp", [
    ("deepspeed_configs/zero2.json", 2, False),  # axolotl's shipped names, read when the file is not here
    ("deepspeed_configs/zero3_bf16.json", 3, True),
    ({"zero_optimization": {"stage": 1}}, 1, False),
])
def test_deepspeed_maps_its_zero_stage_onto_fsdp2_or_ddp(value, stage, fsdp):
    cfg = make(deepspeed=value)
    assert cfg.fsdp_enabled is fsdp
    assert any(n.startswith(f"deepspeed: ZeRO-{stage}, read from") and ("FSDP2" if fsdp else "DDP") in n
               for n in cfg.notices)


def test_deepspeed_reads_the_stage_and_offload_from_its_file(tmp_path):
    ds = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = TrainConfig.from_dict({**BASE, "deepspeed": "ds.json"}, source="config.yaml", config_dir=tmp_path)
    assert cfg.fsdp_enabled and any("ZeRO-3, read from ds.json" in n and "offload settings are not applied" in n
                                    for n in cfg.notices)


@pytest.mark.parametrize("over, words", [
    ({"deepspeed": "mine.json"}, "key 'deepspeed': got 'mine.json', no such file"),
    ({"deepspeed": {"train_batch_size": 8}}, "no zero_optimization.stage"),
    ({"deepspeed": "zero3.json", "adapter": None}, "full fine-tuning with FSDP2 (deepspeed ZeRO-3 maps to it here) is not supported"),
    ({"deepspeed": "zero2.json", "fsdp_version": 2}, "deepspeed and fsdp keys are both set"),
    ({"deepspeed": "zero3.json", "fp16": True}, "fp16 with FSDP2 (deepspeed ZeRO-3 maps to it here) is not supported"),
])
def test_deepspeed_mistakes_are_one_line(over, words):
    assert words in error_of(**over)
