"""Data pipeline: formats and their label masks, loading every file type, bad rows, truncation, split."""

import copy
import csv
import json

import pytest

from lorafit.config import TrainConfig
from lorafit.data import IGNORE, build_datasets, split_samples
from lorafit.errors import LorafitError

ALPACA = [
    {"instruction": "Add two and two.", "input": "", "output": "Four."},
    {"instruction": "Greet the person.", "input": "Bob", "output": "Hello, Bob!"},
]
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, ds, **over):
    ds = ds if isinstance(ds, list) else [ds]
    return TrainConfig.from_dict({"base_model": "demo", "datasets": ds, **over}, config_dir=tmp_path)


def build(tmp_path, tok, ds, **over):
    return build_datasets(config(tmp_path, ds, **over), tok)


def trained_text(tok, sample):
    return tok.decode([x for x in sample.labels if x != IGNORE])


def test_alpaca_trains_output_and_eos(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, evals, report = build(tmp_path, tok, {"path": "a.jsonl", "type": "alpaca"})
    assert [trained_text(tok, s) for s in train] == ["Four.<|im_end|>", "Hello, Bob!<|im_end|>"]
    text0, text1 = tok.decode(train[0].input_ids), tok.decode(train[1].input_ids)
    assert text0.startswith("Below is an instruction that describes a task. Write a response")
    assert "### Instruction:\nAdd two and two.\n\n### Response:\nFour.<|im_end|>" in text0
    assert "### Input:\nBob\n\n### Response:\nHello, Bob!" in text1
    assert train[0].labels[-1] == tok.eos_token_id  # EOS is trained even though pad == eos
    assert report.rows_read == 2 and report.train_samples == 2 and not evals
    assert report.trained_tokens == sum(s.num_trained for s in train)


def test_alpaca_train_on_inputs(tmp_path, demo_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
    train, _, _ = build(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca"}, train_on_inputs=True)
    assert train[0].labels == train[0].input_ids


def test_chat_template_trains_assistant_turns_with_end_of_turn(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    write_jsonl(tmp_path / "c.jsonl", [CHAT])
    (s,), _, _ = build(tmp_path, tok, {"path": "c.jsonl", "type": "chat_template"})
    assert s.input_ids == tok.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True)["input_ids"]
    # each trained run is exactly one assistant answer + <|im_end|>; headers, user and system are masked
    runs, cur = [], []
    for i, lab in zip(s.input_ids, s.labels, strict=True):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    assert runs == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]


@pytest.mark.parametrize("mode, expected", [
    (None, "Hello!<|im_end|>Goodbye.<|im_end|>"),
    ("turn", "Hello!<|im_end|>Goodbye.<|im_end|>"),
    ("last", "Hello!Goodbye.<|im_end|>"),
    ("none", "Hello!Goodbye."),
    # every end of turn, the system's and user's too (the one after each header is not an end of turn)
    ("all", "<|im_end|><|im_end|>Hello!<|im_end|><|im_end|>Goodbye.<|im_end|>"),
])
def test_chat_template_train_on_eos(tmp_path, demo_tokenizer, mode, expected):
    write_jsonl(tmp_path / "c.jsonl", [CHAT])
    (s,), _, _ = build(tmp_path, demo_tokenizer, {"path": "c.jsonl", "type": "chat_template", "train_on_eos": mode})
    assert trained_text(demo_tokenizer, s) == expected


def test_chat_options_system_message_eot_tokens_and_top_level_train_on_eos(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    write_jsonl(tmp_path / "c.jsonl", [CHAT])
    entry = {"path": "c.jsonl", "type": "chat_template"}
    (s,), _, _ = build(tmp_path, tok, {**entry, "drop_system_message": True}, train_on_inputs=True)
    assert "Be brief" not in tok.decode(s.input_ids) and trained_text(tok, s).startswith("Hi there")
    no_system = {"messages": CHAT["messages"][1:]}
    write_jsonl(tmp_path / "n.jsonl", [no_system])
    (s,), _, _ = build(tmp_path, tok, {"path": "n.jsonl", "type": "chat_template"}, default_system_message="Be kind.")
    assert "<|im_start|>system\nBe kind.<|im_end|>" in tok.decode(s.input_ids)
    (s,), _, _ = build(tmp_path, tok, entry, default_system_message="Be kind.")  # a row's own system message wins
    assert "Be kind" not in tok.decode(s.input_ids)
    # the config's train_on_eos is every entry's default; an entry's own value wins
    (s,), _, _ = build(tmp_path, tok, entry, train_on_eos="none")
    assert trained_text(tok, s) == "Hello!Goodbye."
    (s,), _, _ = build(tmp_path, tok, {**entry, "train_on_eos": "turn"}, train_on_eos="none")
    assert trained_text(tok, s) == "Hello!<|im_end|>Goodbye.<|im_end|>"
    # eot_tokens: another end of turn ("\n" closes nothing in ChatML, so it only shows with train_on_eos all)
    (s,), _, _ = build(tmp_path, tok, entry, eot_tokens=["<|endoftext|>"], train_on_eos="all")
    assert trained_text(tok, s).count("<|im_end|>") == 5
    with pytest.raises(LorafitError, match="eot_tokens.*not a token"):
        build(tmp_path, tok, entry, eot_tokens=["<|no-such-token|>"])


def test_chat_template_train_on_inputs_and_per_message_override(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    row = json.loads(json.dumps(CHAT))
    row["messages"][2]["train"] = False
    write_jsonl(tmp_path / "c.jsonl", [row])
    (s,), _, _ = build(tmp_path, tok, {"path": "c.jsonl", "type": "chat_template"})
    assert trained_text(tok, s) == "Goodbye.<|im_end|>"
    write_jsonl(tmp_path / "c2.jsonl", [CHAT])
    (s,), _, _ = build(tmp_path, tok, {"path": "c2.jsonl", "type": "chat_template"}, train_on_inputs=True)
    assert trained_text(tok, s) == "Be brief.<|im_end|>Hi there<|im_end|>Hello!<|im_end|>Bye<|im_end|>Goodbye.<|im_end|>"


def test_chat_template_sharegpt_fields_and_named_template(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    row = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    write_jsonl(tmp_path / "c.jsonl", [row])
    ds = {"path": "c.jsonl", "type": "chat_template", "field_messages": "conversations",
          "message_field_role": "from", "message_field_content": "value"}
    (s,), _, _ = build(tmp_path, tok, ds, chat_template="chatml")
    assert tok.decode(s.input_ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert trained_text(tok, s) == "4<|im_end|>"


def test_completion_and_input_output(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    write_jsonl(tmp_path / "t.jsonl", [{"body": "Once upon a time"}])
    (s,), _, _ = build(tmp_path, tok, {"path": "t.jsonl", "type": "completion", "field": "body"})
    assert tok.decode(s.input_ids) == "Once upon a time<|im_end|>" and s.labels == s.input_ids
    segs = {"segments": [{"text": "Q: hi\n", "label": False}, {"text": "A: yo<|im_end|>", "label": True}]}
    write_jsonl(tmp_path / "io.jsonl", [segs])
    (s,), _, _ = build(tmp_path, tok, {"path": "io.jsonl", "type": "input_output"})
    assert tok.decode(s.input_ids) == "Q: hi\nA: yo<|im_end|>"
    assert trained_text(tok, s) == "A: yo<|im_end|>"


def test_all_file_types_load(tmp_path, demo_tokenizer):
    pytest.importorskip("pyarrow")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    with open(tmp_path / "a.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA)
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "a.parquet")
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "part1.jsonl", ALPACA)
    expected, _, _ = build(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca"})
    for path in ["a.json", "a.csv", "a.parquet", "saved", "saved_dict", "folder"]:
        got, _, _ = build(tmp_path, demo_tokenizer, {"path": path, "type": "alpaca"})
        assert [s.input_ids for s in got] == [s.input_ids for s in expected], path
        assert [s.labels for s in got] == [s.labels for s in expected], path


def test_missing_field_names_file_and_line(tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rows = [ALPACA[0]] * 16 + [{"instruction": "x", "input": "y"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with pytest.raises(LorafitError) as exc:
        build(tmp_path, demo_tokenizer, {"path": "data/train.jsonl", "type": "alpaca"})
    assert str(exc.value).startswith("data/train.jsonl line 17: alpaca row is missing 'output' (has: instruction, input)")


def test_bad_json_line_and_skip_bad_rows(tmp_path, demo_tokenizer):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(ALPACA[0]) + "\n{not json\n" + json.dumps({"instruction": "x"}) + "\n"
                 + json.dumps(ALPACA[1]) + "\n")
    ds = {"path": str(p), "type": "alpaca"}
    with pytest.raises(LorafitError, match=r"a\.jsonl line 2: invalid JSON"):
        build(tmp_path, demo_tokenizer, ds)
    train, _, report = build(tmp_path, demo_tokenizer, ds, skip_bad_rows=True)
    assert len(train) == 2 and report.bad_rows_skipped == 2 and report.rows_read == 4
    assert "line 3" in report.bad_row_examples[1]


def test_missing_dataset_path_names_key(tmp_path, demo_tokenizer):
    with pytest.raises(LorafitError) as exc:
        build(tmp_path, demo_tokenizer, [{"path": "nope.jsonl", "type": "alpaca"}])
    msg = str(exc.value)
    assert "datasets[0].path" in msg and "nope.jsonl" in msg and "\n" not in msg


def test_truncation_keeps_mask_aligned_and_drops_untrained(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    long_answer = {"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(60))}
    write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], long_answer])
    full, _, _ = build(tmp_path, tok, {"path": "a.jsonl", "type": "alpaca"})
    prompt_len = full[1].labels.index(next(x for x in full[1].labels if x != IGNORE))
    seq = prompt_len + 10
    train, _, report = build(tmp_path, tok, {"path": "a.jsonl", "type": "alpaca"}, sequence_len=seq)
    short, cut = train
    assert short.input_ids == full[0].input_ids  # untouched
    assert cut.input_ids == full[1].input_ids[:seq] and cut.labels == full[1].labels[:seq]
    assert report.truncated == 1 and report.dropped_by_truncation == 0
    # a sequence_len that ends inside every prompt leaves nothing trained: all dropped, and said so
    write_jsonl(tmp_path / "b.jsonl", [long_answer, ALPACA[1]])
    with pytest.raises(LorafitError, match="dropped"):
        build(tmp_path, tok, {"path": "b.jsonl", "type": "alpaca"}, sequence_len=20)
    write_jsonl(tmp_path / "t.jsonl", [{"text": "short"}])
    two = [{"path": "b.jsonl", "type": "alpaca"}, {"path": "t.jsonl", "type": "completion"}]
    # both alpaca rows keep only (part of) their prompts and are dropped; the short completion stays
    train, _, report = build(tmp_path, tok, two, sequence_len=prompt_len)
    assert len(train) == 1 and report.dropped_by_truncation == 2 and report.rows_read == 3
    assert tok.decode(train[0].input_ids) == "short<|im_end|>"


def test_val_split_is_seeded_and_test_datasets(tmp_path, demo_tokenizer):
    rows = [{"text": f"row {i}"} for i in range(20)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    ds = {"path": "t.jsonl", "type": "completion"}
    a_train, a_eval, rep = build(tmp_path, demo_tokenizer, ds, val_set_size=0.2)
    b_train, b_eval, _ = build(tmp_path, demo_tokenizer, ds, val_set_size=0.2)
    assert len(a_eval) == 4 and len(a_train) == 16 and rep.eval_samples == 4
    assert [s.source for s in a_eval] == [s.source for s in b_eval]
    _, c_eval, _ = build(tmp_path, demo_tokenizer, ds, val_set_size=0.2, seed=7)
    assert [s.source for s in c_eval] != [s.source for s in a_eval]
    _, d_eval, _ = build(tmp_path, demo_tokenizer, ds, val_set_size=3)
    assert len(d_eval) == 3
    train, evals, _ = build(tmp_path, demo_tokenizer, ds, test_datasets=[ds])
    assert len(train) == 20 and len(evals) == 20
    assert split_samples(train, 0, 1) == (train, [])


def test_chat_template_edge_cases(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "Again"}, {"role": "assistant", "content": " Sure. "}]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": convo}])
    ds = {"path": "c.jsonl", "type": "chat_template"}
    (s,), _, _ = build(tmp_path, tok, ds, chat_template="chatml")
    assert trained_text(tok, s) == "<|im_end|> Sure. <|im_end|>"  # empty answer: only its end of turn
    # a template that trims content and marks the last turn (so partial renders are not prefixes)
    tpl = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}"
           "{% if loop.last %} [END]{% endif %}<|im_end|>\n{% endfor %}")
    (s,), _, _ = build(tmp_path, tok, ds, chat_template=tpl)
    assert tok.decode(s.input_ids).endswith("<|im_start|>assistant\nSure. [END]<|im_end|>\n")
    assert trained_text(tok, s).endswith("Sure. [END]<|im_end|>")
    assert "Again" not in trained_text(tok, s) and "user" not in trained_text(tok, s)
    # a jinja file next to the config
    (tmp_path / "t.jinja").write_text(tpl)
    (s2,), _, _ = build(tmp_path, tok, ds, chat_template="t.jinja")
    assert s2.input_ids == s.input_ids
    with pytest.raises(LorafitError, match="chat_template"):
        build(tmp_path, tok, ds, chat_template="vicuna")


def test_chat_template_bad_rows(tmp_path, demo_tokenizer):
    rows = [{"messages": [{"role": "user"}]}, {"msgs": []}, {"messages": [{"role": "user", "content": 3}]}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    ds = {"path": "c.jsonl", "type": "chat_template"}
    with pytest.raises(LorafitError, match=r"c\.jsonl line 1: messages\[0\] needs 'role' and 'content'"):
        build(tmp_path, demo_tokenizer, ds)
    write_jsonl(tmp_path / "c.jsonl", rows + [CHAT])
    train, _, report = build(tmp_path, demo_tokenizer, ds, skip_bad_rows=True)
    assert len(train) == 1 and report.bad_rows_skipped == 3
    assert "line 2: chat_template row needs a non-empty list 'messages' (has: msgs)" in report.bad_row_examples[1]


def test_show_samples_highlights_trained_text(tmp_path, demo_tokenizer):
    from rich.console import Console

    from lorafit.data.preview import render_sample, show_samples

    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    cfg = config(tmp_path, {"path": "a.jsonl", "type": "alpaca"}, wandb_project="x")
    console = Console(record=True, width=100, force_terminal=True)
    report = show_samples(cfg, 1, console, tokenizer=demo_tokenizer)
    out = console.export_text()
    assert "Four.<|im_end|>" in out and "rows read: 2" in out and "wandb_project: ignored" in out
    assert report.train_samples == 2
    (s, _), _, _ = build(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca"})
    spans = render_sample(s, demo_tokenizer).spans
    green = [str(render_sample(s, demo_tokenizer))[sp.start : sp.end] for sp in spans if "green" in str(sp.style)]
    assert green == ["Four.<|im_end|>"]


# ---- axolotl's chat options: chat_template_kwargs, message_field_training, train_on_eot, split_thinking ---------
def masked_tokens(tok, sample):
    """(token, trained) for every token of the sample: the mask token by token."""
    assert all(lab in (IGNORE, i) for i, lab in zip(sample.input_ids, sample.labels, strict=True))
    return [(tok.decode([i]), lab != IGNORE) for i, lab in zip(sample.input_ids, sample.labels, strict=True)]


def test_chat_template_kwargs_reach_the_template(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    tpl = ("{% if greeting is defined %}<|im_start|>system\n{{ greeting }}<|im_end|>\n{% endif %}"
           "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    msgs = CHAT["messages"][1:3]
    write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (s,), _, _ = build(tmp_path, tok, {"path": "c.jsonl", "type": "chat_template"}, chat_template=tpl,
                       chat_template_kwargs={"greeting": "Welcome."})
    want = tok.apply_chat_template(msgs, chat_template=tpl, tokenize=True, return_dict=True, greeting="Welcome.")
    assert s.input_ids == want["input_ids"] and "system\nWelcome.<|im_end|>" in tok.decode(s.input_ids)
    assert trained_text(tok, s) == "Hello!<|im_end|>"


def test_message_field_training_names_the_per_message_flag(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    row = json.loads(json.dumps(CHAT))
    row["messages"][2]["weight"] = False  # the first answer is not trained
    row["messages"][1]["weight"] = True  # a user turn is
    row["messages"][4]["train"] = False  # "train" is not read once message_field_training names another field
    write_jsonl(tmp_path / "c.jsonl", [row])
    entry = {"path": "c.jsonl", "type": "chat_template", "message_field_training": "weight"}
    (s,), _, _ = build(tmp_path, tok, entry)
    assert trained_text(tok, s) == "Hi there<|im_end|>Goodbye.<|im_end|>"
    row["messages"][2]["weight"] = "no"
    write_jsonl(tmp_path / "c.jsonl", [row])
    with pytest.raises(LorafitError, match=r"messages\[2\]\.weight must be true or false"):
        build(tmp_path, tok, entry)


# each turn ends with an end-of-turn token that is not EOS (<|endoftext|>); assistant turns then with EOS too
EOT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>"
                "{% if m.role == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}")


@pytest.mark.parametrize("eos, eot, expected", [
    ("turn", None, "Hello!<|endoftext|><|im_end|>Goodbye.<|endoftext|><|im_end|>"),  # train_on_eot: train_on_eos's
    ("none", "turn", "Hello!<|endoftext|>Goodbye.<|endoftext|>"),
    ("turn", "none", "Hello!<|im_end|>Goodbye.<|im_end|>"),
    ("turn", "last", "Hello!<|im_end|>Goodbye.<|endoftext|><|im_end|>"),
    ("last", "turn", "Hello!<|endoftext|>Goodbye.<|endoftext|><|im_end|>"),
    ("none", "all", "<|endoftext|><|endoftext|>Hello!<|endoftext|><|endoftext|>Goodbye.<|endoftext|>"),
])
def test_train_on_eot_and_train_on_eos_choose_their_own_tokens(tmp_path, demo_tokenizer, eos, eot, expected):
    tok = demo_tokenizer
    write_jsonl(tmp_path / "c.jsonl", [CHAT])
    entry = {"path": "c.jsonl", "type": "chat_template", "train_on_eos": eos, "train_on_eot": eot}
    (s,), _, _ = build(tmp_path, tok, entry, chat_template=EOT_TEMPLATE, eot_tokens=["<|endoftext|>"])
    assert trained_text(tok, s) == expected
    if (eos, eot) == ("turn", "last"):  # token by token, the last turn: header masked, answer + EOT + EOS trained
        mask = masked_tokens(tok, s)
        turn = mask[max(i for i, (t, _) in enumerate(mask) if t == "<|im_start|>"):]
        assert "".join(t for t, _ in turn).rstrip("\n") == "<|im_start|>assistant\nGoodbye.<|endoftext|><|im_end|>"
        if turn[-1] == ("\n", False):  # ChatML's newline after the turn, never trained
            turn = turn[:-1]
        header = next(i for i, (t, _) in enumerate(turn) if t.startswith("Good"))
        assert [f for _, f in turn] == [False] * header + [True] * (len(turn) - header)


def test_eos_listed_in_eot_tokens_needs_one_choice(tmp_path, demo_tokenizer):
    write_jsonl(tmp_path / "c.jsonl", [CHAT])
    entry = {"path": "c.jsonl", "type": "chat_template", "train_on_eos": "turn", "train_on_eot": "none"}
    with pytest.raises(LorafitError, match="eot_tokens lists the EOS token.*must agree"):
        build(tmp_path, demo_tokenizer, entry, eot_tokens=["<|im_end|>"])


THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>\n"
                  "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}")


def test_split_thinking_moves_reasoning_to_the_template_and_trains_it(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "<think> add two and two </think>\n Four."}]}
    write_jsonl(tmp_path / "c.jsonl", [row])
    entry = {"path": "c.jsonl", "type": "chat_template", "split_thinking": True}
    (s,), _, _ = build(tmp_path, tok, entry, chat_template=THINK_TEMPLATE)
    split = [row["messages"][0], {"role": "assistant", "content": "Four.", "reasoning_content": "add two and two"}]
    want = tok.apply_chat_template(split, chat_template=THINK_TEMPLATE, tokenize=True, return_dict=True)
    assert s.input_ids == want["input_ids"]
    # trained from the template's <think> block (where the message first differs from placeholder content)
    assert trained_text(tok, s) == "<think>\nadd two and two\n</think>\n\nFour.<|im_end|>"
    mask = masked_tokens(tok, s)
    first = next(i for i, (_, trained) in enumerate(mask) if trained)
    assert "".join(t for t, _ in mask[:first]).endswith("<|im_start|>assistant\n")
    # without split_thinking the content is rendered as written, and trained as content
    (s,), _, _ = build(tmp_path, tok, {**entry, "split_thinking": False}, chat_template=THINK_TEMPLATE)
    assert trained_text(tok, s) == "<think> add two and two </think>\n Four.<|im_end|>"


# axolotl's AlpacaPrompter styles, written out from its prompters.py (system prompt, then the turn)
AXOLOTL_ALPACA_CHAT = ("SYSTEM: Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n"
                       "USER: Greet the person.\nBob\nASSISTANT:")
AXOLOTL_ALPACA_CHATML_NO_INPUT = ("<|im_start|>system\nBelow is an instruction that describes a task. Write a "
                                  "response that appropriately completes the request.<|im_end|>\n"
                                  "<|im_start|>user\nAdd two and two.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("kind, row, prompt", [
    ("alpaca:chat", ALPACA[1], AXOLOTL_ALPACA_CHAT),
    ("alpaca_chat", ALPACA[1], AXOLOTL_ALPACA_CHAT),  # axolotl's alpaca_chat strategy: the same prompter
    ("alpaca:chatml", ALPACA[0], AXOLOTL_ALPACA_CHATML_NO_INPUT),
])
def test_alpaca_prompt_styles_are_axolotls(tmp_path, demo_tokenizer, kind, row, prompt):
    """Prompt ids then answer + EOS, only the answer + EOS trained: token by token, axolotl's layout."""
    tok = demo_tokenizer
    write_jsonl(tmp_path / "a.jsonl", [row])
    (s,), _, _ = build(tmp_path, tok, {"path": "a.jsonl", "type": kind})
    prompt_ids = tok(prompt)["input_ids"]  # axolotl tokenizes the prompt with the tokenizer's special tokens
    answer_ids = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert s.input_ids == prompt_ids + answer_ids
    assert s.labels == [IGNORE] * len(prompt_ids) + answer_ids


def test_alpaca_instruct_style_is_type_alpaca_and_unknown_styles_are_one_line(tmp_path, demo_tokenizer):
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    plain, _, _ = build(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca"})
    for alias in ("alpaca:instruct", "alpaca_instruct"):
        same, _, _ = build(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": alias})
        assert [s.input_ids for s in same] == [s.input_ids for s in plain]
    with pytest.raises(LorafitError, match=r"datasets\[0\]\.type.*alpaca:chat"):
        config(tmp_path, {"path": "a.jsonl", "type": "alpaca:reflect"})


def test_dataset_exact_deduplication_keeps_the_first_of_equal_samples(tmp_path, demo_tokenizer):
    tok = demo_tokenizer
    rows = [ALPACA[0], ALPACA[1], ALPACA[0], {**ALPACA[0], "output": "4."}, ALPACA[1]]
    write_jsonl(tmp_path / "a.jsonl", rows)
    entry = {"path": "a.jsonl", "type": "alpaca"}
    train, _, report = build(tmp_path, tok, entry, dataset_exact_deduplication=True)
    assert [trained_text(tok, s) for s in train] == ["Four.<|im_end|>", "Hello, Bob!<|im_end|>", "4.<|im_end|>"]
    assert report.duplicates_dropped == 2 and "exact duplicates" in report.summary()
    assert [s.source.rsplit(" ", 1)[-1] for s in train] == ["1", "2", "4"]  # the first of each, in file order
    assert len(build(tmp_path, tok, entry)[0]) == 5  # off by default


def test_a_reasoning_field_is_rendered_by_the_template_and_trained(tmp_path, demo_tokenizer):
    """axolotl passes a message's reasoning (field_thinking, else reasoning_content) to the template; the trained
    span starts at the rendered reasoning, as with split_thinking."""
    tok = demo_tokenizer
    answer = {"role": "assistant", "content": "Four.", "reasoning_content": "add two and two"}
    row = {"messages": [{"role": "user", "content": "2+2?"}, answer]}
    write_jsonl(tmp_path / "c.jsonl", [row])
    (s,), _, _ = build(tmp_path, tok, {"path": "c.jsonl", "type": "chat_template"}, chat_template=THINK_TEMPLATE)
    want = tok.apply_chat_template(row["messages"], chat_template=THINK_TEMPLATE, tokenize=True, return_dict=True)
    assert s.input_ids == want["input_ids"]
    assert trained_text(tok, s) == "<think>\nadd two and two\n</think>\n\nFour.<|im_end|>"
    renamed = {"messages": [row["messages"][0], {"role": "assistant", "content": "Four.", "why": "add two and two"}]}
    write_jsonl(tmp_path / "r.jsonl", [renamed])
    (r,), _, _ = build(tmp_path, tok, {"path": "r.jsonl", "type": "chat_template", "field_thinking": "why"},
                       chat_template=THINK_TEMPLATE)
    assert r.input_ids == s.input_ids and r.labels == s.labels
    renamed["messages"][1]["why"] = 7
    write_jsonl(tmp_path / "r.jsonl", [renamed])
    with pytest.raises(LorafitError, match=r"messages\[1\]\.why must be a string"):
        build(tmp_path, tok, {"path": "r.jsonl", "type": "chat_template", "field_thinking": "why"},
              chat_template=THINK_TEMPLATE)


def test_axolotls_template_names(tmp_path, demo_tokenizer):
    """chatml and llama3 are lorafit's own templates; another of axolotl's names is the tokenizer's own template
    (with a notice), and an error when the tokenizer has none."""
    from lorafit.config.keys import CHAT_TEMPLATE_NAMES
    from lorafit.data.chat import CHATML

    tok = demo_tokenizer
    assert {"chatml", "llama3", "qwen3", "qwen3_5", "gemma3", "llama4", "falcon_h1", "qwen_25"} <= set(CHAT_TEMPLATE_NAMES)
    write_jsonl(tmp_path / "c.jsonl", [CHAT])
    own = tok.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=True)["input_ids"]
    (s,), _, _ = build(tmp_path, tok, {"path": "c.jsonl", "type": "chat_template"}, chat_template="chatml")
    assert s.input_ids == tok.apply_chat_template(CHAT["messages"], chat_template=CHATML, tokenize=True,
                                                  return_dict=True)["input_ids"]
    assert trained_text(tok, s) == "Hello!<|im_end|>Goodbye.<|im_end|>"
    for name in ("qwen_25", "tokenizer_default_fallback_llama3"):
        (s,), _, _ = build(tmp_path, tok, {"path": "c.jsonl", "type": "chat_template"}, chat_template=name)
        assert s.input_ids == own
    notices = config(tmp_path, {"path": "c.jsonl", "type": "chat_template"}, chat_template="qwen_25").notices
    assert any("the tokenizer's own chat template is used" in n for n in notices)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(LorafitError, match=r"qwen3 names the chat template of a model family.*this tokenizer has none"):
        build(tmp_path, bare, {"path": "c.jsonl", "type": "chat_template"}, chat_template="qwen3")


def test_an_unknown_template_name_stops_at_config_load(tmp_path):
    with pytest.raises(LorafitError, match=r"key 'chat_template': got 'qwen4'.*did you mean qwen3"):
        config(tmp_path, {"path": "c.jsonl", "type": "chat_template"}, chat_template="qwen4")
    (tmp_path / "mytemplate").write_text("{{ messages }}")  # a file of that name in the config's folder is fine
    assert config(tmp_path, {"path": "c.jsonl", "type": "chat_template"}, chat_template="mytemplate")
