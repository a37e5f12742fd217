"""Task scoring: held-out exact match and retention, used by ``lorafit eval`` and ``make demo``.

Four pieces:

- **Comparing answers.** :func:`normalize` puts a generated answer and a reference into one canonical
  form (trimmed, whitespace collapsed, trailing end-of-turn markers and sentence punctuation dropped);
  :func:`exact_match` compares two normalised strings; :func:`score` turns lists of predictions and
  references into an exact-match rate. :func:`contains_answer` is the looser test used for retention: the
  known answer appears in the prediction as a whole word (so ``"4"`` is found in ``"2 + 2 = 4."`` but not
  in ``"14"``).
- **Generating answers.** :func:`load_heldout` reads a ``chat_template`` JSONL file and splits each row
  into the prompt messages and the final assistant answer; :func:`generate_answers` renders the prompts
  with the tokenizer's chat template and decodes greedily in left-padded batches (the attention mask
  keeps padding out, so a batch gives the same answers as one prompt at a time).
- **Settling early.** :func:`can_still_match` and :func:`answer_found` tell from an unfinished answer that its
  score can no longer change; :func:`generate_answers` then stops that row and marks its answer with
  :data:`CUT`, so scoring costs the tokens that decide it, with the scores of full generation.
- **Retention** (what fine-tuning kept of what the base model already did well): :func:`retention_score`
  reads a retention file (rows ``{"messages", "reference", "answer"}``, made once from the base model by
  ``examples/make_retention_set.py``) and reports (a) accuracy: the fraction of generated answers that still
  contain the known answer, and (b) perplexity of the base model's own answers (``reference``) under the
  model being scored, on the answer tokens and the end-of-turn token only (the prompt is masked). That pass
  also shows each greedy answer as far as it follows the reference (:func:`reference_scores`): a row whose score
  settles there is not generated again (for the base model, whose answers the references are, almost none is).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lorafit._compat import cache_kwarg
from lorafit.errors import LorafitError

# Strings that end a turn in common chat templates; a decoded answer may keep them when special tokens are
# not skipped, and they are never part of the answer.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
               "<|end_of_text|>", "<|eom_id|>")
_TRAILING_PUNCT = ".!;,"
_QUOTES = ("\"\"", "''", "``")

Messages = list[dict[str, Any]]


# --------------------------------------------------------------------------------------------- comparing

def normalize(text: str, *, ignore_case: bool = False) -> str:
    """Canonical form of an answer for comparison.

    Trims, drops trailing end-of-turn markers (``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...), collapses every
    run of whitespace to one space, removes one pair of surrounding quotes or backticks, and drops trailing
    sentence punctuation (``. ! ; ,``) so ``"2021-03-05."`` equals ``"2021-03-05"``. Case is kept unless
    ``ignore_case``. Inner punctuation is kept: ``"U.S"`` and ``"US"`` stay different.
    """
    s = text.strip()
    changed = True
    while changed:  # markers may repeat or be separated by whitespace: "...<|im_end|>\n</s>"
        changed = False
        for marker in END_OF_TURN:
            if s.endswith(marker):
                s = s[: -len(marker)].rstrip()
                changed = True
    s = " ".join(s.split())
    if len(s) >= 2 and (s[0] + s[-1]) in _QUOTES:
        s = s[1:-1].strip()
    s = s.rstrip(_TRAILING_PUNCT).rstrip()
    return s.lower() if ignore_case else s


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False) -> bool:
    """True when the two answers are equal after :func:`normalize`."""
    return normalize(prediction, ignore_case=ignore_case) == normalize(reference, ignore_case=ignore_case)


def contains_answer(prediction: str, answer: str | Sequence[str]) -> bool:
    """True when ``answer`` (or one of several accepted answers) is in ``prediction`` as a whole word/phrase.

    Case-insensitive, whitespace-normalised; "whole" means not glued to a letter or digit on either side,
    nor part of a decimal or negative number: ``"Paris"`` is found in ``"The capital is Paris."``, while
    ``"4"`` is not found in ``"14"``, ``"4.22"`` or ``"-4"``.
    """
    text = " ".join(prediction.split()).lower()
    return any(p.search(text) for p in _answer_patterns(answer))


def _answer_patterns(answer: str | Sequence[str]) -> list[re.Pattern]:
    """One regex per accepted answer, for whitespace-normalised lower-case text (:func:`contains_answer`)."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    patterns = []
    for a in answers:
        a = " ".join(a.split()).lower()
        if not a:
            continue
        # not glued to a letter or digit, and not part of a decimal ("0" is not in "-18.0", "4" not in "4.22")
        before = r"(?<![0-9a-z])(?<![0-9][.,])" + (r"(?<!-)" if a[0].isdigit() else "")
        after = r"(?![0-9a-z])(?![.,][0-9])"
        patterns.append(re.compile(before + re.escape(a) + after))
    return patterns


def score(predictions: Sequence[str], references: Sequence[str], *, ignore_case: bool = False) -> dict:
    """Exact-match rate of ``predictions`` against ``references`` (same length, same order).

    Returns ``{"exact_match": rate in [0, 1], "correct": k, "count": n}`` (rate 0.0 for empty lists).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    pairs = zip(predictions, references, strict=True)
    correct = sum(exact_match(p, r, ignore_case=ignore_case) for p, r in pairs)
    n = len(references)
    return {"exact_match": correct / n if n else 0.0, "correct": correct, "count": n}


# ------------------------------------------------------------------------------------------ settling early
#
# A row's score is known before its answer ends: a date answer that starts "The date" can no longer equal
# "2043-10-14", and a retention answer that has said "Paris." still contains "Paris" whatever follows. The
# checks below see the decoded text of the tokens generated so far and must never call a row settled when
# some continuation could change its score. Decoding a prefix of the tokens gives a prefix of the full text
# except in two ways, both handled: a UTF-8 character split across tokens decodes as U+FFFD until its last
# byte arrives (dropped here), and the tokenizer's clean-up deletes a space before "." "," "'s" ... once the
# next token comes (whitespace is ignored by the exact-match check, and kept clear of by the retention one).

# Characters after a found answer that must be seen before it counts: its own look-ahead (2) and the longest
# clean-up pattern (" n't": 4), with room to spare.
FOUND_MARGIN = 8


def _known_text(partial: str) -> str:
    return partial.rstrip("\ufffd")  # a character cut mid-way shows as U+FFFD until its last byte arrives


def _squeezed(text: str, ignore_case: bool) -> str:
    s = "".join(text.split())  # whitespace-free: collapsing, stripping and the clean-up change nothing here
    return s.casefold() if ignore_case else s  # casefold, not lower: lower's final sigma depends on what follows


def can_still_match(partial: str, reference: str, *, ignore_case: bool = False) -> bool:
    """False once no continuation of the answer so far, ``partial``, can :func:`exact_match` ``reference``.

    Without whitespace, a matching answer is: an optional opening quote, the normalised reference, then what
    normalize() strips at the end, in this order: sentence punctuation, the closing quote (with an opening
    one), end-of-turn markers. The answer so far must be a prefix of such a string.
    """
    seen = _squeezed(_known_text(partial), ignore_case)
    target = _squeezed(normalize(reference, ignore_case=ignore_case), ignore_case)
    for opening in ("", '"', "'", "`"):
        want = opening + target
        if want.startswith(seen) or (seen.startswith(want) and _strippable(seen[len(want):], opening)):
            return True
    return False


def _strippable(tail: str, opening: str) -> bool:
    """Whether ``tail`` starts what normalize() removes after an answer: punctuation, closing quote, markers."""
    rest = tail.lstrip(_TRAILING_PUNCT)
    if opening:
        if not rest:
            return True
        if rest[0] != opening:
            return False
        rest = rest[1:]
    while rest:
        marker = next((m for m in END_OF_TURN if rest.startswith(m)), None)  # no marker starts another
        if marker is None:
            return any(m.startswith(rest) for m in END_OF_TURN)
        rest = rest[len(marker):]
    return True


def answer_found(partial: str, answer: str | Sequence[str]) -> bool:
    """True once the answer so far, ``partial``, contains ``answer`` (:func:`contains_answer`) followed by
    :data:`FOUND_MARGIN` more characters: then nothing generated later can change that part of the text."""
    text = " ".join(_known_text(partial).split()).lower()
    for pattern in _answer_patterns(answer):
        if any(m.end() + FOUND_MARGIN <= len(text) for m in pattern.finditer(text)):
            return True
    return False


# ------------------------------------------------------------------------------------------------ files

def _read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorafitError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                   "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise LorafitError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise LorafitError(f"{path}: no rows")
    return rows


def _check_messages(messages: Any, where: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise LorafitError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LorafitError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    return messages


def load_heldout(path: str | Path) -> list[tuple[Messages, str]]:
    """Read a ``chat_template`` JSONL file into ``(prompt messages, reference answer)`` pairs.

    Each row is ``{"messages": [...]}`` whose last message is the assistant's answer; the prompt is every
    message before it (a system message, earlier turns ...). Malformed rows raise :class:`LorafitError`
    naming the file and line.
    """
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if "messages" not in row:
            raise LorafitError(f"{where}: missing key 'messages' (found: {', '.join(row) or 'none'})")
        messages = _check_messages(row["messages"], where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise LorafitError(f"{where}: the last message must be the assistant's answer, "
                               "after at least one prompt message")
        out.append(([dict(m) for m in messages[:-1]], messages[-1]["content"]))
    return out


def load_retention(path: str | Path) -> list[dict]:
    """Read a retention JSONL file.

    Rows are ``{"messages": [...prompt...], "reference": str, "answer": str | [str]}``.
    """
    out = []
    for lineno, row in _read_jsonl(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("messages", "reference", "answer") if k not in row]
        if missing:
            raise LorafitError(f"{where}: missing key(s) {', '.join(missing)}; "
                               "a retention row has messages, reference, answer")
        messages = _check_messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            raise LorafitError(f"{where}: 'messages' holds the prompt only; "
                               "the base answer goes in 'reference'")
        if not isinstance(row["reference"], str) or not isinstance(row["answer"], str | list):
            raise LorafitError(f"{where}: 'reference' must be a string "
                               "and 'answer' a string or list of strings")
        out.append({"messages": messages, "reference": row["reference"], "answer": row["answer"]})
    return out


# ------------------------------------------------------------------------------------------- generating

def _render_prompt(tokenizer, messages: Messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config and tokenizer, plus end-of-turn tokens the vocabulary has."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[s] for s in END_OF_TURN if s in vocab)
    return sorted(set(ids))


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


MIN_SHARED_PREFIX = 4
# Ends an answer whose generation stopped once its score was settled (what follows was never generated).
CUT = " …"


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: Sequence[Messages], max_new_tokens: int,
                     batch_size: int = 64, on_batch: Callable[[int], None] | None = None,
                     share_prefix: bool = True,
                     settled: Sequence[Callable[[str], bool]] | None = None) -> list[str]:
    """Greedy answers to chat ``prompts`` (lists of messages), in the order given.

    Each prompt is rendered with the tokenizer's chat template plus the generation prompt and tokenised
    without extra special tokens (the template places BOS itself, as ``apply_chat_template`` does).
    Prompts are batched by length with **left** padding and an attention mask, so a batch decodes the same
    tokens as one prompt at a time. Only new tokens are decoded, special tokens skipped, and the text
    stripped. The model is put in eval mode for the call and restored after. ``on_batch(n)`` is called after
    each batch of ``n`` prompts (progress).

    ``share_prefix``: the tokens every prompt of a batch starts with (the chat template's system turn, a task's
    instruction: half of a short prompt) are run once and their key/value cache repeated for the batch; the
    padding goes between that prefix and the rest, masked, with each token at its unpadded position. On a CPU
    the prompts' forward pass costs more than decoding a short answer, so this is most of the time saved.

    ``settled``: one check per prompt, given the answer decoded so far; once it returns True the row stops
    (its score can no longer change: :func:`can_still_match`, :func:`answer_found`) and its answer is the text
    so far followed by :data:`CUT`, so a shortened answer is never mistaken for the model's whole output.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if settled is not None and len(settled) != len(prompts):
        raise ValueError(f"{len(settled)} settled checks for {len(prompts)} prompts")
    if not prompts:
        return []
    texts = [_render_prompt(tokenizer, list(p)) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise LorafitError("the tokenizer has neither a pad nor an EOS token; "
                           "generation needs one to pad batches")
    stop_ids = _stop_token_ids(model, tokenizer)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    device = _model_device(model)
    answers: list[str] = [""] * len(encoded)

    def row_settled(idx: list[int]):
        def check(row: int, tokens: list[int]) -> bool:
            return settled[idx[row]](tokenizer.decode(tokens, skip_special_tokens=True))
        return check if settled is not None else None

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [encoded[i] for i in idx]
            shared = _shared_prefix(rows) if share_prefix else 0
            width = shared + max(len(r) - shared for r in rows)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, ids in enumerate(rows):  # [shared prefix][padding][the rest]: the padding is masked
                input_ids[row, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
                input_ids[row, width - len(ids) + shared:] = torch.tensor(ids[shared:], dtype=torch.long)
                attention[row, :shared] = 1
                attention[row, width - len(ids) + shared:] = 1
            cache = _prefix_cache(model, input_ids[:1, :shared].to(device), len(idx)) if shared else None
            new_tokens = _greedy(model, input_ids.to(device), attention.to(device), cache, max_new_tokens, stop_ids,
                                 row_settled(idx))
            for row, i in enumerate(idx):
                answers[i] = _answer_text(tokenizer, new_tokens[row], stop_ids, max_new_tokens)
            if on_batch:
                on_batch(len(idx))
    finally:
        model.train(was_training)
    return answers


def _greedy(model, input_ids: torch.Tensor, attention: torch.Tensor, cache, max_new_tokens: int,
            stop_ids: Sequence[int], settled: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy decoding of a batch, each row's new tokens up to and including its stop token.

    ``generate`` keeps a finished row in the batch, padding it, until the last row ends: with answers of 7 to
    53 tokens (the retention set) most of its work is padding. Here a finished row leaves the batch, and its
    key/value cache with it, so the work follows the tokens actually generated. ``cache``: the cache of the
    first columns (the shared prefix) or None. Positions are ``generate``'s (the attention mask's running
    count), so each row decodes what it decodes alone. ``settled(row, tokens)``: True ends that row as its stop
    token would (its score is known).
    """
    from transformers import DynamicCache

    key, rows = cache_kwarg(model), input_ids.shape[0]
    cache = cache if cache is not None else DynamicCache(config=model.config)
    ids, mask = input_ids[:, cache.get_seq_length():], attention
    live = torch.arange(rows)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=input_ids.device)
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{key: cache}).logits[:, -1]
        nxt = logits.argmax(-1)
        for row, token in zip(live.tolist(), nxt.tolist(), strict=True):
            out[row].append(token)
        open_rows = ~torch.isin(nxt, stop)
        if settled is not None:
            open_rows &= torch.tensor([not settled(r, out[r]) for r in live.tolist()], device=nxt.device)
        going = open_rows.nonzero().squeeze(1)
        if step == max_new_tokens - 1 or going.numel() == 0:
            break
        if going.numel() < live.numel():  # finished rows leave the batch
            cache.batch_select_indices(going)
            live, mask, nxt = live[going.cpu()], mask[going], nxt[going]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        ids = nxt[:, None]
    return out


def _was_cut(tokens: list[int], stop_ids: Sequence[int], max_new_tokens: int) -> bool:
    """A row that ended neither on a stop token nor at the token limit was stopped once settled."""
    return len(tokens) < max_new_tokens and (not tokens or tokens[-1] not in stop_ids)


def _answer_text(tokenizer, tokens: list[int], stop_ids: Sequence[int], max_new_tokens: int) -> str:
    """A row's answer from its new tokens: decoded without special tokens, stripped, :data:`CUT` if it was cut."""
    text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return text + CUT if _was_cut(tokens, stop_ids, max_new_tokens) else text


def _settled_answer(tokenizer, tokens: Sequence[int], settled: Callable[[str], bool], stop_ids: Sequence[int],
                    max_new_tokens: int) -> str | None:
    """The answer :func:`generate_answers` gives a row whose greedy tokens start with ``tokens``, when they end it
    (a stop token, the token limit, or ``settled``, checked after each token as :func:`_greedy` does); else None."""
    for k in range(1, min(len(tokens), max_new_tokens) + 1):
        head = list(tokens[:k])
        if head[-1] in stop_ids or k == max_new_tokens or settled(tokenizer.decode(head, skip_special_tokens=True)):
            return _answer_text(tokenizer, head, stop_ids, max_new_tokens)
    return None


def _shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving each at least one token of its own (0 when fewer
    than :data:`MIN_SHARED_PREFIX`: not worth a separate forward pass)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        n = next((k for k in range(n) if r[k] != first[k]), n)
    return n if n >= MIN_SHARED_PREFIX else 0


def _prefix_cache(model, prefix_ids: torch.Tensor, batch: int):
    """The key/value cache of ``prefix_ids`` (1 × P), repeated for ``batch`` rows."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # logits of the last position only: the head over every prefix position (49k-word vocabulary) cost 0.4 s a call
    model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    cache.batch_repeat_interleave(batch)
    return cache


# --------------------------------------------------------------------------------------------- retention

def _answer_span(tokenizer, messages: Messages, reference: str) -> tuple[str, int, int]:
    """Render prompt + reference: (text up to the end-of-turn marker, answer start, answer end), in chars.

    The scored span is the reference as the template rendered it, plus the end-of-turn marker that closes
    it (``<|im_end|>`` ...); text after the marker (ChatML's newline) is not scored. If the template has no
    recognisable marker, the tokenizer's EOS token is appended as the end of turn.
    """
    prompt = _render_prompt(tokenizer, messages)
    answered = messages + [{"role": "assistant", "content": reference}]
    full = tokenizer.apply_chat_template(answered, tokenize=False)
    if not full.startswith(prompt):
        raise LorafitError("the chat template renders the prompt differently once an answer follows; "
                           "retention perplexity needs the generation prompt to be a prefix of the full chat")
    rest = full[len(prompt):]
    pos = rest.find(reference.strip()) if reference.strip() else 0
    if pos < 0:
        raise LorafitError("the chat template changed the reference answer's text; "
                           "cannot locate it to score it")
    body_end = pos + len(reference.strip())
    tail = rest[body_end:]
    stripped = tail.lstrip()
    for marker in END_OF_TURN:
        if stripped.startswith(marker):
            end = body_end + (len(tail) - len(stripped)) + len(marker)
            return prompt + rest[:end], len(prompt), len(prompt) + end
    eos = tokenizer.eos_token or ""
    return prompt + rest[:body_end] + eos, len(prompt), len(prompt) + body_end + len(eos)


def _answer_tokens(tokenizer, messages: Messages, reference: str) -> tuple[list[int], list[bool]]:
    """Token ids of prompt + answer + end of turn, and which of them are scored (answer and end of turn)."""
    text, start, _ = _answer_span(tokenizer, messages, reference)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        scored = [e > start for _, e in enc["offset_mapping"]]  # a token ending inside the answer is scored
        # a token spanning the prompt/answer boundary is scored too; it is rare with ChatML's trailing newline
        return ids, scored
    prompt_ids = tokenizer(text[:start], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(text[start:], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)


# A greedy token read off :func:`reference_scores`' pass must beat the runner-up by this much (in logits): a
# closer call could go the other way in generate_answers' differently batched pass (float rounding). The demo
# model's logits there differ by up to 1e-4 between batchings (16 rows, 64, one unshared), so 10× room on a margin.
GREEDY_MARGIN = 2e-3


@torch.inference_mode()
def reference_scores(model, tokenizer, items: Sequence[tuple[Messages, str]], batch_size: int = 16,
                     on_batch: Callable[[int], None] | None = None) -> tuple[float, int, list[list[int]]]:
    """Summed negative log-likelihood (nats) of each reference answer + end of turn given its prompt, the number of
    tokens summed, and per item the model's greedy tokens that this pass shows.

    ``items`` are ``(prompt messages, reference answer)`` pairs. Batches are right-padded; padding and prompt
    tokens are excluded from the sum. The greedy tokens are the argmax after the prompt and after each reference
    token, for as long as it is the reference's next token, up to and including the first that is not: the start
    of what :func:`generate_answers` decodes (for the model that wrote the references, all of it). They stop
    before a call closer than :data:`GREEDY_MARGIN`, and are empty when the prompt alone tokenises differently
    (generation starts from that).
    """
    from lorafit.train.loss import _softcap, hidden_states, options_of

    encoded = [_answer_tokens(tokenizer, list(m), r) for m, r in items]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # by length: less padding
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = _model_device(model)
    share = options_of(model).shared_prefix
    total, count = 0.0, 0
    greedy: list[list[int]] = [[] for _ in items]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i][0]
                input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, :len(ids)] = 1
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            # the stack once (a batch's shared prefix once), the head only where a scored token is predicted
            hidden = hidden_states(model, model.base_model, inputs, share)
            at = [[t for t in range(len(encoded[i][0]) - 1) if encoded[i][1][t + 1]] for i in idx]
            targets = [encoded[i][0][t + 1] for i, ts in zip(idx, at, strict=True) for t in ts]
            if targets:
                h = torch.cat([hidden[row, ts] for row, ts in enumerate(at)])
                nll, top, margin = _head_scores(model, h, torch.tensor(targets, device=device), _softcap(model))
                total, count = total + nll, count + len(targets)
                for i, ts, top_i, margin_i in zip(idx, at, top.split([len(ts) for ts in at]),
                                                  margin.split([len(ts) for ts in at]), strict=True):
                    greedy[i] = _greedy_prefix(tokenizer, items[i][0], encoded[i][0], ts, top_i.tolist(),
                                               margin_i.tolist())
            if on_batch:
                on_batch(len(idx))
    finally:
        model.train(was_training)
    return total, count, greedy


def _head_scores(model, h: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """Summed cross-entropy of ``targets`` under the head's logits at hidden states ``h`` (n × d), with the argmax
    and its lead over the runner-up per row. In the chunks and arithmetic of the training loss's kernel
    (:class:`lorafit.kernels.loss.LinearCrossEntropy`), so the sum is the one it gives."""
    from lorafit.options import loss_chunk_tokens

    head = model.get_output_embeddings()
    chunk = loss_chunk_tokens(getattr(head, "base_layer", head).weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    tops, margins = [], []
    for hc, yc in zip(h.split(chunk), targets.split(chunk), strict=True):
        z = head(hc).float()
        if softcap:
            z = torch.tanh(z.div_(softcap)).mul_(softcap)
        best = z.topk(2, dim=-1)
        tops.append(best.indices[:, 0])
        margins.append(best.values[:, 0] - best.values[:, 1])
        zmax = z.amax(1, keepdim=True)
        target_logit = z.gather(1, yc[:, None])
        total += (z.sub_(zmax).exp_().sum(1, keepdim=True).log() + zmax - target_logit).sum()
    return float(total), torch.cat(tops), torch.cat(margins)


def _greedy_prefix(tokenizer, messages: Messages, ids: list[int], at: list[int], greedy_ids: list[int],
                   margins: list[float]) -> list[int]:
    """The greedy tokens :func:`reference_scores` shows for one item (see there)."""
    prompt_ids = tokenizer(_render_prompt(tokenizer, list(messages)), add_special_tokens=False)["input_ids"]
    if not at or at[0] != len(prompt_ids) - 1 or ids[:len(prompt_ids)] != prompt_ids:
        return []  # the answer starts mid-token, or the prompt alone tokenises differently
    tokens = []
    for t, token, margin in zip(at, greedy_ids, margins, strict=True):
        if margin < GREEDY_MARGIN:
            break
        tokens.append(token)
        if token != ids[t + 1]:
            break  # the model leaves the reference here: what it says next is unknown
    return tokens


def answer_nll(model, tokenizer, items: Sequence[tuple[Messages, str]], batch_size: int = 16,
               on_batch: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of each reference answer + end of turn given its prompt,
    and the number of tokens summed (:func:`reference_scores` without the greedy tokens)."""
    total, count, _ = reference_scores(model, tokenizer, items, batch_size, on_batch)
    return total, count


def retention_score(model, tokenizer, path: str | Path, *, max_new_tokens: int = 64,
                    batch_size: int = 64, phase=None) -> dict:
    """How much of what the base model did well the model being scored still does.

    Reads a retention file (see :func:`load_retention`) and returns
    ``{"accuracy", "perplexity", "nll", "tokens", "n"}``: ``accuracy`` is the fraction of greedy answers
    (``max_new_tokens`` new tokens at most) that contain the known ``answer`` (:func:`contains_answer`);
    ``perplexity`` is ``exp(nll)`` where ``nll`` is the mean per-token negative log-likelihood of the base
    model's own answers (``reference``) and their end-of-turn token, prompts masked, over ``tokens`` tokens.
    For the base model itself accuracy is 1.0 by construction and perplexity is low; fine-tuning that
    forgets lowers the first and raises the second. ``phase(label, total)``, if given, is a context manager
    yielding a progress callback (:class:`lorafit.train.progress.Phases`).
    """
    phase = phase or no_phase
    rows = load_retention(path)
    with phase("retention: perplexity of base answers", len(rows)) as advance:
        # reference_scores' own, smaller batches: rows sorted by length pad less (64 → 16: 2× faster on the demo)
        total, count, greedy = reference_scores(model, tokenizer, [(r["messages"], r["reference"]) for r in rows],
                                                on_batch=advance)
    # a row stops once its known answer is said and settled: "still correct" cannot change after that
    found = [lambda text, answer=r["answer"]: answer_found(text, answer) for r in rows]
    # The pass above showed each row's greedy answer as far as it follows the reference (for the model that wrote
    # the references, all of it): a row settled there needs no generating (the base column: none does).
    stop_ids = _stop_token_ids(model, tokenizer)
    predictions = [_settled_answer(tokenizer, tokens, check, stop_ids, max_new_tokens)
                   for tokens, check in zip(greedy, found, strict=True)]
    todo = [i for i, p in enumerate(predictions) if p is None]
    with phase("retention: answers", len(rows)) as advance:
        advance(len(rows) - len(todo))
        generated = generate_answers(model, tokenizer, [rows[i]["messages"] for i in todo], max_new_tokens,
                                     batch_size, on_batch=advance, settled=[found[i] for i in todo])
    for i, answer in zip(todo, generated, strict=True):
        predictions[i] = answer
    correct = sum(contains_answer(p, r["answer"]) for p, r in zip(predictions, rows, strict=True))
    mean_nll = total / count if count else float("nan")
    return {"accuracy": correct / len(rows), "perplexity": math.exp(mean_nll) if count else float("nan"),
            "nll": mean_nll, "tokens": count, "n": len(rows)}


@contextlib.contextmanager
def no_phase(label: str, total: int):
    """A progress phase that shows nothing."""
    yield lambda n=1: None
