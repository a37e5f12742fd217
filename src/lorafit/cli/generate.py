"""``lorafit generate``: answers to one or more prompts from a model, with or without an adapter."""

from __future__ import annotations

import argparse

from rich.console import Console

from lorafit.cli.loading import add_qlora_flag, base_for, model_with_adapter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a model, with or without an adapter")
    p.add_argument("base_model")
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts allowed)")
    p.add_argument("--adapter")
    add_qlora_flag(p, "generate over")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--system", help="system message for chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def prompt_ids(tok, prompt: str, args):
    """Token ids of ``prompt``: in the chat template, or as written (``--raw``, or no template)."""
    if args.raw or not tok.chat_template:
        return tok(prompt, return_tensors="pt").input_ids
    system = [{"role": "system", "content": args.system}] if args.system else []
    msgs = system + [{"role": "user", "content": prompt}]
    encoded = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return encoded["input_ids"]


def cmd_generate(args) -> int:
    import torch

    console = Console()
    held = base_for(args.adapter, args.qlora, args.base_8bit, console)
    model, tok = model_with_adapter(args.base_model, args.adapter, **held)
    if args.sample:
        decoding = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        decoding = dict(do_sample=False)
    for prompt in args.prompt:
        ids = prompt_ids(tok, prompt, args)
        torch.manual_seed(args.seed)  # each prompt samples as if it were given alone
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, **decoding)
        console.print(f"[bold]> {prompt}[/]")
        console.print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), markup=False)
    return 0
