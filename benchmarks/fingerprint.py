"""What a change must not change: per-step losses and trained weights, bit for bit, and the memory estimates.

Trains tiny random Llama / Qwen2 / Gemma models (the demo tokenizer, a chat dataset written here) through
``lorafit.train.train`` for 5 steps in several settings — fp32 and bf16, dropout 0 and 0.05, gradient
checkpointing, packing, q/v targets, full fine-tuning — and records each step's loss as a hex float and a hash
of the trained parameters; then estimates every catalog model in a grid of settings. Run it on two checkouts and
compare::

    PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/fingerprint.py --out /tmp/old.json
    .venv/bin/python benchmarks/fingerprint.py --out /tmp/new.json --compare /tmp/old.json

(about 5 minutes on 2 cores). A restructuring that claims "same math" shows every row equal. The JSON records
its provenance (``benchmarks/provenance.py``); it is not compared.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import tempfile
from pathlib import Path

from provenance import provenance

CASES = {
    "lora-fp32-d0": {}, "lora-bf16-d0": {"bf16": True}, "lora-fp32-d05": {"lora_dropout": 0.05},
    "lora-bf16-d05-gc": {"bf16": True, "lora_dropout": 0.05, "gradient_checkpointing": True},
    "lora-fp32-pack": {"sample_packing": True}, "full-fp32": {"adapter": None, "learning_rate": 1e-3},
    "lora-qv-fp32": {"lora_target_linear": False, "lora_target_modules": ["q_proj", "v_proj"]},
}
OTHER_ARCHS = ("lora-fp32-d0", "lora-bf16-d0", "lora-fp32-d05")  # the cases also run on Qwen2 and Gemma


def _train():
    try:
        from lorafit.train import train
    except ImportError:  # checkouts from before the recipe module
        from lorafit.train.trainer import train
    return train


def _write_models(work: Path, tok) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
    rows = [{"messages": [{"role": "user", "content": f"Repeat twice: {w} and say more words"},
                          {"role": "assistant", "content": f"{w} {w} " * (1 + i % 3)}]} for i, w in enumerate(words * 6)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for arch, cls in (("llama", LlamaConfig), ("qwen2", Qwen2Config), ("gemma", GemmaConfig)):
        torch.manual_seed(0)
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=len(tok), initializer_range=0.2)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(work / arch)
        tok.save_pretrained(work / arch)


def losses(work: Path) -> dict:
    from lorafit.config import TrainConfig
    from lorafit.models import load_tokenizer

    tok = load_tokenizer("demo")
    _write_models(work, tok)
    train, out = _train(), {}
    for arch in ("llama", "qwen2", "gemma"):
        for name, kw in CASES.items():
            if arch != "llama" and name not in OTHER_ARCHS:
                continue
            cfg = dict(base_model=str(work / arch), adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
                       datasets=[{"path": str(work / "data.jsonl"), "type": "chat_template"}], sequence_len=64,
                       micro_batch_size=4, gradient_accumulation_steps=2, max_steps=5, learning_rate=5e-3,
                       lr_scheduler="constant", output_dir=str(work / "runs" / f"{arch}-{name}"), seed=7)
            result = train(TrainConfig.from_dict({**cfg, **kw}))
            h = hashlib.sha256()
            for k, v in sorted(result.model.state_dict().items()):
                if "lora" in k or kw.get("adapter", "lora") is None:
                    h.update(k.encode())
                    h.update(v.detach().float().numpy().tobytes())
            out[f"{arch}/{name}"] = {"losses": [r["loss"].hex() for r in result.history if "loss" in r],
                                     "params": h.hexdigest()}
    return out


def estimates() -> dict:
    from lorafit.memory import catalog
    from lorafit.memory.estimate import Settings, estimate

    out = {}
    grid = itertools.product(("lora", "full"), ("bfloat16", "float32"), (False, True),
                             ("all-linear", ["q_proj", "v_proj"]), ("cuda", "cpu"), (0.0, 0.05))
    for name, (method, dtype, gc, targets, device, dropout) in itertools.product(catalog.MODELS, list(grid)):
        spec = catalog.get_model(name)
        if method == "full" and (targets != "all-linear" or dropout):
            continue
        if targets != "all-linear" and not all(t in spec.module_names() for t in targets):
            continue
        s = Settings(method=method, dtype=dtype, micro_batch=2, seq_len=512, r=16, targets=targets, device=device,
                     gradient_checkpointing=gc, dropout=dropout)
        e = estimate(spec, s)
        out[f"{name}|{method}|{dtype}|{gc}|{targets}|{device}|{dropout}"] = {
            "moments": e.moments, "total": e.total, "trainable": e.params["trainable"]}
    return out


NOT_COMPARED = ("estimates", "provenance")  # estimates are compared below; provenance differs by design


def compare(new: dict, old: dict) -> int:
    differ = 0
    for key in sorted(k for k in old if k not in NOT_COMPARED):
        a, b = old[key], new.get(key, {})
        same = a.get("losses") == b.get("losses") and a.get("params") == b.get("params")
        differ += not same
        print(f"{key:26s} {'bitwise equal' if same else 'DIFFERENT'}")
        if not same:
            print("   before", [float.fromhex(x) for x in a["losses"]])
            print("   after ", [float.fromhex(x) for x in b.get("losses", [])])
    est_old, est_new = old.get("estimates", {}), new.get("estimates", {})
    est_diff = [k for k in est_old if est_old[k] != est_new.get(k)]
    print(f"estimates: {len(est_old) - len(est_diff)} of {len(est_old)} equal" + "".join(f"\n   {k}" for k in est_diff[:20]))
    return int(differ > 0 or bool(est_diff))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--compare", type=Path, help="a JSON from another checkout: print what differs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = losses(Path(work))
    result["estimates"] = estimates()
    result["provenance"] = provenance()  # the runs resolve their options from this environment (no config keys)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return compare(result, json.loads(args.compare.read_text())) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
