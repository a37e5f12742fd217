"""``lorafit merge``: fold an adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

import argparse

from rich.console import Console

from lorafit.cli.loading import model_with_adapter
from lorafit.fsutil import atomic_dir, check_new_output


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain HF model")
    p.add_argument("base_model")
    p.add_argument("adapter")
    p.add_argument("output")
    p.add_argument("--dtype", default="float32",
                   help="dtype of the saved model (float32 | bfloat16 | float16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it is a non-empty folder")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from lorafit.lora import merge_and_unload
    from lorafit.models import parse_dtype

    # checked before loading anything: never into the inputs, the current folder, or over a user's folder
    out = check_new_output(args.output, args.overwrite,
                           protected={"adapter": args.adapter, "base model": args.base_model})
    # merged in float32 and cast after, so a bf16/fp16 output is rounded once
    model, tok = model_with_adapter(args.base_model, args.adapter)
    merge_and_unload(model, safe=True)
    model = model.to(parse_dtype(args.dtype))
    with atomic_dir(out) as tmp:  # no half-written model folder if saving fails
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    Console().print(f"wrote merged model to {out} "
                    "(loads with transformers' AutoModelForCausalLM.from_pretrained)")
    return 0
