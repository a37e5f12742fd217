"""Loading a model for the inference verbs (merge, generate, eval): base weights, then an optional adapter.

Imports torch only when called, so building the parser stays light.
"""

from __future__ import annotations


def model_with_adapter(base_model: str, adapter: str | None, dtype: str = "float32", four_bit: dict | None = None,
                       device: str | None = None, eight_bit: bool = False, moe_experts: bool = False,
                       linearized_experts: bool = False):
    """``(model, tokenizer)`` in eval mode, with ``adapter`` attached when given; ``four_bit``: the base in 4 bits
    (``lorafit.models.quantize_base``'s arguments), as a QLoRA adapter was trained; ``eight_bit``: in 8 bits
    (LLM.int8), as a ``load_in_8bit`` adapter was; ``moe_experts``: a MoE model's experts in those bits too
    (``quantize_moe_experts``); ``linearized_experts``: Llama 4's experts as linear layers, as the adapter was
    trained (``llama4_linearized_experts``). On ``device``: by default the GPU when there is one, as
    ``lorafit train`` runs."""
    import torch

    from lorafit.lora import load_adapter
    from lorafit.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(base_model, dtype, four_bit=four_bit, eight_bit=eight_bit,
                                          moe_experts=moe_experts, linearized_experts=linearized_experts)
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
    p.add_argument("--base-8bit", nargs="?", const="on", choices=["on", "off"], default=None,
                   help=f"the adapter was trained over an 8-bit base (load_in_8bit, LLM.int8): {what} the "
                        "dequantized int8 weights it was trained against. An adapter lorafit trained says so itself; "
                        "off: a dense base whatever it says")


def four_bit_of(choice: str | None) -> dict | None:
    """``lorafit.models.quantize_base``'s arguments for a ``--qlora`` choice (None: a dense base)."""
    return None if choice in (None, "off") else {"quant_type": choice, "double_quant": choice == "nf4"}


def base_for(adapter: str | None, qlora: str | None, base_8bit: str | None, console=None,
             default: dict | None = None) -> dict:
    """How to hold the base under ``adapter`` (``model_with_adapter``'s ``four_bit`` and ``eight_bit``): as
    ``--qlora`` / ``--base-8bit`` say when given, else as the run that trained the adapter held it (its record),
    so an adapter trained over a 4-bit or 8-bit base is scored and merged over the weights it learned against;
    ``default`` for an adapter with no record."""
    from lorafit.errors import LorafitError

    if qlora not in (None, "off") and base_8bit == "on":
        raise LorafitError("--qlora and --base-8bit are both given; an adapter was trained over one base, keep one")
    from lorafit.train.run_record import recorded_quantization

    held = recorded_quantization(adapter) if adapter else None
    if qlora is not None or base_8bit is not None or not adapter:
        # the flags say how the base's layers were held; a MoE model's experts as its record says
        experts = bool(held and held["moe_experts"]) and (qlora not in (None, "off") or base_8bit == "on")
        return {"four_bit": four_bit_of(qlora), "eight_bit": base_8bit == "on", "moe_experts": experts,
                "linearized_experts": bool(held and held["linearized_experts"])}
    if held is None:
        return default or {"four_bit": None, "eight_bit": False, "moe_experts": False, "linearized_experts": False}
    if console is not None and held["four_bit"] is not None:
        console.print(f"[yellow]note:[/] {adapter} was trained over a 4-bit {held['four_bit']['quant_type']} base "
                      "(its run record): loading the base that way; --qlora off for the dense base", highlight=False,
                      soft_wrap=True)
    if console is not None and held["eight_bit"]:
        console.print(f"[yellow]note:[/] {adapter} was trained over an 8-bit (LLM.int8) base (its run record): "
                      "loading the base that way; --base-8bit off for the dense base", highlight=False,
                      soft_wrap=True)
    return held
