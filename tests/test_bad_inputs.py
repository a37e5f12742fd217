"""Bad inputs, as a new user makes them: every one is exit status 2, one line on stderr that names the file,
key or row, no traceback, and no file changed outside what the command may write.

Each case is a row of ``CASES``: the files of a fresh working folder (a valid config and data set, with the
case's change), the command line, and words the error line must hold. The folder (and the shared tiny model)
is snapshotted before and after. ``test_mutated_*`` (hypothesis) mutate valid configs and data rows at random
and assert that lorafit only ever answers with its own one-line error.
"""

from __future__ import annotations

import copy
import json
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorafit.cli import main
from lorafit.errors import LorafitError

MODEL = "@MODEL@"  # replaced by the shared tiny model's folder
ROWS = [{"text": f"The date {d} in ISO is 2024-01-{d:02d}."} for d in range(1, 9)]
ALPACA = [{"instruction": "Say hi", "output": "hi"}] * 4
CHAT = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}] * 4
GOOD = {
    "base_model": MODEL, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True,
    "datasets": [{"path": "data.jsonl", "type": "completion"}], "sequence_len": 32, "micro_batch_size": 2,
    "max_steps": 1, "learning_rate": 0.001, "compile_kernels": False, "output_dir": "out",
}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def config(drop: tuple = (), **changes) -> str:
    d = {k: v for k, v in {**GOOD, **changes}.items() if k not in drop}
    return yaml.safe_dump(d, sort_keys=False)


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]  # words the one error line must hold (case-insensitive)
    files: dict[str, str | bytes] = field(default_factory=dict)  # relative path -> content
    before: list[list[str]] = field(default_factory=list)  # commands run first (must succeed)

    def __post_init__(self):
        self.files = {"config.yaml": config(), "data.jsonl": jsonl(ROWS), **self.files}


TRAIN = ["train", "config.yaml"]
CASES = [
    # the config file itself
    Case("config missing", ["train", "nope.yaml"], ["nope.yaml", "not found"]),
    Case("config is a folder", ["train", "data"], ["data", "folder"], {"data/x.txt": "x"}),
    Case("yaml syntax", TRAIN, ["config.yaml", "line", "invalid yaml"], {"config.yaml": "base_model: [x\nlora_r: 8\n"}),
    Case("yaml empty", TRAIN, ["config.yaml", "empty"], {"config.yaml": ""}),
    Case("yaml top-level list", TRAIN, ["config.yaml", "mapping"], {"config.yaml": "- a\n- b\n"}),
    Case("config not utf-8", TRAIN, ["config.yaml"], {"config.yaml": "base_model: caf\xe9\n".encode("latin-1")}),
    # keys and values
    Case("unknown key", TRAIN, ["lora_rr", "lora_r"], {"config.yaml": config(lora_rr=8)}),
    Case("bool as rank", TRAIN, ["lora_r", "true"], {"config.yaml": config(lora_r=True)}),
    Case("bool as lr", TRAIN, ["learning_rate", "true/false"], {"config.yaml": config(learning_rate=False)}),
    Case("negative rank", TRAIN, ["lora_r", "-1"], {"config.yaml": config(lora_r=-1)}),
    Case("rank not a number", TRAIN, ["lora_r", "'eight'"], {"config.yaml": config(lora_r="eight")}),
    Case("dropout 1", TRAIN, ["lora_dropout"], {"config.yaml": config(lora_dropout=1.0)}),
    Case("no datasets", TRAIN, ["datasets", "required"], {"config.yaml": config(drop=("datasets",))}),
    Case("no base_model", TRAIN, ["base_model", "required"], {"config.yaml": config(drop=("base_model",))}),
    Case("bad dataset type", TRAIN, ["datasets[0].type"],
         {"config.yaml": config(datasets=[{"path": "data.jsonl", "type": "sharegpt_v9"}])}),
    Case("no targets", TRAIN, ["target"], {"config.yaml": config(lora_target_linear=False)}),
    Case("qlora without load_in_4bit", TRAIN, ["qlora", "load_in_4bit"], {"config.yaml": config(adapter="qlora")}),
    Case("8-bit optimizer", TRAIN, ["optimizer", "low-bit"], {"config.yaml": config(optimizer="adamw_bnb_4bit")}),
    Case("fp16 with modules_to_save", TRAIN, ["fp16", "lora_modules_to_save", "bf16"],
         {"config.yaml": config(fp16=True, lora_modules_to_save=["lm_head"])}),
    Case("warmup twice", TRAIN, ["warmup_steps", "warmup_ratio"], {"config.yaml": config(warmup_steps=2, warmup_ratio=0.1)}),
    Case("bad regex targets", TRAIN, ["lora_target_modules", "regex"],
         {"config.yaml": config(lora_target_linear=False, lora_target_modules="(q_proj")}),
    Case("unknown special token key", TRAIN, ["special_tokens", "foo_token"],
         {"config.yaml": config(special_tokens={"foo_token": "<x>"})}),
    Case("new special token without embeddings", TRAIN, ["special_tokens", "lora_modules_to_save"],
         {"config.yaml": config(special_tokens={"pad_token": "<|brand-new-pad|>"})}),
    Case("unknown attention", TRAIN, ["attn_implementation"], {"config.yaml": config(attn_implementation="magic")}),
    Case("unknown data encoding", TRAIN, ["encoding", "klingon"],
         {"config.yaml": config(datasets=[{"path": "data.jsonl", "type": "completion", "encoding": "klingon"}])}),
    # command-line overrides are checked like keys
    Case("--max-steps 0", [*TRAIN, "--max-steps", "0"], ["--max-steps"]),
    Case("--max-steps -1", [*TRAIN, "--max-steps", "-1"], ["--max-steps"]),
    Case("--output-dir is a file", [*TRAIN, "--output-dir", "notes.txt"], ["notes.txt", "file"], {"notes.txt": "mine"}),
    # the base model
    Case("base_model path missing", TRAIN, ["base_model", "looked for"], {"config.yaml": config(base_model="./models/llama")}),
    Case("base_model hub id", TRAIN, ["base_model", "not downloaded"], {"config.yaml": config(base_model="meta-llama/Llama-3.1-8B")}),
    Case("base_model is bert", TRAIN, ["base_model", "encoder-only"], {
        "config.yaml": config(base_model="bert"),
        "bert/config.json": json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]})}),
    Case("base_model folder without config", TRAIN, ["base_model", "config.json"],
         {"config.yaml": config(base_model="empty"), "empty/readme.txt": "x"}),
    # data files
    Case("dataset missing", TRAIN, ["datasets[0].path", "not found"],
         {"config.yaml": config(datasets=[{"path": "missing.jsonl", "type": "completion"}])}),
    Case("data latin-1", TRAIN, ["data.jsonl", "line 2", "byte", "encoding"],
         {"data.jsonl": (jsonl(ROWS[:1]) + '{"text": "caf\xe9"}\n').encode("latin-1")}),
    Case("data binary", TRAIN, ["data.jsonl", "text"], {"data.jsonl": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 4}),
    Case("data bad json line", TRAIN, ["data.jsonl", "line 3"], {"data.jsonl": jsonl(ROWS[:2]) + "{oops\n"}),
    Case("data empty", TRAIN, ["data.jsonl", "no rows"], {"data.jsonl": ""}),
    Case("data row not an object", TRAIN, ["data.jsonl", "line 1"], {"data.jsonl": "[1, 2]\n" + jsonl(ROWS)}),
    Case("completion field missing", TRAIN, ["data.jsonl", "text"], {"data.jsonl": jsonl([{"body": "x"}] + ROWS)}),
    Case("alpaca output missing", TRAIN, ["data.jsonl", "output"], {
        "config.yaml": config(datasets=[{"path": "data.jsonl", "type": "alpaca"}]),
        "data.jsonl": jsonl([{"instruction": "x"}] + ALPACA)}),
    Case("chat role misspelled", TRAIN, ["data.jsonl", "line 2", "asistant", "assistant"], {
        "config.yaml": config(datasets=[{"path": "data.jsonl", "type": "chat_template"}]),
        "data.jsonl": jsonl(CHAT[:1] + [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "asistant", "content": "yo"}]}] + CHAT)}),
    Case("csv bad encoding", TRAIN, ["data.csv", "line 3", "byte"], {
        "config.yaml": config(datasets=[{"path": "data.csv", "type": "completion"}]),
        "data.csv": "text\nhello\ncaf\xe9\n".encode("cp1252")}),
    # outputs are never destroyed
    Case("train into a foreign folder", TRAIN, ["out", "--overwrite"], {"out/thesis.tex": "years of work"}),
    Case("train into another run's folder", TRAIN, ["out", "lora_r", "--overwrite"],
         {"other.yaml": config(lora_r=8)}, before=[["train", "other.yaml"]]),
    Case("resume with another rank", [*TRAIN, "--resume"], ["checkpoint", "lora_r"],
         {"other.yaml": config(lora_r=8, max_steps=2, save_steps=1)}, before=[["train", "other.yaml"]]),
    Case("merge into the current folder", ["merge", MODEL, "adapter", "."], ["current folder"]),
    Case("merge into the adapter", ["merge", MODEL, "adapter", "adapter"], ["adapter folder"]),
    Case("merge into a non-empty folder", ["merge", MODEL, "adapter", "mine"], ["mine", "--overwrite"],
         {"mine/notes.txt": "keep"}),
    Case("plan over a file", ["plan", "llama-3.2-1b", "--gpu", "rtx-4090", "-o", "plan.yaml"], ["plan.yaml", "--force"],
         {"plan.yaml": "mine"}),
    Case("eval json over a file", ["eval", MODEL, "--heldout", "data.jsonl", "--json", "scores.json"],
         ["scores.json", "--force"], {"scores.json": "{}"}),
    # adapters
    Case("adapter config is a list", ["inspect", "bad"], ["adapter_config.json", "object"],
         {"bad/adapter_config.json": "[1, 2]", "bad/adapter_model.safetensors": b""}),
    Case("adapter config not json", ["inspect", "bad"], ["adapter_config.json", "json"],
         {"bad/adapter_config.json": "{r: 8", "bad/adapter_model.safetensors": b""}),
    Case("adapter folder missing", ["generate", MODEL, "hi", "--adapter", "nope"], ["nope"]),
    # the estimator
    Case("estimate bert", ["estimate", "bert"], ["encoder-only"],
         {"bert/config.json": json.dumps({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                                          "num_attention_heads": 1, "vocab_size": 8})}),
    Case("estimate t5", ["estimate", "t5"], ["encoder-decoder"],
         {"t5/config.json": json.dumps({"model_type": "t5", "is_encoder_decoder": True})}),
    Case("estimate mamba config", ["estimate", "--config", "config.yaml"], ["state-space"], {
        "config.yaml": config(base_model="mamba"),
        "mamba/config.json": json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})}),
    Case("estimate unknown model", ["estimate", "llama-9"], ["llama-9"]),
    Case("plan without a gpu", ["plan", "llama-3.2-1b"], ["--gpu"]),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, demo_tokenizer):
    """The tiny model every case uses, and an adapter trained on it (written once, snapshotted by each case)."""
    from conftest import save_tiny_llama

    root = tmp_path_factory.mktemp("shared")
    save_tiny_llama(root / "model", demo_tokenizer)
    (root / "cfg.yaml").write_text(config(output_dir="adapter").replace(MODEL, str(root / "model")))
    (root / "data.jsonl").write_text(jsonl(ROWS))
    assert main(["train", str(root / "cfg.yaml")]) == 0
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, shared, tmp_path, monkeypatch, capsys):
    model = str(shared / "model")
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content.replace(MODEL, model), encoding="utf-8")
        else:
            path.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").symlink_to(shared / "adapter") if "adapter" not in case.files else None
    for argv in case.before:
        assert main(argv) == 0, argv
    capsys.readouterr()
    before = snapshot(tmp_path), snapshot(shared)
    argv = [a.replace(MODEL, model) for a in case.argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in case.expect:
        assert word.lower() in err.lower(), f"{word!r} not in: {err}"
    assert (snapshot(tmp_path), snapshot(shared)) == before, "a refused command changed files"


# ---- property tests: random mutations never end in a traceback ------------------------------------------------
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.integers(-2, 5), max_size=3),
                   st.dictionaries(st.text(string.ascii_lowercase, max_size=6), st.integers(), max_size=2))
KEYS = st.sampled_from(sorted(GOOD) + ["lora_dropout", "val_set_size", "warmup_ratio", "bf16", "special_tokens",
                                      "lora_target_modules", "datasets", "optimizer", "lr_scheduler", "adapter",
                                      "eval_steps", "sample_packing", "chat_template", "test_datasets"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(KEYS, VALUES, max_size=3), dataset_changes=st.dictionaries(
    st.sampled_from(["path", "type", "split", "field", "roles", "data_files", "encoding", "ds_type"]), VALUES,
    max_size=2))
def test_mutated_config_is_valid_or_one_line_error(changes, dataset_changes):
    from lorafit.config import TrainConfig

    d = copy.deepcopy(GOOD) | changes
    if isinstance(d.get("datasets"), list) and d["datasets"] and isinstance(d["datasets"][0], dict):
        d["datasets"][0] |= dataset_changes
    try:
        TrainConfig.from_dict(d, source="c.yaml")
    except LorafitError as e:
        assert "\n" not in str(e) and str(e).startswith("c.yaml"), str(e)


ROW = st.recursive(VALUES, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.sampled_from(
                                                       ["text", "instruction", "input", "output", "messages", "role",
                                                        "content", "segments", "label", "train"]), inner,
                                                       max_size=3)), max_leaves=8)


@pytest.mark.parametrize("kind", ["completion", "alpaca", "chat_template", "input_output"])
def test_mutated_rows_are_trained_or_one_line_error(kind, demo_tokenizer):
    from lorafit.config import TrainConfig
    from lorafit.data import build_datasets

    good = {"completion": ROWS[0], "alpaca": ALPACA[0], "chat_template": CHAT[0],
            "input_output": {"segments": [{"text": "a", "label": False}, {"text": "b", "label": True}]}}[kind]

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=st.lists(st.one_of(ROW, st.just(good)), min_size=1, max_size=3))
    def check(rows):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "d.jsonl").write_text(jsonl(rows), encoding="utf-8")
            cfg = TrainConfig.from_dict({**GOOD, "datasets": [{"path": "d.jsonl", "type": kind}]},
                                        source="c.yaml", config_dir=tmp)
            try:
                build_datasets(cfg, demo_tokenizer)
            except LorafitError as e:
                assert "\n" not in str(e), str(e)

    check()
