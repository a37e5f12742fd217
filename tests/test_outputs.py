"""What `lorafit train` may do in its output folder: continue or replace only its own run (same config
fingerprint), refuse anything else in one line with nothing changed, clean up after a kill, follow the umask."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_llama

from lorafit.cli import main
from lorafit.config import load_config
from lorafit.fsutil import atomic_dir, check_writable_dir
from lorafit.models import load_tokenizer
from lorafit.train import train

ROW = {"messages": [{"role": "user", "content": "Repeat twice: fig"}, {"role": "assistant", "content": "fig fig"}]}
BASE = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
            datasets=[{"path": "data.jsonl", "type": "chat_template"}], sequence_len=64, micro_batch_size=4,
            max_steps=2, save_steps=1, learning_rate=5e-3, output_dir="run", compile_kernels=False, seed=7)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A project folder: a tiny model, data.jsonl, cfg.yaml, and run/ holding that config's finished run
    (checkpoint-1, the adapter, metrics, record)."""
    d = tmp_path_factory.mktemp("outputs")
    save_tiny_llama(d / "model", load_tokenizer("demo"))
    (d / "data.jsonl").write_text("".join(json.dumps(ROW) + "\n" for _ in range(8)))
    write_cfg(d)
    train(load_config(d / "cfg.yaml"))
    assert {"checkpoint-1", "adapter_model.safetensors", "lorafit-run.json"} <= {p.name for p in (d / "run").iterdir()}
    return d


@pytest.fixture
def proj(template, tmp_path, monkeypatch):
    """A copy of the template project, as the working directory (messages show paths relative to it)."""
    p = tmp_path / "proj"
    shutil.copytree(template, p)
    monkeypatch.chdir(p)
    return p


def write_cfg(folder: Path, name: str = "cfg.yaml", **changes) -> str:
    cfg = {**BASE, "base_model": "model", **changes}  # relative to the config: the copies are the same run
    (folder / name).write_text(yaml.safe_dump(cfg))
    return name


def snapshot(folder: Path) -> dict:
    """Every entry below ``folder``: a file's bytes, or None for a folder."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def record(folder: Path) -> dict:
    return json.loads((folder / "lorafit-run.json").read_text())["fingerprint"]


# ---- refusals: one line, exit 2, nothing changed ------------------------------------------------------
def _user_folder(p):
    (p / "mine").mkdir()
    (p / "mine" / "notes.txt").write_text("keep me")
    return ["--output-dir", "mine"]


def _changed_data(p):
    with (p / "data.jsonl").open("a") as f:
        f.write(json.dumps(ROW) + "\n")
    return []


REFUSALS = {  # case -> (config changes, setup returning extra args, words the one line must hold)
    "folder of user files": ({}, _user_folder, ["output_dir mine", "not empty", "no lorafit run", "notes.txt",
                                                 "--overwrite"]),
    "another run": ({"lora_r": 8}, None, ["output_dir run holds another run (lora_r 4 → 8)", "--overwrite"]),
    "two keys differ": ({"lora_r": 8, "sequence_len": 128}, None, ["lora_r 4 → 8, sequence_len 64 → 128"]),
    "data changed": ({}, _changed_data, ["output_dir run holds another run (datasets[0] data changed)"]),
    "dataset added": ({"datasets": BASE["datasets"] * 2}, None, ["datasets 1 entry → 2 entries"]),
    "resume, other lora_r": ({"lora_r": 8}, lambda p: ["--resume"],
                             ["checkpoint run/checkpoint-1 was made by a different config: lora_r 4 → 8"]),
    "resume, other data": ({}, lambda p: [*_changed_data(p), "--resume"], ["datasets[0] data changed"]),
    "resume_from_checkpoint, other config, new folder": (
        {"sequence_len": 128, "resume_from_checkpoint": "run/checkpoint-1", "output_dir": "new/deep"}, None,
        ["checkpoint run/checkpoint-1 was made by a different config: sequence_len 64 → 128"]),
    "resume_from_checkpoint missing": ({"resume_from_checkpoint": "run/checkpoint-9"}, None,
                                       ["resume_from_checkpoint run/checkpoint-9", "not a complete checkpoint"]),
    "output_dir below a file": ({"output_dir": "data.jsonl/run"}, None, ["output_dir", "data.jsonl is a file"]),
    "--max-steps 0": ({}, lambda p: ["--max-steps", "0"], ["--max-steps"]),
    # passes the folder checks, fails loading: still nothing written (the folder is prepared after loading)
    "missing model, new folder": ({"base_model": "nope", "output_dir": "fresh"}, None, ["nope"]),
    "missing model, same run": ({"base_model": "nope"}, lambda p: ["--overwrite"], ["nope"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_change_nothing(proj, capsys, case):
    changes, setup, words = REFUSALS[case]
    args = ["train", write_cfg(proj, "other.yaml", **changes), *(setup(proj) if setup else [])]
    before = snapshot(proj)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert snapshot(proj) == before  # no file changed, and no folder created (new/deep)


# ---- what is allowed -----------------------------------------------------------------------------------
def test_same_config_twice_replaces_the_previous_run(proj, capsys):
    """`make demo` twice: the second run replaces the first; its old checkpoints go (a later --resume must not
    pick one up), files lorafit did not write stay."""
    (proj / "run" / "eval.json").write_text("{}")
    for _ in range(2):
        assert main(["train", "cfg.yaml", "--max-steps", "1"]) == 0
        out = capsys.readouterr().out
        assert "note: run: replacing the previous run of this config" in out
        assert not (proj / "run" / "checkpoint-1").exists()  # 1 step: no checkpoint of its own
    assert (proj / "run" / "eval.json").read_text() == "{}"


def test_another_run_is_replaced_with_overwrite_and_user_files_stay(proj, capsys):
    (proj / "run" / "notes.txt").write_text("keep me")
    write_cfg(proj, "r8.yaml", lora_r=8, max_steps=1)
    assert main(["train", "r8.yaml"]) == 2
    assert "lora_r 4 → 8" in capsys.readouterr().err
    assert main(["train", "r8.yaml", "--overwrite"]) == 0
    assert "--overwrite: replacing another run (lora_r 4 → 8)" in capsys.readouterr().out
    assert (proj / "run" / "notes.txt").read_text() == "keep me"
    assert not (proj / "run" / "checkpoint-1").exists() and record(proj / "run")["lora_r"] == 8


def test_overwrite_in_a_folder_without_record_keeps_what_lorafit_did_not_write(proj, capsys):
    _user_folder(proj)
    assert main(["train", "cfg.yaml", "--output-dir", "mine", "--overwrite", "--max-steps", "1"]) == 0
    assert "mine: --overwrite: nothing to remove; keeping 1 entry: notes.txt" in capsys.readouterr().out
    assert (proj / "mine" / "notes.txt").read_text() == "keep me"
    assert (proj / "mine" / "adapter_model.safetensors").is_file()


def test_resume_may_change_the_schedule_and_max_steps(proj, capsys):
    write_cfg(proj, "lr.yaml", learning_rate=1e-3, lr_scheduler="constant", eval_steps=5, save_total_limit=3)
    assert main(["train", "lr.yaml", "--resume", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from run/checkpoint-1 (step 1" in out and "done: 3 steps" in out
    steps = [json.loads(line)["step"] for line in (proj / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_without_a_checkpoint_starts_at_step_0(proj, capsys):
    assert main(["train", "cfg.yaml", "--resume", "--output-dir", "fresh", "--max-steps", "1"]) == 0
    assert "no complete checkpoint in fresh; starting from step 0" in capsys.readouterr().out


def test_stale_temporaries_of_a_killed_run_are_removed_at_the_next_start(proj, capsys):
    run = proj / "run"
    (run / ".tmp-checkpoint-5-k2j3x9").mkdir()
    (run / ".tmp-checkpoint-5-k2j3x9" / "trainer_state.pt").write_bytes(b"half")
    (run / ".adapter_model.safetensors.a8b7.tmp").write_bytes(b"half")
    (run / ".tmp-mine").mkdir()  # not a name lorafit writes: kept
    assert main(["train", "cfg.yaml", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "removing 2 entries: .adapter_model.safetensors.a8b7.tmp, .tmp-checkpoint-5-k2j3x9" in out
    assert sorted(p.name for p in run.glob(".*")) == [".tmp-mine"]


# ---- permissions ---------------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_outputs_follow_a_022_umask(proj, umask_022):
    train(load_config(write_cfg(proj, output_dir="perm")))
    modes = _modes(proj / "perm")
    assert modes["checkpoint-1"] == 0o755 and modes["."] == 0o755
    assert {m for m in modes.values()} == {0o755, 0o644}, modes
    assert modes["adapter_model.safetensors"] == modes["checkpoint-1/adapter_model.safetensors"] == 0o644


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_dir_gives_the_umask_modes(tmp_path, mask):
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
            fd = os.open(tmp / "private", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp makes them
            os.close(fd)
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    assert modes == {".": 0o777 & ~mask, "sub": 0o777 & ~mask, "sub/f": 0o666 & ~mask, "private": 0o666 & ~mask}


def test_atomic_dir_without_replace_keeps_the_folder_that_is_there(tmp_path):
    with atomic_dir(tmp_path / "cache", replace=False) as tmp:
        (tmp / "f").write_text("first")
    with pytest.raises(OSError), atomic_dir(tmp_path / "cache", replace=False) as tmp:
        (tmp / "f").write_text("second")
    assert (tmp_path / "cache" / "f").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # the second folder is gone


def test_check_writable_dir_creates_nothing(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b", "output_dir") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []
