"""Loading a model for the inference verbs (merge, generate, eval): base weights, then an optional adapter.

Imports torch only when called, so building the parser stays light.
"""

from __future__ import annotations


def model_with_adapter(base_model: str, adapter: str | None, dtype: str = "float32", four_bit: dict | None = None,
                       device: str | None = None):
    """``(model, tokenizer)`` in eval mode, with ``adapter`` attached when given; ``four_bit``: the base in 4 bits
    (``lorafit.models.quantize_base``'s arguments), as a QLoRA adapter was trained. On ``device``: by default the
    GPU when there is one, as ``lorafit train`` runs."""
    import torch

    from lorafit.lora import load_adapter
    from lorafit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(base_model, dtype, four_bit=four_bit)
    if adapter:
        load_adapter(model, adapter)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tok


def add_qlora_flag(p, what: str) -> None:
    """``--qlora [nf4|fp4|off]``: the adapter was trained over a 4-bit base; load the base that way."""
    p.add_argument("--qlora", nargs="?", const="nf4", choices=["nf4", "fp4", "off"], default=None,
                   help=f"the adapter was trained over a 4-bit base (QLoRA: nf4 with double quantization; fp4: "
                        f"without, as under adapter: lora + load_in_4bit): {what} the dequantized 4-bit weights it "
                        "was trained against. An adapter lorafit trained says so itself (its lorafit-run.json); "
                        "off: a dense base whatever it says")


def four_bit_of(choice: str | None) -> dict | None:
    """``lorafit.models.quantize_base``'s arguments for a ``--qlora`` choice (None: a dense base)."""
    return None if choice in (None, "off") else {"quant_type": choice, "double_quant": choice == "nf4"}


def four_bit_for(adapter: str | None, choice: str | None, console=None, default: dict | None = None) -> dict | None:
    """How to hold the base under ``adapter``: as ``--qlora`` says when given, else as the run that trained the
    adapter held it (its record), so a QLoRA adapter is scored and merged over the weights it learned against;
    ``default`` for an adapter with no record."""
    if choice is not None or not adapter:
        return four_bit_of(choice)
    from lorafit.config.schema import four_bit_settings
    from lorafit.train.run_record import recorded_fingerprint

    fp = recorded_fingerprint(adapter)
    if fp is None:
        return default
    four_bit = four_bit_settings(fp.get("adapter"), fp.get("load_in_4bit"), fp.get("bnb_config_kwargs"))
    if four_bit is not None and console is not None:
        console.print(f"[yellow]note:[/] {adapter} was trained over a 4-bit {four_bit['quant_type']} base (its run "
                      "record): loading the base that way; --qlora off for the dense base", highlight=False,
                      soft_wrap=True)
    return four_bit
