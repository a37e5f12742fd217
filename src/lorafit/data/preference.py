"""Preference data: pairs for ``rl: dpo`` / ``rl: orpo``, and KTO's unpaired rows (``rl: kto``): rows -> texts ->
token ids -> batches.

Texts, as axolotl's prompt strategies make them:

* ``chat_template.default``: ``field_messages`` is the prompt (a list of messages, or a string: one user
  message), rendered by the chat template with its generation prompt. ``field_chosen`` / ``field_rejected`` is the
  answer: a string (an assistant message), a message, or a list whose last message is the answer. An answer's text is
  what the template renders for that message, from its content on (axolotl renders it after a placeholder user
  turn and cuts there; lorafit looks for the content after the reply's header, where axolotl's search can stop
  at a role name), so the end of turn is part of it.
* ``chat_template.argilla_chat`` (axolotl's DPO strategy): ``field_chosen`` / ``field_rejected`` are whole
  conversations that share the prompt; the prompt is the chosen one's messages but the last, the answers are the
  last messages.
* ``chat_template.argilla`` under ``rl: orpo`` (axolotl's ORPO strategy): the same, and a row's ``system`` string
  opens the prompt as a system message and its ``prompt`` string is the user turn of a one-turn conversation (the
  argilla datasets' layout). axolotl puts ``prompt`` in every user turn of a longer conversation, dropping the
  questions the answers reply to; lorafit keeps a longer conversation's turns as they are. Under ``rl: dpo``
  (axolotl has no DPO strategy of that name) the type reads as ``argilla_chat``.
* ``chatml.intel`` / ``chatml.prompt_pairs``: ``question`` / ``prompt`` (and an optional ``system``) written in
  ChatML, the answers followed by ``<|im_end|>`` (axolotl writes these strings itself, whatever the template).
* ``passthrough``: ``prompt``, ``chosen`` and ``rejected`` strings, used as they are.

KTO's rows (axolotl's ``kto`` strategies): ``prompt`` (and an optional ``system``), one ``completion`` and a boolean
``label`` (true: desirable), the prompt written as llama3 headers (``llama3.ultra`` / ``llama3.prompt_pairs``) or
ChatML (``chatml.ultra`` / ``chatml.prompt_pairs``), the completion followed by that format's end of turn;
``passthrough``: ``prompt`` and ``completion`` strings as they are.

Tokens, as TRL's DPOTrainer (and KTOTrainer) makes them: the prompt and the prompt + answer are tokenized whole, and the answer
starts where the two first differ from the prompt (a token can merge across the boundary); an answer that does
not end with EOS gets it. The chat template places BOS itself; a prompt that does not start with the tokenizer's
BOS (a plain string) gets it, as tokenizing with special tokens does (TRL would add a second one after a
template's). Prompt + answer are cut to ``sequence_len`` by dropping their ends (TRL's ``keep_start``); a pair with no answer
token left is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorafit.data.chat import SHAREGPT_ROLES, resolve_chat_template
from lorafit.data.formats import IGNORE, TokenizerInfo, need_dict, string_field, value_field
from lorafit.data.loading import RowError

# axolotl's placeholder user turn before an answer rendered alone
DUMMY_USER = {"role": "user", "content": "[[dummy_message]]"}
CHATML_SYSTEM = "<|im_start|>system\n{}<|im_end|>\n"
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>"
LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
# KTO's row formats: (system, user turn, end of turn) per type
KTO_FORMATS = {"llama3.ultra": (LLAMA3_SYSTEM, LLAMA3_USER, "<|eot_id|>"),
               "llama3.prompt_pairs": (LLAMA3_SYSTEM, LLAMA3_USER, "<|eot_id|>"),
               "chatml.ultra": (CHATML_SYSTEM, CHATML_USER, "<|im_end|>"),
               "chatml.prompt_pairs": (CHATML_SYSTEM, CHATML_USER, "<|im_end|>"),
               "passthrough": ("", "{}", "")}


@dataclass
class PairSample:
    """One tokenized preference pair: the shared prompt and the two answers (ids only; every answer token trains)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""

    def __len__(self) -> int:
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def num_trained(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)

    def key(self) -> tuple:
        return tuple(self.prompt_ids), tuple(self.chosen_ids), tuple(self.rejected_ids)

    def truncated(self, sequence_len: int) -> PairSample | None:
        """Prompt + answer cut to ``sequence_len`` (the start kept); None when an answer has nothing left."""
        room = sequence_len - len(self.prompt_ids)
        if room <= 0:
            return None
        return PairSample(self.prompt_ids, self.chosen_ids[:room], self.rejected_ids[:room], self.source)

    def rows(self):
        """The chosen and the rejected sequence as supervised samples (for ``lorafit preprocess``)."""
        from lorafit.data.build import Sample

        p = [IGNORE] * len(self.prompt_ids)
        return [Sample(self.prompt_ids + ids, p + ids, f"{self.source} ({name})")
                for name, ids in (("chosen", self.chosen_ids), ("rejected", self.rejected_ids))]


@dataclass
class KTOSample:
    """One tokenized KTO row: a prompt, one completion (every token trains) and whether it is desirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_trained(self) -> int:
        return len(self.completion_ids)

    def key(self) -> tuple:
        return tuple(self.prompt_ids), tuple(self.completion_ids), self.desirable

    def truncated(self, sequence_len: int) -> KTOSample | None:
        room = sequence_len - len(self.prompt_ids)
        if room <= 0:
            return None
        return KTOSample(self.prompt_ids, self.completion_ids[:room], self.desirable, self.source)

    def rows(self):
        from lorafit.data.build import Sample

        kind = "desirable" if self.desirable else "undesirable"
        return [Sample(self.prompt_ids + self.completion_ids, [IGNORE] * len(self.prompt_ids) + self.completion_ids,
                       f"{self.source} ({kind})")]


# ---- rows -> texts -------------------------------------------------------------------------------------------
def _field(row: Any, key: str, kind: str) -> Any:
    return value_field(need_dict(row, kind), key, kind)


def _string(row: Any, key: str, kind: str, answer: bool = False) -> str:
    v = string_field(need_dict(row, kind), key, kind)
    if answer and not v.strip():
        raise RowError(f"{kind} row field '{key}' is empty; every answer needs text")
    return v


class PreferenceTexts:
    """``row -> (prompt, chosen, rejected)`` texts for one dataset entry of a preference type."""

    def __init__(self, spec, cfg, tokenizer):
        self.spec, self.tok, self.kind = spec, tokenizer, spec.type
        self.orpo_fields = spec.type == "chat_template.argilla" and cfg.rl == "orpo"  # the row's system and prompt
        self.template = resolve_chat_template(cfg, tokenizer) if spec.type.startswith("chat_template") else None
        self.template_kwargs = dict(cfg.chat_template_kwargs or {})
        self.role_map = dict(SHAREGPT_ROLES)
        for canonical, names in (spec.roles or {}).items():
            self.role_map.setdefault(canonical, canonical)
            self.role_map.update({n: canonical for n in names})

    def __call__(self, row: Any) -> tuple[str, str, str]:
        read = {"passthrough": self._passthrough, "chat_template.argilla": self._argilla,
                "chat_template.argilla_chat": self._argilla, "chat_template.default": self._default}
        return read.get(self.kind, self._chatml)(row)

    def _passthrough(self, row: Any) -> tuple[str, str, str]:
        return (_string(row, "prompt", self.kind), _string(row, "chosen", self.kind, answer=True),
                _string(row, "rejected", self.kind, answer=True))

    def _chatml(self, row: Any) -> tuple[str, str, str]:
        """chatml.intel (``question``) / chatml.prompt_pairs (``prompt``), optional ``system``: axolotl's strings."""
        question = _string(row, "question" if self.kind == "chatml.intel" else "prompt", self.kind)
        system = row.get("system")
        prompt = (CHATML_SYSTEM.format(system) if system else "") + CHATML_USER.format(question)
        return (prompt, _string(row, self.spec.field_chosen, self.kind, answer=True) + "<|im_end|>",
                _string(row, self.spec.field_rejected, self.kind, answer=True) + "<|im_end|>")

    def _argilla(self, row: Any) -> tuple[str, str, str]:
        """Two conversations sharing the prompt: the chosen one's messages but the last, then each last message."""
        s = self.spec
        chosen, rejected = self._conversation(row, s.field_chosen), self._conversation(row, s.field_rejected)
        if len(chosen) < 2:
            raise RowError(f"{self.kind} row field '{s.field_chosen}' holds only the answer; it needs the prompt's "
                           "messages before it")
        prompt = chosen[:-1]
        if self.orpo_fields:
            prompt = self._argilla_prompt(row, prompt)
        return (self._render(prompt), self._answer(chosen[-1], s.field_chosen),
                self._answer(rejected[-1], s.field_rejected))

    def _argilla_prompt(self, row: Any, messages: list[dict]) -> list[dict]:
        """ORPO's argilla rows: the row's ``system`` first, its ``prompt`` as the user turn of a one-turn
        conversation (when strings)."""
        messages = list(messages)
        prompt = row.get("prompt")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if isinstance(prompt, str) and prompt and len(users) == 1:
            messages[users[0]] = {"role": "user", "content": prompt}
        system = row.get("system")
        if isinstance(system, str) and system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def _default(self, row: Any) -> tuple[str, str, str]:
        """The prompt's messages (or a string: one user message), and each answer."""
        s = self.spec
        messages = _field(row, s.field_messages, self.kind)
        if isinstance(messages, str):
            messages = [{s.message_field_role: "user", s.message_field_content: messages}]
        prompt = self._messages(messages, s.field_messages)
        return (self._render(prompt), self._answer(self._last(row, s.field_chosen), s.field_chosen),
                self._answer(self._last(row, s.field_rejected), s.field_rejected))

    def _conversation(self, row: Any, key: str) -> list[dict]:
        value = _field(row, key, self.kind)
        if not isinstance(value, list) or not value:
            raise RowError(f"{self.kind} row field '{key}' must be a non-empty list of messages")
        return self._messages(value, key)

    def _last(self, row: Any, key: str) -> dict:
        """The answer of ``chat_template.default``: a string, a message, or the last of a list of messages."""
        value = _field(row, key, self.kind)
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        if isinstance(value, list) and value:
            value = value[-1]
        return self._messages([value], key)[0]

    def _messages(self, messages: Any, key: str) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise RowError(f"{self.kind} row field '{key}' must be a non-empty list of messages")
        rkey, ckey = self.spec.message_field_role, self.spec.message_field_content
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get(ckey), str) or rkey not in m:
                raise RowError(f"{key}[{j}] needs '{rkey}' and a string '{ckey}'")
            role = self.role_map.get(m[rkey]) if isinstance(m[rkey], str) else None
            if role is None:
                raise RowError(f"{key}[{j}] has role {m[rkey]!r}; map it to user, assistant, system or tool with roles:")
            out.append({"role": role, "content": m[ckey]})
        return out

    def _render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                add_generation_prompt=generation_prompt, **self.template_kwargs)
        except Exception as e:
            raise RowError(f"chat template failed on this row: {str(e).splitlines()[0]}") from None

    def _answer(self, message: dict, key: str) -> str:
        """The answer as the template renders a reply, from its content to the end of its turn (axolotl's cut)."""
        content = message["content"]
        if not content.strip():
            raise RowError(f"{self.kind} row field '{key}' has an empty answer; every answer needs text")
        text = self._render([DUMMY_USER, message], generation_prompt=False)
        # looked for after the reply's header, so an answer such as "user" is not found in a role name
        head = self._render([DUMMY_USER])
        start = len(head) if text.startswith(head) else 0
        at = text.find(content, start)
        if at < 0:  # a template that trims the content
            at = text.find(content.strip(), start)
        if at < 0:
            raise RowError(f"{self.kind} row field '{key}': the chat template does not render the answer's text")
        return text[at:].rstrip()


def kto_texts(kind: str, row: Any) -> tuple[str, str, bool]:
    """``(prompt, completion, desirable)`` of a KTO row of type ``kind``."""
    system_fmt, user_fmt, end = KTO_FORMATS[kind]
    prompt = _string(row, "prompt", kind)
    label = _field(row, "label", kind)
    if not isinstance(label, bool):
        raise RowError(f"{kind} row field 'label' must be true (desirable) or false, got {label!r}")
    system = row.get("system") if system_fmt else None
    head = system_fmt.format(system) if system else ""
    return head + user_fmt.format(prompt), _string(row, "completion", kind, answer=True) + end, label


# ---- texts -> ids ---------------------------------------------------------------------------------------------
def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pair(prompt: str, chosen: str, rejected: str, info: TokenizerInfo, source: str = "") -> PairSample:
    """TRL's tokenization of a pair (see the module's docstring)."""
    p, pc, pr = _ids(prompt, info), _ids(prompt + chosen, info), _ids(prompt + rejected, info)
    n = min(_common_prefix(p, pc), _common_prefix(p, pr))
    chosen_ids, rejected_ids = pc[n:], pr[n:]
    for answer in (chosen_ids, rejected_ids):
        if not answer or answer[-1] != info.eos_id:
            answer.append(info.eos_id)
    return PairSample(p[:n], chosen_ids, rejected_ids, source)


def _ids(text: str, info: TokenizerInfo) -> list[int]:
    """The text's ids, the tokenizer's BOS first unless the text placed it."""
    out = info.encode(text)
    prefix = info.prefix_ids
    return out if not prefix or out[: len(prefix)] == prefix else prefix + out


def tokenize_kto(prompt: str, completion: str, desirable: bool, info: TokenizerInfo) -> KTOSample:
    """TRL's KTOTrainer tokenization: as a pair's (see the module's docstring), for one completion."""
    p, pc = _ids(prompt, info), _ids(prompt + completion, info)
    n = _common_prefix(p, pc)
    completion_ids = pc[n:]
    if not completion_ids or completion_ids[-1] != info.eos_id:
        completion_ids.append(info.eos_id)
    return KTOSample(p[:n], completion_ids, desirable)


class PairTokenizer:
    """``row -> PairSample`` for one dataset entry of a preference type."""

    def __init__(self, spec, cfg, info: TokenizerInfo):
        self.texts = PreferenceTexts(spec, cfg, info.tok)
        self.info = info

    def __call__(self, row: Any) -> PairSample:
        return tokenize_pair(*self.texts(row), self.info)


class KTOTokenizer:
    """``row -> KTOSample`` for one dataset entry of a KTO type."""

    def __init__(self, spec, info: TokenizerInfo):
        self.kind, self.info = spec.type, info

    def __call__(self, row: Any) -> KTOSample:
        return tokenize_kto(*kto_texts(self.kind, row), self.info)


# ---- ids -> batches -------------------------------------------------------------------------------------------
def pair_batches(samples: list[PairSample], *, micro_batch_size: int, sequence_len: int, pad_id: int,
                 shuffle: bool, seed: int, epoch: int, pad_to_sequence_len: bool = False) -> list[dict]:
    """All micro-batches of one epoch: ``micro_batch_size`` pairs each, the chosen rows first and the rejected ones
    after them (TRL's concatenated batch: one forward for both). Each batch has ``input_ids``, ``labels`` (-100
    on prompt and padding), ``attention_mask``, ``num_examples`` (pairs) and ``num_trained_tokens`` (answer
    tokens)."""
    from lorafit.data.batching import _order

    order = _order(len(samples), shuffle, seed, epoch)
    out = []
    for b in range(0, len(order), micro_batch_size):
        pairs = [samples[i] for i in order[b : b + micro_batch_size]]
        rows = [(s.prompt_ids, s.chosen_ids) for s in pairs] + [(s.prompt_ids, s.rejected_ids) for s in pairs]
        out.append(_collate_pairs(rows, len(pairs), sequence_len if pad_to_sequence_len else None, pad_id))
    return out


def kto_batches(samples: list[KTOSample], *, micro_batch_size: int, sequence_len: int, pad_id: int,
                shuffle: bool, seed: int, epoch: int, pad_to_sequence_len: bool = False) -> list[dict]:
    """KTO's micro-batches: ``micro_batch_size`` rows, then as many mismatched rows for its KL estimate, each prompt
    with the completion of the row before it in the micro-batch (the first with the last's), as TRL pairs them;
    ``desirable`` flags the rows. Each sequence is cut to ``sequence_len``."""
    from lorafit.data.batching import _order

    order = _order(len(samples), shuffle, seed, epoch)
    out = []
    for b in range(0, len(order), micro_batch_size):
        rows = [samples[i] for i in order[b : b + micro_batch_size]]
        shifted = rows[-1:] + rows[:-1]
        seqs = [(s.prompt_ids, s.completion_ids) for s in rows] + \
            [(s.prompt_ids, o.completion_ids) for s, o in zip(rows, shifted, strict=True)]
        seqs = [(p[:sequence_len], c[: max(0, sequence_len - len(p))]) for p, c in seqs]
        batch = _collate_pairs(seqs, len(rows), sequence_len if pad_to_sequence_len else None, pad_id)
        batch["desirable"] = torch.tensor([s.desirable for s in rows])
        batch["num_trained_tokens"] = int((batch["labels"][: len(rows), 1:] != IGNORE).sum())
        out.append(batch)
    return out


def preference_batches(samples: list, **kw) -> list[dict]:
    """:func:`pair_batches` or :func:`kto_batches`, by the samples' kind."""
    return (kto_batches if isinstance(samples[0], KTOSample) else pair_batches)(samples, **kw)


def _collate_pairs(rows: list[tuple[list[int], list[int]]], n_pairs: int, width: int | None, pad_id: int) -> dict:
    width = width or max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[r, :n] = torch.tensor(prompt + answer)
        labels[r, len(prompt):n] = torch.tensor(answer)
        labels[r, 0] = IGNORE  # position 0 is never predicted
        attention[r, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "num_examples": n_pairs,
            "num_trained_tokens": int((labels[:, 1:] != IGNORE).sum())}
