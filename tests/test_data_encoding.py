"""Data files in any encoding, and chat roles: every mistake is one line naming file, line and fix."""

import codecs
import json
import random

import pytest

from lorafit.config import TrainConfig
from lorafit.data import build_datasets
from lorafit.errors import LorafitError

ROWS = [
    {"instruction": "Add two and two.", "input": "", "output": "Four."},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Name a drink.", "input": "", "output": "Café crème."},
]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
CSV = "instruction,input,output\r\n" + "".join(f"{r['instruction']},,{r['output']}\r\n" for r in ROWS)
LATIN1_BYTE = JSONL.encode("utf-8").index("é".encode())  # where é sits when the file is Latin-1 (all before is ASCII)
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # messages name files relative to the working folder


def build(tmp_path, tok, ds, **over):
    cfg = TrainConfig.from_dict({"base_model": "demo", "datasets": [ds], **over}, source="cfg.yml",
                                config_dir=tmp_path)
    return build_datasets(cfg, tok)


def error(tmp_path, tok, ds, **over) -> str:
    with pytest.raises(LorafitError) as exc:
        build(tmp_path, tok, ds, **over)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(("name", "text"), [("a.jsonl", JSONL), ("a.json", json.dumps(ROWS)), ("a.csv", CSV)])
def test_utf8_with_bom_reads_as_without(tmp_path, demo_tokenizer, name, text):
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / name).write_bytes(text.encode())
    (tmp_path / "bom" / name).write_bytes(codecs.BOM_UTF8 + text.encode())
    plain, _, _ = build(tmp_path, demo_tokenizer, {"path": f"plain/{name}", "type": "alpaca"})
    bom, _, _ = build(tmp_path, demo_tokenizer, {"path": f"bom/{name}", "type": "alpaca"})
    assert len(bom) == 3 and [s.input_ids for s in bom] == [s.input_ids for s in plain]
    assert [s.source.split("/")[1] for s in bom] == [s.source.split("/")[1] for s in plain]  # same lines/rows


def test_bom_keeps_line_numbers(tmp_path, demo_tokenizer):
    (tmp_path / "a.jsonl").write_bytes(codecs.BOM_UTF8 + (json.dumps(ROWS[0]) + "\n{oops\n").encode())
    assert "a.jsonl line 2: invalid JSON" in error(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca"})


# (file bytes, what the one-line error must hold)
NOT_UTF8 = {
    "latin-1": (JSONL.encode("latin-1"),
                f"a.jsonl line 3 (byte {LATIN1_BYTE}): not UTF-8 text (0xe9); set encoding: latin-1 on datasets[0], "
                "or convert the file to UTF-8 (iconv -f latin1 -t utf-8)"),
    "cp1252": ("“Hi”".encode("cp1252"), "a.jsonl line 1 (byte 0): not UTF-8 text (0x93); set encoding: cp1252"),
    "utf-16": (JSONL.encode("utf-16"), "a.jsonl line 1 (byte 0): UTF-16 text (it starts with a UTF-16 byte-order "
                                       "mark), not UTF-8; set encoding: utf-16 on datasets[0]"),
    "png": (PNG, "a.jsonl line 3 (byte 8): not a text file (it holds NUL bytes); point datasets[0].path at a JSONL"),
    "random": (random.Random(0).randbytes(1000), "a.jsonl line 3 (byte 323): not a text file"),
}


@pytest.mark.parametrize("case", list(NOT_UTF8))
def test_file_not_utf8_is_one_line(tmp_path, demo_tokenizer, case):
    data, expected = NOT_UTF8[case]
    (tmp_path / "a.jsonl").write_bytes(data)
    msg = error(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca"})
    assert expected in msg


@pytest.mark.parametrize(("encoding", "data"), [("latin-1", JSONL.encode("latin-1")), ("cp1252", JSONL.encode("cp1252")),
                                                ("utf-16", JSONL.encode("utf-16")), ("UTF8", JSONL.encode())])
def test_encoding_key_reads_the_right_text(tmp_path, demo_tokenizer, encoding, data):
    (tmp_path / "a.jsonl").write_bytes(data)
    train, _, _ = build(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca", "encoding": encoding})
    assert "Café crème." in demo_tokenizer.decode(train[2].input_ids)
    assert [s.source for s in train] == ["a.jsonl line 1", "a.jsonl line 2", "a.jsonl line 3"]


def test_wrong_encoding_key_names_the_key(tmp_path, demo_tokenizer):
    (tmp_path / "a.jsonl").write_bytes(JSONL.encode())
    msg = error(tmp_path, demo_tokenizer, {"path": "a.jsonl", "type": "alpaca", "encoding": "ascii"})
    assert msg.startswith(f"a.jsonl line 3 (byte {LATIN1_BYTE}): not ascii text (0xc3); set datasets[0].encoding")


@pytest.mark.parametrize(("value", "expected"), [
    ("klingon", "cfg.yml: key 'datasets[0].encoding': got 'klingon', must be a text encoding, e.g. utf-8"),
    ("base64", "got 'base64', must be a text encoding"),  # a codec, but bytes to bytes
    (5, "cfg.yml: key 'datasets[0].encoding': got 5, must be a string"),
])
def test_unknown_codec_is_a_config_error(tmp_path, value, expected):
    with pytest.raises(LorafitError) as exc:
        TrainConfig.from_dict({"base_model": "demo", "datasets": [{"path": "a", "type": "alpaca", "encoding": value}]},
                              source="cfg.yml")
    assert expected in str(exc.value)


def test_chat_template_file_encodings(tmp_path, demo_tokenizer):
    tpl = "{# café #}{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Yo"}]}) + "\n")
    ds = {"path": "c.jsonl", "type": "chat_template"}
    (tmp_path / "t.jinja").write_bytes(codecs.BOM_UTF8 + tpl.encode())
    (s,), _, _ = build(tmp_path, demo_tokenizer, ds, chat_template="t.jinja")
    assert demo_tokenizer.decode(s.input_ids).startswith("user: Hi<|im_end|>")  # no BOM rendered
    (tmp_path / "t.jinja").write_bytes(tpl.encode("latin-1"))
    assert error(tmp_path, demo_tokenizer, ds, chat_template="t.jinja") == (
        "t.jinja line 1 (byte 6): not UTF-8 text (0xe9); chat_template must be UTF-8 text: "
        "convert it to UTF-8 (iconv -f latin1 -t utf-8)")
    (tmp_path / "t.jinja").write_bytes(PNG)
    assert "t.jinja line 3 (byte 8): not a text file" in error(tmp_path, demo_tokenizer, ds, chat_template="t.jinja")


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "instruction,input,output\n")])
def test_empty_file_names_the_file(tmp_path, demo_tokenizer, name, text):
    (tmp_path / name).write_text(text)
    msg = error(tmp_path, demo_tokenizer, {"path": name, "type": "alpaca"})
    assert msg == f"{name}: the file holds no rows; fill it, or remove it from datasets[0]"


def chat_row(role):
    return {"messages": [{"role": "user", "content": "Hi"}, {"role": role, "content": "Hello!"}]}


ALLOWED = "allowed roles: system, user, assistant, tool"


@pytest.mark.parametrize(("role", "roles", "expected"), [
    ("asistant", None, f"c.jsonl line 2: messages[1] has role 'asistant'; {ALLOWED}; map other names to these "
                       "with roles: on the dataset entry (set skip_bad_rows: true to skip bad rows)"),
    ("asistant", {"assistant": ["bot"]}, f"messages[1] has role 'asistant'; {ALLOWED}, bot; map other names"),
    (["assistant"], None, f"messages[1] has role ['assistant']; {ALLOWED};"),  # not even a string
])
def test_unknown_role_is_a_bad_row(tmp_path, demo_tokenizer, role, roles, expected):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [chat_row("assistant"), chat_row(role)]))
    ds = {"path": "c.jsonl", "type": "chat_template", "roles": roles}
    assert expected in error(tmp_path, demo_tokenizer, ds)
    train, _, report = build(tmp_path, demo_tokenizer, ds, skip_bad_rows=True)
    assert len(train) == 1 and report.bad_rows_skipped == 1 and report.rows_read == 2
    assert report.bad_row_examples[0].startswith("c.jsonl line 2: messages[1] has role")
    assert "bad rows skipped: 1" in report.summary()


def test_mapped_roles_are_trained(tmp_path, demo_tokenizer):
    rows = [chat_row("bot"), {"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Hey"}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = {"path": "c.jsonl", "type": "chat_template", "roles": {"assistant": ["bot"]}}
    train, _, report = build(tmp_path, demo_tokenizer, ds)
    assert len(train) == 2 and report.dropped_no_trained_tokens == 0
    assert "<|im_start|>assistant\nHello!" in demo_tokenizer.decode(train[0].input_ids)


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("a.jsonl", "[1, 2]\n" + JSONL, "a.jsonl line 1: alpaca row must be a JSON object, got list"),  # JSON lines
    ("a.json", "[\n" + json.dumps(ROWS[0]) + ",\n{oops}\n]", "a.json line 3: invalid JSON"),  # one JSON list
    ("a.json", json.dumps(ROWS[:1]) + "\n[2]\n", "a.json line 2: invalid JSON: Extra data"),
])
def test_json_list_or_lines_errors_name_the_line(tmp_path, demo_tokenizer, name, text, expected):
    (tmp_path / name).write_text(text)
    assert error(tmp_path, demo_tokenizer, {"path": name, "type": "alpaca"}).startswith(expected)
