"""Preference training (rl: dpo / orpo): config, data, and the losses and LoRA gradients against TRL's trainers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_llama

from lorafit import LorafitError
from lorafit.config import TrainConfig
from lorafit.data import build_datasets
from lorafit.data.preference import PairSample, pair_batches
from lorafit.lora import named_lora_layers
from lorafit.train import prepare_model
from lorafit.train.loss import causal_lm_loss, options_of
from lorafit.train.preference import PreferenceLoss, reference, sequence_logps

ROWS = [  # axolotl's chat_template.default rows: a prompt conversation, answers as message, list or string
    {"conversation": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
     "chosen": {"role": "assistant", "content": "4"}, "rejected": {"role": "assistant", "content": "5, I think"}},
    {"conversation": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}],
     "rejected": "London, surely"},
    {"conversation": "Name a colour.", "chosen": "Blue.", "rejected": "A number: seven."},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, demo_tokenizer):
    folder = tmp_path_factory.mktemp("pref")
    save_tiny_llama(folder / "model", demo_tokenizer)
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder


def config(workdir: Path, **kw) -> dict:
    """A DPO config over the tiny model. Eager kernels: these tests compare the preference math, and
    tests/test_lean_kernels.py holds the compiled kernels to the eager ones (compiling here costs ~40 s cold)."""
    return {"base_model": str(workdir / "model"), "rl": "dpo", "chat_template": "chatml", "compile_kernels": False,
            "datasets": [{"path": str(workdir / "pairs.jsonl"), "type": "chat_template.default",
                          "field_messages": "conversation", "field_chosen": "chosen", "field_rejected": "rejected",
                          "message_property_mappings": {"role": "role", "content": "content"}}],
            "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True, "sequence_len": 128,
            "micro_batch_size": 3, "output_dir": str(workdir / "out"), **kw}


# ---- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys, words", [
    ({"rl": "ipo"}, "key 'rl': got 'ipo', lorafit trains rl: dpo, orpo, kto"),
    ({"adapter": None}, "rl: dpo with full fine-tuning needs a second, frozen copy"),
    ({"sample_packing": True}, "preference rows are not packed"),
    ({"rl": None}, "dataset type chat_template.default holds preference data; set rl: dpo"),
    ({"rl": "kto"}, "rl: kto reads datasets of type llama3.ultra"),
])
def test_bad_preference_configs_are_one_line(workdir, keys, words):
    with pytest.raises(LorafitError, match=words):
        TrainConfig.from_dict({k: v for k, v in {**config(workdir), **keys}.items() if v is not None})


def test_supervised_type_under_rl_is_refused_and_chat_template_means_default(workdir):
    cfg = config(workdir)
    cfg["datasets"][0]["type"] = "alpaca"
    with pytest.raises(LorafitError, match="rl: dpo reads datasets of type .*; got type alpaca"):
        TrainConfig.from_dict(cfg)
    cfg["datasets"][0]["type"] = "chat_template"
    assert TrainConfig.from_dict(cfg).datasets[0].type == "chat_template.default"


def test_preference_keys_and_notices(workdir):
    cfg = TrainConfig.from_dict(config(workdir, rl="orpo", orpo_alpha=0.2, lora_dropout=0.05))
    assert cfg.orpo_weight == 0.2 and cfg.lora_dropout == 0.0
    assert any("lora_dropout 0.05: not applied" in n for n in cfg.notices)
    cfg = TrainConfig.from_dict(config(workdir, dpo_beta=0.3, dpo_label_smoothing=0.1))
    assert cfg.dpo_beta == 0.3  # label smoothing: TRL's sigmoid loss does not use it, nor does lorafit's
    assert any(n.startswith("dpo_label_smoothing: ignored: TRL's sigmoid DPO loss") for n in cfg.notices)
    assert TrainConfig.from_dict(config(workdir)).dpo_beta == 0.1


# ---- data -----------------------------------------------------------------------------------------------------
def test_pairs_render_as_axolotl_and_tokenize_as_trl(workdir, demo_tokenizer):
    """Prompt = the template's rendering with the generation prompt; the answers follow it with their end of turn;
    prompt and answer ids are TRL's split of the tokenized prompt + answer."""
    cfg = TrainConfig.from_dict(config(workdir))
    train, _, report = build_datasets(cfg, demo_tokenizer)
    assert report.train_samples == 3 and report.unit == "pairs"
    first = train[0]
    decode = demo_tokenizer.decode
    assert decode(first.prompt_ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
                                        "<|im_end|>\n<|im_start|>assistant\n")
    assert decode(first.chosen_ids) == "4<|im_end|>" and decode(first.rejected_ids) == "5, I think<|im_end|>"
    assert decode(train[1].chosen_ids) == "Paris<|im_end|>"  # the last message of a list
    assert decode(train[2].prompt_ids).startswith("<|im_start|>user\nName a colour.")  # a string prompt


def test_an_answer_that_names_a_role_is_cut_after_the_reply_header(workdir, demo_tokenizer, tmp_path):
    data = tmp_path / "roles.jsonl"
    data.write_text(json.dumps({"conversation": "Which role asks?", "chosen": "user", "rejected": "assistant"}) + "\n")
    cfg = config(workdir)
    cfg["datasets"][0]["path"] = str(data)
    (pair,), _, _ = build_datasets(TrainConfig.from_dict(cfg), demo_tokenizer)
    assert demo_tokenizer.decode(pair.chosen_ids) == "user<|im_end|>"
    assert demo_tokenizer.decode(pair.rejected_ids) == "assistant<|im_end|>"


def test_batches_hold_chosen_rows_then_rejected_rows(workdir, demo_tokenizer):
    cfg = TrainConfig.from_dict(config(workdir))
    train, _, _ = build_datasets(cfg, demo_tokenizer)
    (batch,) = pair_batches(train, micro_batch_size=3, sequence_len=128, pad_id=0, shuffle=False, seed=0, epoch=0)
    assert batch["num_examples"] == 3 and batch["input_ids"].shape[0] == 6
    for r, s in enumerate(train):
        for row, answer in ((r, s.chosen_ids), (r + 3, s.rejected_ids)):
            n = len(s.prompt_ids) + len(answer)
            assert batch["input_ids"][row, :n].tolist() == s.prompt_ids + answer
            assert batch["labels"][row, len(s.prompt_ids):n].tolist() == answer
            assert (batch["labels"][row, : len(s.prompt_ids)] == -100).all()
            assert (batch["labels"][row, n:] == -100).all() and batch["attention_mask"][row].sum() == n


def test_truncation_keeps_the_start_and_drops_pairs_without_an_answer():
    pair = PairSample([1, 2, 3], [4, 5, 6], [7], "x")
    cut = pair.truncated(5)
    assert (cut.chosen_ids, cut.rejected_ids) == ([4, 5], [7])
    assert pair.truncated(3) is None


@pytest.mark.parametrize("row, words", [
    ({"conversation": "hi", "rejected": "no"}, "row is missing 'chosen'"),
    ({"conversation": "hi", "chosen": "  ", "rejected": "no"}, "field 'chosen' has an empty answer"),
    ({"conversation": [{"role": "boss", "content": "x"}], "chosen": "a", "rejected": "b"}, "has role 'boss'"),
])
def test_bad_rows_name_the_file_line_and_field(workdir, demo_tokenizer, tmp_path, row, words):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    cfg = config(workdir)
    cfg["datasets"][0]["path"] = str(data)
    with pytest.raises(LorafitError, match=rf"bad.jsonl line 2: .*{words}"):
        build_datasets(TrainConfig.from_dict(cfg), demo_tokenizer)


@pytest.mark.parametrize("kind, row", [
    ("chat_template.argilla_chat", {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}],
                               "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go"}]}),
    ("chatml.intel", {"system": "Be brief.", "question": "Hi?", "chosen": "Hello", "rejected": "Go"}),
    ("passthrough", {"prompt": "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n",
                     "chosen": "Hello<|im_end|>", "rejected": "Go<|im_end|>"}),
])
def test_other_preference_types(workdir, demo_tokenizer, tmp_path, kind, row):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    cfg = config(workdir)
    cfg["datasets"] = [{"path": str(data), "type": kind}]
    (pair,), _, _ = build_datasets(TrainConfig.from_dict(cfg), demo_tokenizer)
    assert demo_tokenizer.decode(pair.prompt_ids).endswith("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert demo_tokenizer.decode(pair.chosen_ids) == "Hello<|im_end|>"
    assert demo_tokenizer.decode(pair.rejected_ids) == "Go<|im_end|>"


ARGILLA_ROW = {"system": "Be brief.", "prompt": "Hi?",
               "chosen": [{"role": "user", "content": "Hi? "}, {"role": "assistant", "content": "Hello"}],
               "rejected": [{"role": "user", "content": "Hi? "}, {"role": "assistant", "content": "Go"}]}


@pytest.mark.parametrize("rl, kind, prompt", [
    # ORPO's strategy: the row's system first, its prompt as the user turn (axolotl's ORPODatasetParsingStrategy)
    ("orpo", "chat_template.argilla", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"),
    # DPO's argilla_chat reads the conversations only; DPO has no argilla strategy of its own: it reads the same
    ("dpo", "chat_template.argilla_chat", "<|im_start|>user\nHi? <|im_end|>\n"),
    ("dpo", "chat_template.argilla", "<|im_start|>user\nHi? <|im_end|>\n"),
])
def test_argilla_strategies_read_system_and_prompt_as_axolotl_does(workdir, demo_tokenizer, tmp_path, rl, kind,
                                                                   prompt):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ARGILLA_ROW) + "\n")
    cfg = config(workdir, rl=rl)
    cfg["datasets"] = [{"path": str(data), "type": kind}]
    (pair,), _, _ = build_datasets(TrainConfig.from_dict(cfg), demo_tokenizer)
    text = demo_tokenizer.decode(pair.prompt_ids)
    assert text.endswith(prompt + "<|im_start|>assistant\n") and text.count("<|im_start|>") == prompt.count("<|im_start|>") + 1
    assert demo_tokenizer.decode(pair.chosen_ids) == "Hello<|im_end|>"


def test_orpo_argilla_keeps_a_longer_conversation_as_it_is(workdir, demo_tokenizer, tmp_path):
    """A row's prompt is the question of a one-turn conversation; in a longer one the turns stay (axolotl would
    put the first question in place of the one the answers reply to)."""
    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And times 3?"}]
    row = {"prompt": "What is 2+2?", "chosen": [*turns, {"role": "assistant", "content": "12"}],
           "rejected": [*turns, {"role": "assistant", "content": "7"}]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    cfg = config(workdir, rl="orpo")
    cfg["datasets"] = [{"path": str(data), "type": "chat_template.argilla"}]
    (pair,), _, _ = build_datasets(TrainConfig.from_dict(cfg), demo_tokenizer)
    text = demo_tokenizer.decode(pair.prompt_ids)
    assert text.count("What is 2+2?") == 1 and text.endswith("user\nAnd times 3?<|im_end|>\n<|im_start|>assistant\n")


# ---- the losses against TRL -------------------------------------------------------------------------------------
def lorafit_side(workdir, demo_tokenizer, **kw):
    """The trainer's model (lean kernels on, random B so the adapter moves the output) and one batch of 3 pairs."""
    cfg = TrainConfig.from_dict(config(workdir, **kw))
    model, _ = prepare_model(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in named_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 2.0)
    train, _, _ = build_datasets(cfg, demo_tokenizer)
    (batch,) = pair_batches(train, micro_batch_size=3, sequence_len=128, pad_id=demo_tokenizer.pad_token_id,
                            shuffle=False, seed=0, epoch=0)
    return cfg, model, train, batch


def lora_grads(named) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad.clone()
            for n, p in named if ".lora_" in n and p.grad is not None}


def copy_adapter(ours, theirs) -> None:
    state = {n: p for n, p in ours.named_parameters() if ".lora_" in n}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name and ".default." in name:
                p.copy_(state[name.removeprefix("base_model.model.").replace(".default.", ".")])


def assert_close_grads(ours: dict, theirs: dict) -> None:
    """Each LoRA gradient within fp32 rounding of the other (relative to its norm: both sum over a vocabulary's
    softmax in a different order)."""
    assert set(ours) == set(theirs) and len(ours) == 28
    worst = max(float((ours[n] - theirs[n]).norm() / theirs[n].norm()) for n in ours)
    assert worst < 1e-4


def test_dpo_loss_metrics_and_lora_grads_equal_trls(workdir, demo_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    cfg, model, train, batch = lorafit_side(workdir, demo_tokenizer)
    loss_module = PreferenceLoss(model, "dpo", beta=0.5)
    loss_sum, n = loss_module({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                              batch["labels"])
    (loss_sum / n).backward()
    ours = lora_grads(model.named_parameters())

    decode = demo_tokenizer.decode  # TRL reads the same texts; its tokenization must give our ids
    texts = Dataset.from_list([{"prompt": decode(s.prompt_ids), "chosen": decode(s.chosen_ids),
                                "rejected": decode(s.rejected_ids)} for s in train])
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.5, report_to="none", per_device_train_batch_size=3,
                         use_cpu=True, max_length=128)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32),
                             args=args, train_dataset=texts, processing_class=demo_tokenizer, peft_config=lora)
    for s, t in zip(train, trainer.train_dataset, strict=True):
        assert (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) == (s.prompt_ids, s.chosen_ids, s.rejected_ids)
    copy_adapter(model, trainer.model)
    inputs = trainer.data_collator(list(trainer.train_dataset))
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    torch.testing.assert_close(loss_sum / n, loss, rtol=1e-5, atol=1e-6)
    assert abs(float(loss.detach()) - 0.6931) > 0.01  # the adapter moved the policy away from the reference
    theirs = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        total, count = loss_module.stats[key]
        assert total / count == pytest.approx(theirs[key][-1], rel=1e-4, abs=1e-6), key
    assert_close_grads(ours, lora_grads(trainer.model.named_parameters()))


def test_orpo_loss_and_lora_grads_equal_trls(workdir, demo_tokenizer, tmp_path):
    pytest.importorskip("trl")
    orpo = pytest.importorskip("trl.experimental.orpo")
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    cfg, model, train, batch = lorafit_side(workdir, demo_tokenizer, rl="orpo", orpo_alpha=0.2)
    loss_module = PreferenceLoss(model, "orpo", beta=cfg.orpo_weight)
    loss_sum, n = loss_module({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                              batch["labels"])
    (loss_sum / n).backward()
    ours = lora_grads(model.named_parameters())

    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    copy_adapter(model, peft_model)
    texts = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    args = orpo.ORPOConfig(output_dir=str(tmp_path), beta=0.2, report_to="none", use_cpu=True, max_length=128)
    trainer = orpo.ORPOTrainer(model=peft_model, args=args, train_dataset=texts, processing_class=demo_tokenizer)
    mask = batch["attention_mask"]
    theirs_batch = {f"{side}_{key}": value[rows] for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None)))
                    for key, value in (("input_ids", batch["input_ids"]), ("attention_mask", mask),
                                       ("labels", batch["labels"]))}
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, theirs_batch)
    loss.backward()
    torch.testing.assert_close(loss_sum / n, loss, rtol=1e-5, atol=1e-6)
    for key in ("nll_loss", "log_odds_ratio", "rewards/chosen", "rewards/margins"):
        total, count = loss_module.stats[key]
        assert total / count == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
    assert_close_grads(ours, lora_grads(trainer.model.named_parameters()))


def test_dpo_reference_is_the_base_with_its_trained_modules_as_they_started(workdir, demo_tokenizer):
    """A fresh adapter gives loss ln 2 at once; after the policy moves (adapter and a module trained whole), the
    reference's log-probs are still the base model's."""
    import math

    cfg = TrainConfig.from_dict(config(workdir, lora_modules_to_save=["lm_head"]))
    model, _ = prepare_model(cfg)
    train, _, _ = build_datasets(cfg, demo_tokenizer)
    (batch,) = pair_batches(train, micro_batch_size=3, sequence_len=128, pad_id=0, shuffle=False, seed=0, epoch=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    loss_module = PreferenceLoss(model, "dpo", beta=0.1)
    loss, n = loss_module(inputs, batch["labels"])
    assert float(loss) / n == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    base = AutoBase(workdir)
    with reference(model, loss_module.originals):
        ref, _, _ = sequence_logps(model, inputs, batch["labels"], None, options_of(model))
    torch.testing.assert_close(ref, base.logps(inputs, batch["labels"]), rtol=1e-5, atol=1e-5)
    loss, n = loss_module(inputs, batch["labels"])
    assert abs(float(loss) / n - math.log(2)) > 1e-4


class AutoBase:
    """The untouched base model's summed answer log-probs, from plain transformers logits."""

    def __init__(self, workdir):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)

    @torch.no_grad()
    def logps(self, inputs, labels):
        logits = self.model(**inputs).logits[:, :-1].float()
        y = labels[:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        return (lp * (y != -100)).sum(1)


# ---- end to end -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rl", ["dpo", "orpo"])
def test_lorafit_train_on_pairs_lowers_the_loss_and_logs_rewards(workdir, tmp_path, rl, capsys):
    from lorafit.cli import main

    rows = ROWS * 4
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(workdir, rl=rl, max_steps=8, learning_rate=0.01, micro_batch_size=2, gradient_accumulation_steps=2,
                 lr_scheduler="constant", val_set_size=2, eval_steps=8, output_dir=str(tmp_path / "out"))
    cfg["datasets"][0]["path"] = str(tmp_path / "pairs.jsonl")
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yml")]) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert rows[-1]["rewards/accuracies"] == 1.0 and rows[-1]["rewards/margins"] > 0
    assert "eval_rewards/accuracies" in rows[-1] and "eval_loss" in rows[-1]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("keys", [{"adapter": "qlora", "load_in_4bit": True, "gradient_checkpointing": True},
                                  {"gradient_checkpointing": True, "lora_modules_to_save": ["lm_head"]},
                                  {"lora_init": "pissa"}])  # PiSSA moves W's top directions into B A: still ln 2
def test_dpo_over_a_4bit_base_and_with_checkpointing_starts_at_ln2_and_learns(workdir, tmp_path, keys):
    """A fresh adapter is its own reference (loss ln 2 at the first step) whatever the base and checkpointing."""
    import math

    from lorafit.train import train

    cfg = TrainConfig.from_dict(config(workdir, max_steps=4, learning_rate=0.02, micro_batch_size=1,
                                       gradient_accumulation_steps=3, lr_scheduler="constant",
                                       output_dir=str(tmp_path / "out"), **keys))
    rows = train(cfg).history
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0


def test_the_estimate_counts_two_sequences_per_pair(workdir):
    from lorafit.memory.settings import settings_from_config

    cfg = config(workdir, micro_batch_size=3)
    assert settings_from_config(TrainConfig.from_dict(cfg), "cpu").micro_batch == 6
    cfg.update(rl=None, datasets=[{"path": "x.jsonl", "type": "alpaca"}])
    assert settings_from_config(TrainConfig.from_dict(cfg), "cpu").micro_batch == 3
    cfg.update(rl="kto", datasets=[{"path": "x.jsonl", "type": "llama3.ultra"}])  # KL rows run without autograd
    assert settings_from_config(TrainConfig.from_dict(cfg), "cpu").micro_batch == 3


def test_the_estimate_counts_the_reference_copy_of_tables_trained_whole(workdir, tmp_path, capsys):
    """DPO's reference reads lm_head as it started: a frozen copy, in the weights and said in their formula; the
    CLI note says what the rows are and that answers are counted as filling the sequences."""
    from lorafit.cli import main
    from lorafit.memory.estimate import estimate
    from lorafit.memory.settings import settings_from_config
    from lorafit.memory.spec import resolve_spec

    spec = resolve_spec(str(workdir / "model"))
    cfg = config(workdir, lora_modules_to_save=["lm_head"])
    dpo = estimate(spec, settings_from_config(TrainConfig.from_dict(cfg), "cpu"))
    sft = estimate(spec, settings_from_config(TrainConfig.from_dict(
        {**cfg, "rl": None, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}), "cpu"))
    table = spec.vocab * spec.hidden * 4  # fp32 on a CPU
    assert dpo.component("weights").bytes - sft.component("weights").bytes == table
    assert "rl: dpo's reference reads" in dpo.component("weights").formula
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["estimate", "--config", str(tmp_path / "c.yaml"), "--cpu"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "a micro-batch of 3 pairs is 6 sequences" in out and "answers that fill each sequence" in out


def test_dpo_resumed_run_takes_the_steps_of_an_uninterrupted_one(workdir, tmp_path):
    """The reference after a resume is still the base (modules trained whole at their starting weights, not at
    the checkpoint's)."""
    from lorafit.train import train

    def run(out, **kw):
        cfg = config(workdir, max_steps=4, learning_rate=0.02, micro_batch_size=1, lr_scheduler="constant",
                     lora_modules_to_save=["lm_head"], output_dir=str(tmp_path / out))
        return train(TrainConfig.from_dict(cfg), **kw)

    whole = run("whole").history
    assert run("parts", stop_after=2).interrupted
    parts = run("parts", resume=True).history
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    for a, b in zip(whole, parts, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["rewards/margins"] == pytest.approx(
            a["rewards/margins"], rel=1e-4, abs=1e-7)


# ---- KTO --------------------------------------------------------------------------------------------------------
KTO_ROWS = [{"prompt": "What is 2+2?", "completion": "4", "label": True},
            {"prompt": "Capital of France?", "completion": "London, surely", "label": False, "system": "Be brief."},
            {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
            {"prompt": "Say hi.", "completion": "No.", "label": False}]


def kto_config(workdir: Path, data: Path, kind: str = "chatml.ultra", **kw) -> dict:
    data.write_text("".join(json.dumps(r) + "\n" for r in KTO_ROWS))
    return config(workdir, rl="kto", datasets=[{"path": str(data), "type": kind}], micro_batch_size=4, **kw)


def test_kto_rows_render_as_axolotl(workdir, demo_tokenizer, tmp_path):
    cfg = TrainConfig.from_dict(kto_config(workdir, tmp_path / "kto.jsonl", "llama3.ultra"))
    rows, _, report = build_datasets(cfg, demo_tokenizer)
    assert report.unit == "rows" and [r.desirable for r in rows] == [True, False, True, False]
    prompt = ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nCapital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # the completion starts where prompt and prompt + completion tokenize apart (here a merged newline), as TRL's
    assert prompt.startswith(demo_tokenizer.decode(rows[1].prompt_ids))
    assert demo_tokenizer.decode(rows[1].prompt_ids + rows[1].completion_ids) == \
        prompt + "London, surely<|eot_id|><|im_end|>"  # EOS appended, as TRL


@pytest.mark.parametrize("keys, words", [({"micro_batch_size": 1}, "set micro_batch_size to 2 or more"),
                                         ({"adapter": None}, "rl: kto with full fine-tuning")])
def test_bad_kto_configs(workdir, tmp_path, keys, words):
    with pytest.raises(LorafitError, match=words):
        TrainConfig.from_dict({k: v for k, v in {**kto_config(workdir, tmp_path / "k.jsonl"), **keys}.items()
                               if v is not None})


def test_kto_auto_micro_batch_never_picks_one(workdir, tmp_path):
    """micro_batch_size auto under KTO: at least 2 rows per micro-batch (its KL estimate pairs rows), even when the
    budget fits only 1; a batch_size of 1 is one line."""
    from lorafit.errors import LorafitError
    from lorafit.train.auto_batch import resolve_auto_batch

    for budget, total, want in ((10 * 2**30, 4, 4), (1000, 4, None), (10 * 2**30, 1, None)):
        keys = dict(kto_config(workdir, tmp_path / "kto.jsonl"), micro_batch_size="auto",
                    gradient_accumulation_steps="auto", batch_size=total, max_memory=budget)
        cfg = TrainConfig.from_dict(keys)
        if want:
            resolve_auto_batch(cfg, "float32")
            assert cfg.micro_batch_size == want
            continue
        with pytest.raises(LorafitError, match="even 2 sample" if total > 1 else "batch_size 2 or more"):
            resolve_auto_batch(cfg, "float32")


def test_kto_label_must_be_a_boolean(workdir, demo_tokenizer, tmp_path):
    cfg = TrainConfig.from_dict(kto_config(workdir, tmp_path / "kto.jsonl"))
    (tmp_path / "kto.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b", "label": "yes"}) + "\n")
    with pytest.raises(LorafitError, match=r"kto.jsonl line 1: chatml.ultra row field 'label' must be true"):
        build_datasets(cfg, demo_tokenizer)


def test_kto_loss_metrics_and_lora_grads_equal_trls(workdir, demo_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from lorafit.data.preference import kto_batches

    cfg = TrainConfig.from_dict(kto_config(workdir, tmp_path / "kto.jsonl", kto_desirable_weight=0.7))
    model, _ = prepare_model(cfg)
    rows, _, _ = build_datasets(cfg, demo_tokenizer)
    (batch,) = kto_batches(rows, micro_batch_size=4, sequence_len=128, pad_id=demo_tokenizer.pad_token_id,
                           shuffle=False, seed=0, epoch=0)
    # an adapter that made the completions likelier (so the batch's KL estimate is positive and takes part)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = causal_lm_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                 batch["labels"])
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    loss_module = PreferenceLoss(model, "kto", beta=0.5, weights=(0.7, 1.0))
    loss_sum, n = loss_module({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                              batch["labels"], desirable=batch["desirable"])
    (loss_sum / n).backward()
    ours = lora_grads(model.named_parameters())

    decode = demo_tokenizer.decode
    texts = Dataset.from_list([{"prompt": decode(r.prompt_ids), "completion": decode(r.completion_ids),
                                "label": r.desirable} for r in rows])
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.5, desirable_weight=0.7, report_to="none",
                         per_device_train_batch_size=4, use_cpu=True, max_length=128)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.KTOTrainer(model=AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32),
                             args=args, train_dataset=texts, processing_class=demo_tokenizer, peft_config=lora)
    for r, t in zip(rows, trainer.train_dataset, strict=True):
        assert (t["prompt_ids"], t["completion_ids"]) == (r.prompt_ids, r.completion_ids)
    copy_adapter(model, trainer.model)
    inputs = trainer.data_collator(list(trainer.train_dataset))
    assert torch.equal(inputs["input_ids"], batch["input_ids"][:4])
    assert torch.equal(inputs["KL_input_ids"], batch["input_ids"][4:, : inputs["KL_input_ids"].shape[1]])
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    torch.testing.assert_close(loss_sum / n, loss, rtol=1e-5, atol=1e-6)
    theirs = trainer._metrics["train"]
    assert theirs["kl"][-1] > 0  # the KL term takes part
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        total, count = loss_module.stats[key]
        assert total / count == pytest.approx(theirs[key][-1], rel=1e-4, abs=1e-6), key
    assert_close_grads(ours, lora_grads(trainer.model.named_parameters()))


def test_lorafit_train_kto_lowers_the_loss(workdir, tmp_path):
    from lorafit.train import train

    cfg = kto_config(workdir, tmp_path / "kto.jsonl", max_steps=6, learning_rate=0.01, lr_scheduler="constant",
                     output_dir=str(tmp_path / "out"))
    rows = train(TrainConfig.from_dict(cfg)).history
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/margins"] > 0 and "kl" in rows[-1]


def test_a_logging_window_averages_each_metric_over_the_steps_that_have_it():
    """KTO: a step whose rows are all desirable has no rewards/rejected; a window of such steps still logs."""
    from lorafit.train.recipe import logged

    base = {"loss": 1.0, "grad_norm": 1.0, "tokens_per_s": 1.0, "trained_tokens": 4}
    row = logged([{**base, "rewards/chosen": 0.5, "rewards/rejected": -0.5},
                  {**base, "rewards/chosen": 1.5}])
    assert row["rewards/chosen"] == 1.0 and row["rewards/rejected"] == -0.5 and row["logged_steps"] == 2


def test_a_continued_adapter_is_its_own_starting_reference(workdir, tmp_path):
    """lora_model_dir: the reference is the loaded adapter as it starts (TRL's "ref" copy), not the bare base, so a
    continued run starts at ln 2 too."""
    import math

    from lorafit.train import train

    first = config(workdir, max_steps=3, learning_rate=0.02, output_dir=str(tmp_path / "a"))
    assert train(TrainConfig.from_dict(first)).history[-1]["rewards/margins"] > 0
    again = {**first, "lora_model_dir": str(tmp_path / "a"), "output_dir": str(tmp_path / "b"), "max_steps": 1}
    assert train(TrainConfig.from_dict(again)).history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
@pytest.mark.ci
def test_two_ranks_of_dpo_equal_one_process_and_evaluate_with_an_idle_rank(workdir, tmp_path):
    """2 ranks × 1 pair = 1 process × 2 pairs (the loss is per pair of the whole step); the one eval batch leaves
    rank 1 idle, and the metrics are still reduced on both ranks (a rank with no batch used to skip the reduction)."""
    import os
    import subprocess
    import sys

    from lorafit.train import train

    rows = ROWS + ROWS[:2]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(out, **kw):
        c = config(workdir, max_steps=3, learning_rate=0.01, val_set_size=1, eval_steps=1, shared_prefix=False,
                   output_dir=str(tmp_path / out), **kw)
        c["datasets"][0]["path"] = str(tmp_path / "pairs.jsonl")
        return c

    (tmp_path / "two.yml").write_text(yaml.safe_dump(cfg("two", micro_batch_size=1)))
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(tmp_path / "two.yml"), "--nproc", "2"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LORAFIT_DIST_TIMEOUT": "120"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = train(TrainConfig.from_dict(cfg("one", micro_batch_size=2))).history
    for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5), key


def test_preprocess_shows_both_sequences_of_a_pair(workdir, demo_tokenizer):
    from rich.console import Console

    from lorafit.data.preview import show_samples

    console = Console(record=True, width=200)
    report = show_samples(TrainConfig.from_dict(config(workdir)), 1, console, tokenizer=demo_tokenizer)
    text = console.export_text()
    assert "line 1 (chosen)" in text and "line 1 (rejected)" in text and "5, I think" in text
    assert "train pairs: 3" in text and report.train_samples == 3


@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_lorafit_eval_scores_the_eval_split_with_the_preference_loss(workdir, tmp_path, rl, capsys):
    """lorafit eval on an rl config: the eval split is scored with the run's objective (reference: the adapter
    switched off), as training logged it; a continued adapter, whose starting point is not kept, is one line."""
    import yaml

    from lorafit.cli import main
    from lorafit.train import train

    out = tmp_path / "out"
    cfg = kto_config(workdir, tmp_path / "kto.jsonl", output_dir=str(out)) if rl == "kto" else \
        config(workdir, output_dir=str(out))
    cfg = {**cfg, "test_datasets": cfg["datasets"], "max_steps": 2, "learning_rate": 0.02}
    train(TrainConfig.from_dict(cfg))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "c.yaml"), "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["adapter"]["eval_loss"] < got["base"]["eval_loss"] == pytest.approx(0.6931 if rl == "dpo" else 0.5,
                                                                                  abs=1e-3)
    assert "eval_rewards/margins" in got["adapter"] and "per example" in capsys.readouterr().out
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump({**cfg, "lora_model_dir": str(out)}))
    assert main(["eval", str(tmp_path / "c2.yaml"), "--adapter", str(out)]) == 2
    assert "not kept after the run" in capsys.readouterr().err

