"""``lorafit merge``: fold an adapter into its base model and save a plain Hugging Face model."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from lorafit.cli.loading import add_qlora_flag, base_for, model_with_adapter
from lorafit.errors import LorafitError
from lorafit.fsutil import atomic_dir, check_new_output, display, listing, read_json, write_json

# In the merged folder: which base and adapter made it, and the files it wrote, so merging the same pair again
# replaces it without --overwrite (and a file the user added there is never lost unasked).
RECORD = "lorafit-merge.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain HF model")
    p.add_argument("base_model")
    p.add_argument("adapter")
    p.add_argument("output")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the saved model: auto (default: the dtype the base is stored in, float32 for a "
                        "GGUF file) | float32 | bfloat16 | float16")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it is a non-empty folder")
    add_qlora_flag(p, "merge into")
    p.set_defaults(func=cmd_merge)


def _source(name: str) -> str:
    """A base model or adapter as the record names it: the absolute path when it is a local one."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def stored_dtype(base_model: str) -> str:
    """The dtype a base model folder is stored in (its config.json's ``dtype``, ``torch_dtype`` before
    transformers 5), so a merged bf16 model stays bf16 as PEFT's ``merge_and_unload`` keeps it; float32 where the
    folder does not say, and for a GGUF file, whose quantized weights have no 16-bit dtype to keep."""
    from lorafit import dtypes
    from lorafit.models import resolve_model_path

    folder, gguf = resolve_model_path(base_model)
    config = None if gguf else read_json(folder / "config.json")
    name = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    return name if name in dtypes.BYTES else "float32"


def previous_merge(out: Path, base: str, adapter: str, overwrite: bool) -> bool:
    """True when ``out`` holds only this base and adapter's earlier merge (replacing it loses nothing);
    a one-line error when it holds that merge plus files the merge did not write (unless ``overwrite``)."""
    record = read_json(out / RECORD) if out.is_dir() else None
    if not record or (record.get("base_model"), record.get("adapter")) != (base, adapter):
        return False
    extra = {p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()} \
        - set(record.get("files", [])) - {RECORD}
    if extra and not overwrite:
        raise LorafitError(f"{display(out)}: holds an earlier merge plus files it did not write "
                           f"({listing(extra)}); move them, or pass --overwrite to replace the folder")
    return not extra


def cmd_merge(args) -> int:
    from lorafit.linearized import save_pretrained
    from lorafit.lora import merge_and_unload
    from lorafit.models import dequantize_base, parse_dtype

    console = Console()
    dtype = parse_dtype(stored_dtype(args.base_model) if args.dtype == "auto" else args.dtype)  # a bad one: now
    base, adapter = _source(args.base_model), _source(args.adapter)
    own = previous_merge(Path(args.output).expanduser(), base, adapter, args.overwrite)
    # checked before loading anything: never into the inputs, the current folder, or over a user's folder
    out = check_new_output(args.output, args.overwrite or own,
                           protected={"adapter": args.adapter, "base model": args.base_model})
    if own:
        console.print(f"[yellow]note:[/] {display(out)}: replacing the earlier merge of this base model and adapter",
                      highlight=False, soft_wrap=True)
    # merged in float32 and cast after, so a bf16/fp16 output is rounded once
    # QLoRA: W' = dequantize(quantize(W)) + s·B A, the weights the adapter was trained against, written dense;
    # re-quantizing W' to 4 bits would round most of the update away
    # 8-bit: W' = dequantize(int8 W) + s·B A, the same way
    held = base_for(args.adapter, args.qlora, args.base_8bit, console)
    model, tok = model_with_adapter(args.base_model, args.adapter, device="cpu", **held)  # written from host
    merge_and_unload(model, safe=True)
    if held["four_bit"] is not None or held["eight_bit"]:
        dequantize_base(model)  # the layers the adapter did not touch: dequantized too
    model = model.to(dtype)
    with atomic_dir(out) as tmp:  # no half-written model folder if saving fails
        save_pretrained(model, tmp)  # linearized Llama 4 experts written fused: plain transformers loads it
        tok.save_pretrained(tmp)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        write_json(tmp / RECORD, {"written_by": "lorafit merge", "base_model": base, "adapter": adapter,
                                  "files": files})
    console.print(f"wrote merged model ({str(dtype).removeprefix('torch.')}) to {display(out)} "
                  "(loads with transformers' AutoModelForCausalLM.from_pretrained)", highlight=False)
    return 0
