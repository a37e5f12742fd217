"""The CLI verbs on a tiny random model: inspect, merge, generate, eval, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import save_tiny_llama
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorafit.cli import build_parser, main
from lorafit.lora import LoraConfig, apply_lora, lora_layers, save_adapter
from lorafit.models import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = save_tiny_llama(d / "model", load_tokenizer("demo"))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.weight.normal_(std=0.5)
    save_adapter(model, d / "adapter")
    rows = [{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}] * 4
    (d / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, model.eval()


def test_inspect_adapter_and_model(tiny, capsys):
    d, _ = tiny
    assert main(["inspect", str(d / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "q_proj.lora_A.weight" in out and "(4, 32)" in out
    assert main(["inspect", str(d / "model"), "--adapter", str(d / "adapter")]) == 0
    assert "trainable params: 896" in capsys.readouterr().out


def test_merge_writes_a_plain_model(tiny, tmp_path):
    d, model = tiny
    assert main(["merge", str(d / "model"), str(d / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    assert not any("lora" in k for k in merged.state_dict())


def test_merge_keeps_the_dtype_the_base_is_stored_in(tiny, tmp_path):
    """A bf16 base merges into a bf16 model by default, as PEFT's merge_and_unload keeps the loaded dtype (not a
    float32 folder twice the size); --dtype still picks one."""
    from safetensors import safe_open

    d, model = tiny
    model_dir = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.bfloat16).save_pretrained(model_dir)
    load_tokenizer("demo").save_pretrained(model_dir)
    for out, extra, want in (("auto", [], "BF16"), ("fp32", ["--dtype", "float32"], "F32")):
        assert main(["merge", str(model_dir), str(d / "adapter"), str(tmp_path / out), *extra]) == 0
        with safe_open(tmp_path / out / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {want}


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_merge_never_destroys_user_files(tiny, tmp_path, monkeypatch, capsys):
    """`.`, the adapter's or the base's folder, or a non-empty folder without --overwrite: one line, exit 2,
    every file as it was; with --overwrite the folder is replaced by the merged model."""
    d, _ = tiny
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "mine.txt").write_text("keep me")
    monkeypatch.chdir(work)
    before = {f: _tree(f) for f in (work, d / "adapter", d / "model")}
    merge = ["merge", str(d / "model"), str(d / "adapter")]
    for target, words in ((".", "current folder"), (str(work.parent), "current folder"),
                          (str(d / "adapter"), "adapter folder"), (str(d / "adapter" / "sub"), "inside the adapter"),
                          (str(d / "model"), "base model folder"), (str(d), "adapter folder"),
                          ("notes", "not empty"), ("notes/mine.txt", "is a file")):
        assert main([*merge, target]) == 2, target
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert {f: _tree(f) for f in before} == before
    assert main([*merge, "notes", "--overwrite"]) == 0
    assert not (work / "notes" / "mine.txt").exists() and (work / "notes" / "config.json").is_file()


def test_plan_refuses_to_replace_a_file_without_force(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    out.write_text("mine")
    args = ["plan", "llama-3.2-1b", "--gpu", "rtx-4090", "-o", str(out)]
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert out.read_text() == "mine"
    assert main([*args, "--force"]) == 0 and out.read_text().startswith("# Written by `lorafit plan`")


def test_generate_and_eval(tiny, capsys, tmp_path):
    d, model = tiny
    assert main(["generate", str(d / "model"), "Say hi", "--adapter", str(d / "adapter"), "--max-new-tokens", "4"]) == 0
    assert "> Say hi" in capsys.readouterr().out
    # references: what the adapter model says greedily (its first 3 tokens), so the perplexities differ by column
    from lorafit.eval.report import heldout_metrics
    from lorafit.eval.tasks import generate_answers, retention_score

    tok, prompts = load_tokenizer("demo"), [[{"role": "user", "content": f"Say {w}"}] for w in ("hi", "yes", "no")]
    said = generate_answers(model, tok, prompts, max_new_tokens=3)
    heldout, retention = tmp_path / "h.jsonl", tmp_path / "r.jsonl"
    heldout.write_text("".join(json.dumps({"messages": p + [{"role": "assistant", "content": a}]}) + "\n"
                               for p, a in zip(prompts, said, strict=True)))
    retention.write_text("".join(json.dumps({"messages": p, "reference": a, "answer": a.strip()[:4] or "x"}) + "\n"
                                 for p, a in zip(prompts, said, strict=True)))
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(d / "model"), "--adapter", str(d / "adapter"), "--heldout", str(heldout),
                 "--retention", str(retention), "--json", str(out_json)]) == 0
    results = json.loads(out_json.read_text())
    assert set(results) == {"base", "adapter"}
    # the CLI's numbers are the library's, for the base model and for the model with the adapter
    base = AutoModelForCausalLM.from_pretrained(d / "model").eval()
    for column, m in (("adapter", model), ("base", base)):
        expect = heldout_metrics(m, tok, str(heldout), None)["heldout_exact_match"]
        kept = retention_score(m, tok, retention, max_new_tokens=64)
        assert results[column]["heldout_exact_match"] == expect, column
        assert results[column]["retention_accuracy"] == kept["accuracy"], column
        assert results[column]["retention_ppl"] == pytest.approx(kept["perplexity"], rel=1e-4), column
    assert results["adapter"]["retention_ppl"] < results["base"]["retention_ppl"]
    # the base column is stored: the same eval again reuses it (and says so); --no-cache scores it anew
    again = tmp_path / "again.json"
    capsys.readouterr()
    args = ["eval", str(d / "model"), "--adapter", str(d / "adapter"), "--heldout", str(heldout), "--retention",
            str(retention)]
    assert main([*args, "--json", str(again)]) == 0
    assert "stored result of an earlier run" in capsys.readouterr().out
    assert json.loads(again.read_text()) == results
    assert main([*args, "--no-cache"]) == 0
    assert "stored result" not in capsys.readouterr().out
    retention.write_text(retention.read_text().replace('"x"', '"y"') + "\n")  # another file: another key
    assert main(args) == 0
    assert "stored result" not in capsys.readouterr().out


def test_errors_are_one_line(tiny, capsys, tmp_path):
    d, _ = tiny
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100)).save_pretrained(other)
    capsys.readouterr()
    assert main(["generate", str(other), "x", "--raw"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not load a tokenizer" in err
    load_tokenizer("demo").save_pretrained(other)
    capsys.readouterr()
    assert main(["generate", str(other), "x", "--raw", "--adapter", str(d / "adapter")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different base model" in err


def test_merge_again_replaces_its_own_earlier_output(tiny, tmp_path, capsys):
    """The same base and adapter merged again into the same folder: no --overwrite needed. Another adapter, or
    a file the merge did not write: refused in one line, nothing changed; --overwrite replaces the folder."""
    d, _ = tiny
    out = tmp_path / "merged"
    merge = ["merge", str(d / "model"), str(d / "adapter"), str(out)]
    assert main(merge) == 0
    record = json.loads((out / "lorafit-merge.json").read_text())
    assert "config.json" in record["files"] and record["adapter"] == str((d / "adapter").resolve())
    capsys.readouterr()
    assert main(merge) == 0 and "replacing the earlier merge" in capsys.readouterr().out
    shutil.copytree(d / "adapter", tmp_path / "adapter2")
    other = ["merge", str(d / "model"), str(tmp_path / "adapter2"), str(out)]
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    for args, words in ((merge, "files it did not write (1 entry: notes.txt)"), (other, "not empty")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "--overwrite" in err and len(err.splitlines()) == 1, err
    assert _tree(out) == before
    assert main([*other, "--overwrite"]) == 0 and not (out / "notes.txt").exists()


def test_eval_json_refuses_an_existing_file_without_force(tiny, tmp_path, capsys):
    d, _ = tiny
    out = tmp_path / "eval.json"
    out.write_text("mine")
    args = ["eval", str(d / "model"), "--adapter", str(d / "adapter"), "--heldout", str(d / "heldout.jsonl"),
            "--no-base", "--json", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--json" in err and "exists" in err and "--force" in err, err
    assert out.read_text() == "mine"
    assert main([*args, "--force"]) == 0 and "adapter" in json.loads(out.read_text())
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_eval_finds_the_adapter_in_output_dir_relative_to_the_config(tmp_path, monkeypatch):
    from lorafit.cli.eval import resolve_target

    (tmp_path / "proj" / "run").mkdir(parents=True)
    (tmp_path / "proj" / "run" / "adapter_config.json").write_text("{}")
    (tmp_path / "proj" / "d.jsonl").write_text("")
    (tmp_path / "proj" / "cfg.yaml").write_text(
        "base_model: demo\nadapter: lora\nlora_target_linear: true\noutput_dir: run\n"
        "datasets: [{path: d.jsonl, type: completion}]\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    args = build_parser().parse_args(["eval", "proj/cfg.yaml"])
    assert resolve_target(args)[1] == str(tmp_path / "proj" / "run")


def test_eval_lets_idle_threads_sleep_before_torch_loads(monkeypatch, tmp_path):
    """OMP_WAIT_POLICY is read once, when torch loads: eval sets it first, and keeps a value the user chose."""
    import subprocess
    import sys

    from lorafit.cli.eval import quiet_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    quiet_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    probe = ("import os, sys\nimport lorafit.cli.eval as e\nfrom lorafit.cli import main\n"
             "e.quiet_threads = lambda real=e.quiet_threads: (real(), print('torch' in sys.modules, "
             "os.environ['OMP_WAIT_POLICY']))\n"
             f"main(['eval', {str(tmp_path / 'missing.yaml')!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", "PASSIVE"], out.stderr


def test_eval_builds_the_eval_split_once_for_both_columns(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lorafit.eval import report

    model = save_tiny_llama(tmp_path / "model", load_tokenizer("demo"))
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    built, scored = [], []
    monkeypatch.setattr(report, "build_datasets", lambda cfg, tok: built.append(cfg) or ([], ["sample"], None))
    monkeypatch.setattr(report, "evaluate", lambda m, samples, cfg, pad: scored.append(samples) or {"eval_loss": 1.0})
    cfg = SimpleNamespace(val_set_size=0.1, test_datasets=None)
    results = report.evaluate_columns(model, load_tokenizer("demo"), cfg, has_adapter=True, with_base=True,
                                      heldout=None, retention=None, limit=None)
    assert results == {"base": {"eval_loss": 1.0}, "adapter": {"eval_loss": 1.0}}
    assert built == [cfg] and scored == [["sample"], ["sample"]]
