"""Check that the demo task is learnable: PEFT LoRA + a plain AdamW loop on the demo data, held-out exact match before/after.

Independent of lorafit's own engine and trainer (PEFT is the reference), so it can tell a task problem from
a trainer problem. Prompt tokens are masked; the assistant answer and its ``<|im_end|>`` are trained.

    python examples/check_learnable.py --steps 250 --lr 2e-3 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from lorafit.eval.tasks import generate_answers, load_heldout, retention_score, score
from lorafit.models import load_model_and_tokenizer

HERE = Path(__file__).resolve().parent


def encode(tok, messages):
    """(input ids, labels): prompt masked, answer + end of turn trained, ChatML's trailing newline dropped."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-base", action="store_true", help="do not score the base model first")
    ap.add_argument("--retention", action="store_true",
                    help="also score retention (examples/retention/retention.jsonl) after training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model

    model, tok = load_model_and_tokenizer("demo")
    heldout = load_heldout(HERE / "demo" / "heldout.jsonl")
    prompts, refs = [m for m, _ in heldout], [r for _, r in heldout]
    if not args.skip_base:
        t = time.time()
        print("base", score(generate_answers(model, tok, prompts, max_new_tokens=12), refs), f"{time.time() - t:.0f}s")

    rows = [json.loads(line)["messages"] for line in open(HERE / "demo" / "train.jsonl", encoding="utf-8")]
    data = [encode(tok, m) for m in rows]
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = random.Random(args.seed)
    order: list[int] = []
    pad = tok.pad_token_id
    t0 = time.time()
    for step in range(args.steps):
        if len(order) < args.batch:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:args.batch]], order[args.batch:]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{(time.time() - t0) / (step + 1):.2f}s/step width {width}", flush=True)
    train_s = time.time() - t0
    t = time.time()
    preds = generate_answers(model, tok, prompts, max_new_tokens=12)
    result = score(preds, refs)
    print("after", result, f"train {train_s:.0f}s, eval {time.time() - t:.0f}s")
    if args.retention:
        print("retention after", retention_score(model, tok, HERE / "retention" / "retention.jsonl"))
    for p, r in zip(preds, refs, strict=True):
        if p != r:
            print("  miss:", r, repr(p))


if __name__ == "__main__":
    main()
