"""``type: chat_template`` rows: OpenAI-style messages rendered with a chat template, assistant turns trained.

How trained spans are found, for any template:

1. render the whole conversation once and tokenize it once (with character offsets), exactly as
   ``apply_chat_template(tokenize=True)`` would (no added special tokens: the template places BOS itself);
2. for message *i*, its rendered text lies between ``len(render(messages[:i]))`` and
   ``len(render(messages[:i+1]))`` (checked: each shorter render must be a prefix of the full one);
   inside that span the message's content is located, so the role header stays masked;
3. tokens from the one holding the content's first character are trained, up to and including the first
   end-of-turn token after the content (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, EOS ...); text
   after it (the newline ChatML puts after ``<|im_end|>``) is not. A template without such a token trains
   to the end of the message's rendered text. An empty message trains just its end of turn.

A message's reasoning field (``field_thinking``, default ``template_thinking_key``: ``reasoning_content``) is
passed to the template under ``template_thinking_key``, as axolotl passes it, and trained with the message.
A message is trained when its role is in ``roles_to_train``; a per-message ``"train": true/false`` (or the
field ``message_field_training`` names) overrides that. With ``split_thinking``, an assistant message's
``<think>…</think>`` is passed to the template as ``reasoning_content`` (axolotl's rule) and the trained span
starts where the rendered message first differs from one with placeholder content (axolotl's ``find_turn``), so
the template's reasoning block is trained too. End-of-turn tokens that are EOS follow ``train_on_eos``, the
others ``train_on_eot`` (default: ``train_on_eos``), as in axolotl. Roles are system, user, assistant, tool, ShareGPT's human/gpt and the names of the dataset's
``roles:`` mapping; any other (a typo such as ``asistant``) makes the row a bad row, never an untrained turn. Templates that render a message differently depending on what follows (so that a shorter
render is not a prefix of the full one) fall back to finding each content in order in the full text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.config.keys import CHAT_TEMPLATE_NAMES, FALLBACK_PREFIX
from lorafit.data.formats import IGNORE, TokenizerInfo
from lorafit.data.loading import RowError
from lorafit.data.text import NotText, read_text
from lorafit.errors import LorafitError

# The two named templates lorafit writes itself; axolotl's other names mean the model's own (the tokenizer's).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
END_OF_TURN_STRINGS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>",
                       "<|end_of_text|>", "<|eom_id|>")
CANONICAL_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", **{r: r for r in CANONICAL_ROLES}}
# split_thinking: axolotl's reasoning delimiters, and the answer delimiters looked for after them
THINKING_PAIRS = (("<think>", "</think>"), ("<reasoning>", "</reasoning>"),
                  ("<|begin_of_thought|>", "<|end_of_thought|>"))
SOLUTION_PAIRS = (("<|begin_of_solution|>", "<|end_of_solution|>"),)
DUMMY = "[[dummy_message]]"  # axolotl's placeholder content for finding where a message's own text starts


def resolve_chat_template(cfg, tokenizer) -> str:
    """The jinja template to use: the config's (a name, a file, or jinja text) or the tokenizer's own
    (``tokenizer_default``; ``tokenizer_default_fallback_NAME``: the tokenizer's, else NAME). Of axolotl's template
    names lorafit writes chatml and llama3 itself; the others name a model family's own template, which is the
    tokenizer's (the config's notice says so) or, when the tokenizer has none, an error."""
    name = cfg.chat_template
    own = getattr(tokenizer, "chat_template", None)
    if own and not isinstance(own, str):
        own = own.get("default", next(iter(own.values())))
    if name in (None, "", "tokenizer_default"):
        if not own:
            raise LorafitError(
                f"{cfg.source}: datasets of type chat_template need a chat template, and the tokenizer has "
                f"none; set chat_template: to {' or '.join(NAMED_TEMPLATES)}, a .jinja file, or jinja text"
            )
        return own
    if name.startswith(FALLBACK_PREFIX) and name.removeprefix(FALLBACK_PREFIX) in CHAT_TEMPLATE_NAMES:
        if own:
            return own
        name = name.removeprefix(FALLBACK_PREFIX)
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    if name in CHAT_TEMPLATE_NAMES:
        if own:
            return own
        raise LorafitError(
            f"{cfg.source}: key 'chat_template': {name} names the chat template of a model family, which lorafit "
            f"takes from the tokenizer, and this tokenizer has none; give the template as a .jinja file or jinja "
            f"text, or use {' or '.join(NAMED_TEMPLATES)}"
        )
    if "{{" in name or "{%" in name:
        return name
    path = cfg.resolve_path(name)
    if path.is_file():
        return _read_template(Path(path), name)
    raise LorafitError(
        f"{cfg.source}: key 'chat_template': got {name!r}, must be tokenizer_default, a template name (chatml, "
        "llama3, qwen3 ...), a path to a jinja file, or jinja text"
    )


def _read_template(path: Path, name: str) -> str:
    try:
        return read_text(path)
    except NotText as e:
        fix = f"convert it to UTF-8 (iconv -f {e.iconv_name} -t utf-8)" if e.suggest else "name a jinja text file"
        raise LorafitError(f"{name} {e}; chat_template must be UTF-8 text: {fix}") from None
    except OSError as e:
        raise LorafitError(f"{name}: cannot read the chat template ({e.strerror or e})") from None


class ChatTokenizer:
    """Turns one messages row into (input_ids, labels) for a fixed template and dataset spec."""

    def __init__(self, info: TokenizerInfo, template: str, spec, train_on_inputs: bool, *,
                 eot_tokens: list[str] | None = None, train_on_eos: str | None = None,
                 system_message: str | None = None, source: str = "<config>",
                 template_kwargs: dict | None = None):
        self.info = info
        self.tok = info.tok
        self.template = template
        self.spec = spec
        self.train_on_inputs = train_on_inputs
        self.train_on_eos = spec.train_on_eos or train_on_eos or "turn"  # the entry's, else the config's
        self.train_on_eot = spec.train_on_eot or self.train_on_eos
        self.template_kwargs = dict(template_kwargs or {})
        self.train_field = spec.message_field_training or "train"
        self.system_message = system_message
        self.role_map = dict(SHAREGPT_ROLES)
        for canonical, names in (spec.roles or {}).items():
            self.role_map.setdefault(canonical, canonical)
            for n in names:
                self.role_map[n] = canonical
        # what an unknown-role error lists: the canonical names, then the dataset's own (ShareGPT's go unsaid)
        mapped = [r for canonical, names in (spec.roles or {}).items() for r in (canonical, *names)]
        self.allowed_roles = ", ".join(dict.fromkeys([*CANONICAL_ROLES, *mapped]))
        eot = {info.eos_id}
        vocab = self.tok.get_vocab()
        for s in END_OF_TURN_STRINGS:
            if s in vocab and s in set(getattr(self.tok, "all_special_tokens", [])) | set(
                getattr(self.tok, "added_tokens_encoder", {})
            ):
                eot.add(vocab[s])
        for s in eot_tokens or []:  # the config's eot_tokens: must be single tokens of this vocabulary
            if s not in vocab:
                raise LorafitError(f"{source}: eot_tokens: {s!r} is not a token of the tokenizer's vocabulary; "
                                   "give tokens as the tokenizer writes them (e.g. <|im_end|>)")
            eot.add(vocab[s])
        self.eot_ids = eot
        # axolotl: EOS is an end of turn (train_on_eot applies to it too) unless eot_tokens lists others only
        self.eos_is_eot = not eot_tokens or self.tok.eos_token in eot_tokens
        if eot_tokens and self.tok.eos_token in eot_tokens and self.train_on_eot != self.train_on_eos:
            raise LorafitError(f"{source}: eot_tokens lists the EOS token {self.tok.eos_token!r}, so train_on_eos "
                               f"({self.train_on_eos}) and train_on_eot ({self.train_on_eot}) must agree; set one")

    # -- rendering -----------------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )

    def _messages(self, row: Any) -> tuple[list[dict], list[bool]]:
        if not isinstance(row, dict):
            raise RowError(f"chat_template row must be a JSON object, got {type(row).__name__}")
        key = self.spec.field_messages
        msgs = row.get(key)
        if not isinstance(msgs, list) or not msgs:
            has = ", ".join(str(k) for k in row) or "no fields"
            raise RowError(f"chat_template row needs a non-empty list '{key}' (has: {has})")
        rkey, ckey = self.spec.message_field_role, self.spec.message_field_content
        out, train = [], []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or rkey not in m or ckey not in m:
                has = ", ".join(m) if isinstance(m, dict) else type(m).__name__
                raise RowError(f"{key}[{j}] needs '{rkey}' and '{ckey}' (has: {has})")
            content = m[ckey]
            if not isinstance(content, str):
                raise RowError(f"{key}[{j}].{ckey} must be a string, got {type(content).__name__}")
            role = self._role(m[rkey], f"{key}[{j}]")
            if role == "system" and self.spec.drop_system_message:
                continue
            msg = self._split_thinking(role, content)
            thinking = self.spec.field_thinking or self.spec.template_thinking_key
            if m.get(thinking) is not None and self.spec.template_thinking_key not in msg:
                if not isinstance(m[thinking], str):
                    raise RowError(f"{key}[{j}].{thinking} must be a string, got {type(m[thinking]).__name__}")
                msg[self.spec.template_thinking_key] = m[thinking]  # a template that renders reasoning shows it
            out.append(msg)
            flag = m.get(self.train_field)
            if flag is not None and not isinstance(flag, bool):
                raise RowError(f"{key}[{j}].{self.train_field} must be true or false, got {flag!r}")
            train.append(flag if flag is not None else (role in self.spec.roles_to_train or self.train_on_inputs))
        if self.system_message and not self.spec.drop_system_message and not any(m["role"] == "system" for m in out):
            out.insert(0, {"role": "system", "content": self.system_message})  # default_system_message
            train.insert(0, "system" in self.spec.roles_to_train or self.train_on_inputs)
        return out, train

    def _split_thinking(self, role: str, content: str) -> dict:
        """The message to render; with ``split_thinking``, an assistant's reasoning moved out of its content
        (axolotl's ``transform_message``: the first delimiter pair found; the answer is what follows, or what
        the solution delimiters enclose)."""
        msg = {"role": role, "content": content}
        if not (self.spec.split_thinking and role == "assistant"):
            return msg
        for begin, end in THINKING_PAIRS:
            if begin in content and end in content:
                a, b = content.find(begin), content.find(end)
                msg[self.spec.template_thinking_key] = content[a + len(begin):b].strip()
                rest = content[b + len(end):].lstrip()
                msg["content"] = rest
                for sb, se in SOLUTION_PAIRS:
                    if sb in rest and se in rest:
                        msg["content"] = rest[rest.find(sb) + len(sb):rest.find(se)].strip()
                        break
                break
        return msg

    def _role(self, name: Any, where: str) -> str:
        """The canonical role; an unknown one (a typo such as 'asistant') would render untrained: a bad row."""
        role = self.role_map.get(name) if isinstance(name, str) else None
        if role is None:
            raise RowError(f"{where} has role {name!r}; allowed roles: {self.allowed_roles}; "
                           f"map other names to these with roles: on the dataset entry")
        return role

    # -- spans ---------------------------------------------------------------------------------------
    def _char_spans(self, msgs: list[dict], full: str, train: list[bool]) -> list[tuple[int, int, int]]:
        """``(content start, content end, message end)`` in ``full`` for each trained message."""
        ends = []
        for i in range(len(msgs)):
            try:
                r = self._render(msgs[: i + 1])
            except Exception:  # templates that reject partial conversations (e.g. must end with user)
                break
            if not full.startswith(r):
                break
            ends.append(len(r))
        spans = []
        if len(ends) == len(msgs):
            prev_end = 0
            for i, m in enumerate(msgs):
                lo, hi = prev_end, ends[i]
                prev_end = hi
                if not train[i]:
                    continue
                start = self._own_text_start(msgs[:i], m, full, lo, hi)
                pos = _find_content(full, m["content"], start, hi)
                if start is not None and pos is not None:  # the template's reasoning block, then the content
                    spans.append((start, pos + len(_stripped_match(full, m["content"], pos)), hi))
                    continue
                pos = _find_content(full, m["content"], lo, hi)
                if pos is None:  # empty content: start after the generation prompt, train the end of turn
                    pos = self._generation_prompt_end(msgs[:i], full, lo, hi)
                    spans.append((pos, pos, hi))
                else:
                    spans.append((pos, pos + len(_stripped_match(full, m["content"], pos)), hi))
            return spans
        # fallback: find the contents in order; each span ends where the next message's content starts.
        # (An empty message cannot be located this way; it is left untrained.)
        cursor = 0
        found: list[tuple[int, int] | None] = []
        for i, m in enumerate(msgs):
            if not m["content"].strip():
                found.append(None)
                continue
            pos = _find_content(full, m["content"], cursor, len(full))
            if pos is None:
                raise RowError(f"message {i} ({m['role']}) does not appear in the rendered chat template")
            cursor = pos + len(_stripped_match(full, m["content"], pos))
            found.append((pos, cursor))
        for i, where in enumerate(found):
            if train[i] and where is not None:
                nxt = next((f[0] for f in found[i + 1 :] if f is not None), len(full))
                spans.append((where[0], where[1], nxt))
        return spans

    def _own_text_start(self, prefix: list[dict], msg: dict, full: str, lo: int, hi: int) -> int | None:
        """Where a message with reasoning starts to differ from the same message with placeholder content
        (axolotl's ``find_turn``); None for messages without reasoning (their content is found as is)."""
        if self.spec.template_thinking_key not in msg:
            return None
        try:
            dummy = self._render([*prefix, {"role": msg["role"], "content": DUMMY}])
        except Exception:
            return None
        i = lo
        while i < min(hi, len(dummy)) and dummy[i] == full[i]:
            i += 1
        return i

    def _generation_prompt_end(self, prefix: list[dict], full: str, lo: int, hi: int) -> int:
        try:
            g = self._render(prefix, add_generation_prompt=True) if prefix else ""
        except Exception:
            return lo
        return len(g) if full.startswith(g) and lo <= len(g) <= hi else lo

    def __call__(self, row: Any) -> tuple[list[int], list[int]]:
        msgs, train = self._messages(row)
        try:
            full = self._render(msgs)
        except Exception as e:
            raise RowError(f"chat template failed on this row: {str(e).splitlines()[0]}") from None
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        labels = [IGNORE] * len(ids)
        turn_ends = []  # the end-of-turn token closing each trained message, where it has one
        for start, content_end, end in self._char_spans(msgs, full, train):
            # first token overlapping the content (a token may straddle the header/content boundary)
            first = next((t for t, (a, b) in enumerate(offsets) if b > start and b > a), None)
            if first is None:
                continue
            # through the first end-of-turn token after the content; without one, to the message end
            last = None
            for t in range(first, len(ids)):
                a, b = offsets[t]
                if a >= end:
                    break
                if ids[t] in self.eot_ids and a >= content_end:
                    last = t
                    break
                last = t
            for t in range(first, (last if last is not None else first - 1) + 1):
                labels[t] = ids[t]
            eot = last if last is not None and ids[last] in self.eot_ids else None
            # the EOS closing the turn: the end of turn itself, or one after it within the message (axolotl
            # looks for both after each trained turn)
            eos = next((t for t in range(eot if eot is not None else first, len(ids))
                        if offsets[t][0] < end and ids[t] == self.info.eos_id and offsets[t][0] >= content_end),
                       None)
            turn_ends.append((eot, eos))
        return ids, self._end_of_turn_labels(ids, labels, turn_ends)

    def _end_of_turn_labels(self, ids: list[int], labels: list[int],
                            turn_ends: list[tuple[int | None, int | None]]) -> list[int]:
        """``train_on_eos`` for EOS tokens and ``train_on_eot`` for the other end-of-turn tokens (axolotl's):
        ``turn`` (default) trains the one closing each trained turn, ``last`` only the final one, ``all`` every
        one in the row, ``none`` none of them. A token that is both (EOS as an end of turn) is trained when
        either says so, as axolotl's two passes do."""
        eos_id = self.info.eos_id
        eot_kind = {i for i in self.eot_ids if i != eos_id or self.eos_is_eot}
        eots = [t for t, _ in turn_ends if t is not None and ids[t] in eot_kind]
        eoss = [t for _, t in turn_ends if t is not None]
        for t in eots + eoss:
            labels[t] = IGNORE
        for found, mode, kind in ((eots, self.train_on_eot, eot_kind), (eoss, self.train_on_eos, {eos_id})):
            keep = {"turn": found, "last": found[-1:], "none": [],
                    "all": [t for t, i in enumerate(ids) if i in kind]}[mode]
            for t in keep:
                labels[t] = ids[t]
        return labels


def _find_content(full: str, content: str, lo: int, hi: int) -> int | None:
    """Where ``content`` (or its stripped form, for templates that trim) starts in ``full[lo:hi]``."""
    for c in (content, content.strip()):
        if not c:
            return None
        pos = full.find(c, lo, hi)
        if pos >= 0:
            return pos
    return None


def _stripped_match(full: str, content: str, pos: int) -> str:
    """The form of ``content`` found at ``pos`` (as given, or stripped by the template)."""
    return content if full.startswith(content, pos) else content.strip()
