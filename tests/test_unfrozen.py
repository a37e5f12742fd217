"""axolotl's unfrozen_parameters: full fine-tuning of the parameters its patterns select, the rest frozen."""

from __future__ import annotations

import pytest
import torch
from conftest import save_repeat_twice, tiny_causal_lm
from test_train import config
from transformers import LlamaForCausalLM

from lorafit import LorafitError
from lorafit.config import TrainConfig
from lorafit.config.unfrozen import Pattern
from lorafit.train import train
from lorafit.train.freeze import freeze_except


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return save_repeat_twice(tmp_path_factory.mktemp("unfrozen"), copies=6)


@pytest.mark.parametrize("raw, name, hit", [
    ("^model.layers.1.mlp", "model.layers.1.mlp.up_proj.weight", True),
    ("^model.layers.1.mlp", "model.layers.11.mlp.up_proj.weight", False),  # the dot is literal: no "1x"
    ("^model.layers.1.mlp", "model.layers.1xmlp.up_proj.weight", False),
    ("layers.[0-9]+.self_attn.q_proj", "model.layers.12.self_attn.q_proj.weight", False),  # re.match: from the start
    ("model.layers.[0-9]+.self_attn.q_proj", "model.layers.12.self_attn.q_proj.weight", True),
    ("^lm_head.*", "lm_head.weight", True),
])
def test_patterns_read_as_axolotl_reads_them(raw, name, hit):
    """A dot is literal unless ``+`` follows it, and a pattern matches from the start of the name."""
    assert bool(Pattern.parse(raw).regex.match(name)) is hit


def test_row_ranges_as_axolotl_reads_them():
    assert Pattern.parse("^model.embed_tokens.weight$[32000:]").rows(32010) == (32000, 32010)
    assert Pattern.parse("w[:5]").rows(8) == (0, 5) and Pattern.parse("w[3]").rows(8) == (3, 4)
    assert Pattern.parse("w[2:6]").rows(8) == (2, 6) and Pattern.parse("w").rows(8) is None
    with pytest.raises(ValueError, match="end must be greater"):
        Pattern.parse("w[6:2]")
    with pytest.raises(LorafitError, match="do not fit"):
        Pattern.parse("w[4:20]").rows(8)


def test_only_the_selected_parameters_and_rows_get_gradients():
    model = tiny_causal_lm()
    trained = freeze_except(model, ["^model.layers.1.mlp.down_proj", "^model.embed_tokens.weight$[10:20]"])
    assert trained == ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    emb = model.model.embed_tokens.weight.grad
    assert emb[:10].abs().sum() == 0 and emb[20:].abs().sum() == 0
    assert model.model.layers[1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_a_tied_head_matches_under_either_name():
    model = tiny_causal_lm()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as small models ship
    assert freeze_except(model, ["^lm_head"]) == ["model.embed_tokens.weight"]
    assert model.lm_head.weight.requires_grad


def test_no_match_is_one_line_naming_how_names_look():
    with pytest.raises(LorafitError, match="no parameter of the model matches; names look like 'model.embed_tokens"):
        freeze_except(tiny_causal_lm(), ["^transformer.h"])


def test_a_bad_pattern_is_refused_when_the_config_loads(workdir):
    with pytest.raises(LorafitError, match="unfrozen_parameters"):
        TrainConfig.from_dict(config(workdir, "bad", adapter=None, unfrozen_parameters=["^model.layers.(1"]))


def test_with_an_adapter_it_is_ignored_with_a_notice(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "lora", unfrozen_parameters=["^model.language_model.*", "^lm_head.*"]))
    assert any(n.startswith("unfrozen_parameters: ignored with an adapter") for n in cfg.notices)


def test_full_finetuning_moves_only_the_selected_parameters(workdir):
    cfg = TrainConfig.from_dict(config(workdir, "part", adapter=None, max_steps=3, learning_rate=1e-3,
                                       unfrozen_parameters=["^model.layers.1.self_attn", "^lm_head"]))
    train(cfg)
    before = LlamaForCausalLM.from_pretrained(workdir / "model").state_dict()
    saved = LlamaForCausalLM.from_pretrained(workdir / "part" / "model").state_dict()
    moved = {k for k in before if not torch.equal(before[k], saved[k])}
    assert moved and all(k.startswith(("model.layers.1.self_attn.", "lm_head.")) for k in moved)
    assert {k for k in moved if "self_attn" in k} == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}
