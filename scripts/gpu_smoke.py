"""`lorafit train` end to end on whatever device this machine has (the GPU check's first step).

A tiny random Llama with a word-level tokenizer is saved to a temporary folder with completion data; LoRA,
QLoRA (bitsandbytes NF4 base) and LoRA with an 8-bit optimizer each train 6 steps through the CLI, in their own
process, as a user runs them. Prints each run's header (it names the device), final loss and adapter files;
exits non-zero if any run fails.

    python scripts/gpu_smoke.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = "the a date is was on in of to and one two three four five six seven eight nine ten".split()


def save_model(folder: Path) -> None:
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="lorafit-gpu-smoke-"))
    save_model(work / "model")
    rows = [{"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(24))} for i in range(64)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {
        "lora": {},
        "qlora": {"adapter": "qlora", "load_in_4bit": True},
        "lora-adamw8bit": {"optimizer": "adamw_bnb_8bit"},
    }
    failed = 0
    for name, extra in runs.items():
        cfg = {"base_model": str(work / "model"), "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
               "lora_target_linear": True, "datasets": [{"path": str(work / "data.jsonl"), "type": "completion"}],
               "sequence_len": 32, "micro_batch_size": 4, "max_steps": 6, "learning_rate": 1e-3,
               "bf16": "auto", "output_dir": str(work / name), **extra}
        (work / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
        proc = subprocess.run([sys.executable, "-m", "lorafit.cli", "train", str(work / f"{name}.yaml")],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "COLUMNS": "240"})  # one line per header
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("LoRA", "QLoRA", "done:", "runtime:"))]
        files = sorted(p.name for p in (work / name).glob("adapter_*"))
        print(f"== {name}: exit {proc.returncode}; adapter files {files}")
        for ln in lines:
            print("   " + ln)
        if proc.returncode or "adapter_model.safetensors" not in files:
            failed += 1
            print("   " + "\n   ".join(proc.stderr.strip().splitlines()[-6:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
