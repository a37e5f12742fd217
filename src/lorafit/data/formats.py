"""Row formats -> ``(input_ids, labels)``; labels are aligned with input_ids and -100 where not trained.

Labels are built from the structure of the row (which part is prompt, which is answer), never by comparing
ids with the pad token: many tokenizers (the demo one included) use the EOS token as pad, and the EOS at the
end of an answer must be trained so the model learns to stop.

* ``alpaca``: ``instruction``, optional ``input``, ``output``, rendered with the standard Alpaca prompt
  (as axolotl's ``type: alpaca`` does, even when the tokenizer has a chat template). The output and the
  EOS after it are trained; the prompt too when ``train_on_inputs``. ``alpaca:chat`` / ``alpaca:chatml`` /
  ``alpaca:phi``: the same system prompt and fields in axolotl's other ``AlpacaPrompter`` styles.
* ``completion``: raw text (field ``text`` or the dataset's ``field``); BOS when the tokenizer adds one,
  EOS appended; every token trained.
* ``input_output``: ``{"segments": [{"text": ..., "label": true|false}, ...]}``; each segment is tokenized
  without added special tokens and trained where ``label`` is true. Nothing is added: put BOS/EOS in the
  text where you want them (special-token strings in the text are recognised).
* ``chat_template``: see :mod:`lorafit.data.chat`.
"""

from __future__ import annotations

from typing import Any

from lorafit.data.loading import RowError

IGNORE = -100

# axolotl's AlpacaPrompter (prompters.py): the system prompts, and per prompt style the system format and the
# turn formats with and without input
ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.")
ALPACA_SYSTEM_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately " \
                         "completes the request."
ALPACA_STYLES = {
    "instruct": ("{system}\n\n", "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n"),
    "chat": ("SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"),
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n",
               "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
    "phi": ("<|system|>\n{system}<|end|>\n", "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
            "<|user|>\n{instruction}<|end|>\n<|assistant|>\n"),
}


def alpaca_prompt(instruction: str, inp: str | None, style: str = "instruct") -> str:
    system, turn, turn_no_input = ALPACA_STYLES[style]
    if inp:
        return system.format(system=ALPACA_SYSTEM) + turn.format(instruction=instruction, input=inp)
    return system.format(system=ALPACA_SYSTEM_NO_INPUT) + turn_no_input.format(instruction=instruction)


class TokenizerInfo:
    """What the formats need to know about a tokenizer, worked out once."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.eos_token_id is None:
            from lorafit.errors import LorafitError

            raise LorafitError("the tokenizer has no EOS token; set special_tokens: {eos_token: ...}")
        self.eos_id: int = tokenizer.eos_token_id
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.prefix_ids: list[int] = []  # e.g. [BOS] for Llama tokenizers, [] for SmolLM2
        for i in range(len(with_special) - len(without) + 1):
            if with_special[i : i + len(without)] == without:
                self.prefix_ids = list(with_special[:i])
                break

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def value_field(row: dict, key: str, kind: str, required: bool = True) -> Any:
    """``row[key]``; a missing (or null) one is a row error naming the fields the row has (None if not required)."""
    if row.get(key) is None:
        if not required:
            return None
        has = ", ".join(str(k) for k in row) or "no fields"
        raise RowError(f"{kind} row is missing '{key}' (has: {has})")
    return row[key]


def string_field(row: dict, key: str, kind: str, required: bool = True) -> str | None:
    """:func:`value_field`, which must be a string."""
    v = value_field(row, key, kind, required)
    if v is not None and not isinstance(v, str):
        raise RowError(f"{kind} row field '{key}' must be a string, got {type(v).__name__}")
    return v


def need_dict(row: Any, kind: str) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"{kind} row must be a JSON object, got {type(row).__name__}")
    return row


def tokenize_alpaca(row: Any, info: TokenizerInfo, train_on_inputs: bool,
                    style: str = "instruct") -> tuple[list[int], list[int]]:
    row = need_dict(row, "alpaca")
    instruction = string_field(row, "instruction", "alpaca")
    output = string_field(row, "output", "alpaca")
    inp = string_field(row, "input", "alpaca", required=False)
    prompt = alpaca_prompt(instruction, inp, style)
    prompt_ids = info.prefix_ids + info.encode(prompt)
    answer_ids = info.encode(output) + [info.eos_id]
    ids = prompt_ids + answer_ids
    labels = (list(prompt_ids) if train_on_inputs else [IGNORE] * len(prompt_ids)) + answer_ids
    return ids, labels


def tokenize_completion(row: Any, info: TokenizerInfo, field: str) -> tuple[list[int], list[int]]:
    row = need_dict(row, "completion")
    text = string_field(row, field, "completion")
    ids = info.prefix_ids + info.encode(text) + [info.eos_id]
    return ids, list(ids)


def tokenize_input_output(row: Any, info: TokenizerInfo, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    row = need_dict(row, "input_output")
    segments = row.get("segments")
    if not isinstance(segments, list) or not segments:
        has = ", ".join(str(k) for k in row) or "no fields"
        raise RowError(f"input_output row needs a non-empty list 'segments' (has: {has})")
    ids: list[int] = []
    labels: list[int] = []
    for j, seg in enumerate(segments):
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str):
            raise RowError(f"input_output segments[{j}] must be an object with a string 'text'")
        label = seg.get("label", True)
        if not isinstance(label, bool):
            raise RowError(f"input_output segments[{j}].label must be true or false, got {label!r}")
        seg_ids = info.encode(seg["text"])
        ids += seg_ids
        labels += seg_ids if (label or train_on_inputs) else [IGNORE] * len(seg_ids)
    return ids, labels
