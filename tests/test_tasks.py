"""Task scoring: answer normalisation, exact match, held-out files, batched generation, retention."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lorafit.errors import LorafitError
from lorafit.eval.tasks import (
    answer_nll,
    contains_answer,
    exact_match,
    generate_answers,
    load_heldout,
    load_retention,
    normalize,
    reference_scores,
    retention_score,
    score,
)

# ------------------------------------------------------------------------------------ normalise / match

@pytest.mark.parametrize("raw, expected", [
    ("  2021-03-05  ", "2021-03-05"),
    ("2021-03-05<|im_end|>", "2021-03-05"),
    ("2021-03-05 <|im_end|>\n</s>", "2021-03-05"),
    ("2021-03-05.", "2021-03-05"),
    ("Paris!", "Paris"),
    ("a\n\t b   c", "a b c"),
    ('"positive"', "positive"),
    ("`x = 1`", "x = 1"),
    ("U.S.", "U.S"),
    ("", ""),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_exact_match_rules():
    assert exact_match("2021-03-05", "2021-03-05")
    assert exact_match(" 2021-03-05.<|im_end|>", "2021-03-05")
    assert not exact_match("2021-03-05 is the date", "2021-03-05")
    assert not exact_match("2021-3-5", "2021-03-05")
    assert not exact_match("Positive", "positive")
    assert exact_match("Positive", "positive", ignore_case=True)


def test_contains_answer_whole_words():
    assert contains_answer("The capital of France is Paris.", "Paris")
    assert contains_answer("2 + 2 = 4", "4")
    assert not contains_answer("14", "4")
    assert not contains_answer("The freezing point is -18.0 degrees.", "0")
    assert not contains_answer("about 4.22 light-years", "4")
    assert not contains_answer("it is -4", "4")
    assert contains_answer("It is 4.", "4") and contains_answer("4, then 5", "4")
    assert not contains_answer("Parisian food", "Paris")
    assert contains_answer("It is WASHINGTON, D.C.", ["Washington D.C.", "washington"])
    assert contains_answer("New   York City", "new york")


def test_score():
    assert score(["a", "b.", "c"], ["a", "b", "x"]) == {"exact_match": 2 / 3, "correct": 2, "count": 3}
    assert score([], []) == {"exact_match": 0.0, "correct": 0, "count": 0}
    with pytest.raises(ValueError):
        score(["a"], [])


# ------------------------------------------------------------------------------------------------ files

def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_heldout_splits_prompt_and_answer(tmp_path):
    f = _write(tmp_path / "h.jsonl", [
        {"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]},
        "",
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2"}]},
    ])
    items = load_heldout(f)
    assert items == [([{"role": "user", "content": "Q1"}], "A1"),
                     ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}], "A2")]


@pytest.mark.parametrize("bad, needle", [
    ("{not json", ":1: not valid JSON"),
    ({"text": "x"}, ":1: missing key 'messages'"),
    ({"messages": [{"role": "user", "content": "Q"}]}, ":1: the last message must be the assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}, "messages[0]"),
])
def test_load_heldout_errors_name_the_line(tmp_path, bad, needle):
    f = _write(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(LorafitError, match=None) as e:
        load_heldout(f)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_load_heldout_missing_file(tmp_path):
    with pytest.raises(LorafitError, match="not found"):
        load_heldout(tmp_path / "nope.jsonl")


def test_load_retention(tmp_path):
    row = {"messages": [{"role": "user", "content": "Capital of France?"}], "reference": "Paris.", "answer": "Paris"}
    assert load_retention(_write(tmp_path / "r.jsonl", [row]))[0]["answer"] == "Paris"
    with pytest.raises(LorafitError, match="missing key"):
        load_retention(_write(tmp_path / "r2.jsonl", [{"messages": row["messages"]}]))


def test_shipped_demo_files_are_well_formed():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "examples"
    train, heldout = load_heldout(root / "demo" / "train.jsonl"), load_heldout(root / "demo" / "heldout.jsonl")
    assert len(train) >= 1000 and len(heldout) >= 100
    assert not {m[0]["content"] for m, _ in train} & {m[0]["content"] for m, _ in heldout}
    assert all(len(a) == 10 and a[4] == a[7] == "-" for _, a in heldout)


# ------------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def demo_tokenizer():
    from lorafit.models import load_tokenizer
    try:
        return load_tokenizer("demo")
    except LorafitError as e:  # the demo model package is not installed
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_llama(demo_tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=len(demo_tokenizer), initializer_range=0.2,
                      pad_token_id=demo_tokenizer.pad_token_id, eos_token_id=demo_tokenizer.eos_token_id)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


PROMPTS = [
    [{"role": "user", "content": "Convert to ISO date (YYYY-MM-DD): March 5, 2021"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "user", "content": "Convert to ISO date (YYYY-MM-DD): Friday, the 17th of August 1987, a long day"}],
    [{"role": "user", "content": "2+2?"}],
]


def test_batched_generation_equals_one_by_one(demo_tokenizer, tiny_llama):
    single = [generate_answers(tiny_llama, demo_tokenizer, [p], max_new_tokens=8)[0] for p in PROMPTS]
    batched = generate_answers(tiny_llama, demo_tokenizer, PROMPTS, max_new_tokens=8, batch_size=16)
    in_pairs = generate_answers(tiny_llama, demo_tokenizer, PROMPTS, max_new_tokens=8, batch_size=2)
    plain = generate_answers(tiny_llama, demo_tokenizer, PROMPTS, max_new_tokens=8, batch_size=16, share_prefix=False)
    assert batched == single == in_pairs == plain == _by_generate(tiny_llama, demo_tokenizer, PROMPTS, 8)
    assert any(single)  # the random model says something, so the comparison is not vacuous


def _by_generate(model, tok, prompts, n: int) -> list[str]:
    """transformers' own batched greedy ``generate`` (left padding): the reference for the loop that drops
    finished rows."""
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop)
    return [tok.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def test_a_finished_row_leaves_the_batch(demo_tokenizer, tiny_llama, monkeypatch):
    """A row that ends stops costing work: the batch shrinks as answers end, and every row's tokens are what it
    generates with no row ending at all, up to its stop token."""
    from lorafit.eval.tasks import _greedy

    texts = [demo_tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    demo_tokenizer.padding_side = "left"
    enc = demo_tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    with torch.no_grad():
        free = _greedy(tiny_llama, enc.input_ids, enc.attention_mask, None, 10, [])
        stop = free[0][1]  # the first row's second token ends it
        widths = []
        real = tiny_llama.forward
        monkeypatch.setattr(tiny_llama, "forward", lambda *a, **k: widths.append(k["input_ids"].shape[0]) or real(*a, **k))
        stopped = _greedy(tiny_llama, enc.input_ids, enc.attention_mask, None, 10, [stop])
    for row, tokens in zip(free, stopped, strict=True):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert tokens == row[:cut]
    assert len(stopped[0]) <= 2 and widths[0] == len(PROMPTS) and widths[-1] < widths[0]
    assert widths == sorted(widths, reverse=True)


def test_a_batch_runs_the_prefix_its_prompts_share_once(demo_tokenizer, tiny_llama, monkeypatch):
    from lorafit.eval import tasks

    seen = []
    real = tasks._prefix_cache
    monkeypatch.setattr(tasks, "_prefix_cache", lambda m, ids, n: seen.append((ids.shape[1], n)) or real(m, ids, n))
    generate_answers(tiny_llama, demo_tokenizer, [PROMPTS[0], PROMPTS[3]], max_new_tokens=2)
    system_and_task = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Convert to ISO date (YYYY-MM-DD):"}], tokenize=False)
    assert seen and seen[0][1] == 2 and seen[0][0] >= len(demo_tokenizer(system_and_task)["input_ids"]) - 3


def test_generation_decodes_only_new_tokens(demo_tokenizer, tiny_llama):
    out = generate_answers(tiny_llama, demo_tokenizer, PROMPTS[:1], max_new_tokens=4)[0]
    assert "Convert" not in out and "<|im_start|>" not in out
    assert len(demo_tokenizer(out, add_special_tokens=False)["input_ids"]) <= 6
    assert tiny_llama.training is False


def test_answer_nll_masks_prompt_and_padding(demo_tokenizer, tiny_llama):
    items = [(PROMPTS[0], "2021-03-05"), (PROMPTS[1], "Hello there, how can I help?")]
    total, n = answer_nll(tiny_llama, demo_tokenizer, items, batch_size=2)
    parts = [answer_nll(tiny_llama, demo_tokenizer, [it], batch_size=1) for it in items]
    assert n == sum(c for _, c in parts)
    assert total == pytest.approx(sum(t for t, _ in parts), rel=1e-4)
    # scored tokens = the answer's tokens + <|im_end|>
    expect = len(demo_tokenizer("2021-03-05<|im_end|>", add_special_tokens=False)["input_ids"])
    assert parts[0][1] == expect


def _greedy(model, tok, messages, n: int) -> str:
    """Greedy decoding by hand, one token at a time with no cache: the oracle for generate_answers."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False, return_tensors="pt").input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            if nxt in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")):
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out)


def _answer_nll(model, tok, messages, reference: str) -> tuple[float, int]:
    """Sum of -log p over the reference's tokens and the <|im_end|> after it, by hand."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    a_ids = tok(reference + "<|im_end|>", add_special_tokens=False).input_ids
    ids = torch.tensor([p_ids + a_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    total = -sum(float(logp[len(p_ids) + i - 1, t]) for i, t in enumerate(a_ids))
    return total, len(a_ids)


def test_retention_score_equals_a_hand_computed_value(demo_tokenizer, tiny_llama, tmp_path):
    said = _greedy(tiny_llama, demo_tokenizer, PROMPTS[2], 4)
    assert said.strip()  # the tiny model says something, so "contains" is a real check
    rows = [{"messages": PROMPTS[2], "reference": "Paris.", "answer": said.strip()},  # its own answer: correct
            {"messages": PROMPTS[4], "reference": "4", "answer": "zebra-never-said"}]  # not said: wrong
    r = retention_score(tiny_llama, demo_tokenizer, _write(tmp_path / "r.jsonl", rows), max_new_tokens=4)
    parts = [_answer_nll(tiny_llama, demo_tokenizer, row["messages"], row["reference"]) for row in rows]
    nll = sum(t for t, _ in parts) / sum(c for _, c in parts)
    assert r["n"] == 2 and r["accuracy"] == 0.5
    assert r["tokens"] == sum(c for _, c in parts)
    assert r["nll"] == pytest.approx(nll, rel=1e-5) and r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)

def _greedy_ids(model, tok, messages, n: int) -> list[int]:
    """The first ``n`` greedy tokens by hand, one at a time with no cache and no stop."""
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, ids.shape[1] - n:].tolist()


def test_the_reference_pass_shows_the_greedy_tokens(demo_tokenizer, tiny_llama):
    """The greedy tokens reference_scores reads off its pass are those generation decodes: an answer the model
    gave itself is followed through its end of turn, another one up to the first token the model says otherwise."""
    own = generate_answers(tiny_llama, demo_tokenizer, PROMPTS, max_new_tokens=6)
    items = [(p, a) for p, a in zip(PROMPTS, own, strict=True)] + [(p, "zz " + a) for p, a in zip(PROMPTS, own, strict=True)]
    total, n, greedy = reference_scores(tiny_llama, demo_tokenizer, items, batch_size=3)
    assert (total, n) == answer_nll(tiny_llama, demo_tokenizer, items, batch_size=3)
    for (messages, _), tokens in zip(items, greedy, strict=True):
        assert tokens == _greedy_ids(tiny_llama, demo_tokenizer, messages, len(tokens))
    assert sum(len(t) for t in greedy[:len(PROMPTS)]) >= 3 * len(PROMPTS)  # its own answers are followed far


def test_retention_generates_only_rows_the_reference_pass_leaves_open(demo_tokenizer, tiny_llama, tmp_path,
                                                                      monkeypatch):
    """References that are the model's own answers settle in the reference pass: those rows are not generated,
    and accuracy is the one every row generated gives."""
    from lorafit.eval import tasks

    prompts = PROMPTS * 2
    full = generate_answers(tiny_llama, demo_tokenizer, prompts, max_new_tokens=16, batch_size=4)
    rows = []
    for i, (p, answer) in enumerate(zip(prompts, full, strict=True)):
        words = answer.split()
        said = words[0] if len(words) > 2 else "zebra-never-said"
        rows.append({"messages": p, "reference": answer if i % 2 else "zz " + answer, "answer": said})
    found = [lambda text, a=r["answer"]: answer_found(text, a) for r in rows]
    cut = generate_answers(tiny_llama, demo_tokenizer, prompts, max_new_tokens=16, batch_size=4, settled=found)
    expect = sum(contains_answer(c, r["answer"]) for c, r in zip(cut, rows, strict=True)) / len(rows)
    generated = []
    real = tasks.generate_answers
    monkeypatch.setattr(tasks, "generate_answers", lambda m, t, p, *a, **k: generated.append(len(p)) or real(m, t, p, *a, **k))
    r = retention_score(tiny_llama, demo_tokenizer, _write(tmp_path / "r.jsonl", rows), max_new_tokens=16)
    assert r["accuracy"] == expect and 0 < expect
    # the foreign references' rows, and own answers the random model spelled in other tokens than their text's
    assert len(rows) // 2 <= generated[0] < len(rows)


# ------------------------------------------------------------------------------------------ settling early

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lorafit.eval.tasks import CUT, answer_found, can_still_match  # noqa: E402

_TEXT = st.text(alphabet='0123456789-aPpbs .,!\'"`\n<|im_end>', max_size=24)


@settings(max_examples=300, deadline=None)
@given(prediction=_TEXT, reference=_TEXT, ignore_case=st.booleans())
def test_a_matching_answer_is_never_given_up_on(prediction, reference, ignore_case):
    """Every prefix of an answer that matches must still be allowed to match (the stop is never wrong)."""
    if exact_match(prediction, reference, ignore_case=ignore_case):
        assert all(can_still_match(prediction[:k], reference, ignore_case=ignore_case)
                   for k in range(len(prediction) + 1))


@settings(max_examples=300, deadline=None)
@given(prediction=_TEXT, rest=_TEXT, answer=st.sampled_from(["4", "Paris", "a b", "4.2", "-"]))
def test_a_found_answer_stays_found_whatever_follows(prediction, rest, answer):
    if answer_found(prediction, answer):
        assert contains_answer(prediction + rest, answer)


def test_can_still_match_cases():
    ref = "2043-10-14"
    for partial in ("", "2", " 2043-", '"2043-10', "2043-10-14", "2043-10-14.", '"2043-10-14."', "2043-10-14<|im_"):
        assert can_still_match(partial, ref), partial
    for partial in ("The", "2043-10-15", '"2043-10-14".', "2043-10-14 is", "2043-10-144", "'2043-10-14x", "2043/"):
        assert not can_still_match(partial, ref), partial
    assert can_still_match("posi", "Positive", ignore_case=True) and not can_still_match("posi", "Positive")
    assert can_still_match("2043-\ufffd", ref)  # a character cut mid-way is not held against the row


def test_answer_found_waits_for_what_follows():
    assert not answer_found("The capital is Paris", "Paris")  # "Parisian" could follow
    assert not answer_found("It is 4.", "4")  # "4.22" could follow
    assert answer_found("The capital is Paris. It is so", "Paris")
    assert not answer_found("The capital is Parisian food!", "Paris")


def test_settling_holds_on_decoded_token_prefixes(demo_tokenizer):
    """The checks see the decoded text of a token prefix, which the tokenizer's clean-up (" n't", " .") and
    characters split across tokens (é, €) can change as tokens arrive: the verdicts must not depend on that."""
    tok = demo_tokenizer
    for text, answer, reference in [("Yes, 4 n't it is 4 and so on", "4", "Yes, 4 n't"),
                                    ("Café € 2043 .5 and 2043 , then more words", "2043", "Café € 2043"),
                                    ("« 2043-10-14 » it was", "2043-10-14", "« 2043-10-14 »")]:
        ids = tok(text, add_special_tokens=False).input_ids
        whole = tok.decode(ids, skip_special_tokens=True)
        for k in range(len(ids) + 1):
            partial = tok.decode(ids[:k], skip_special_tokens=True)
            if answer_found(partial, answer):
                assert contains_answer(whole, answer), (text, k)
            for end in range(k, len(ids) + 1):  # every answer that continues this prefix
                if exact_match(tok.decode(ids[:end], skip_special_tokens=True), reference):
                    assert can_still_match(partial, reference), (text, k)


def _references_from(full: list[str], tok) -> list[str]:
    """References that make the tiny model's answers right, right-then-continuing, or wrong early or late."""
    refs = []
    for i, answer in enumerate(full):
        words = tok(answer, add_special_tokens=False).input_ids
        kind = i % 4
        if kind == 0:  # the whole answer: a match
            refs.append(answer)
        elif kind == 1:  # the answer's start: it matches, then keeps going
            refs.append(tok.decode(words[:2]).strip())
        elif kind == 2:  # wrong from the first character
            refs.append("zz" + answer)
        else:  # right until its last token
            refs.append(tok.decode(words[:-1]) + "zz")
    return refs


def test_stopping_hopeless_rows_keeps_every_score(demo_tokenizer, tiny_llama, monkeypatch):
    prompts = PROMPTS * 2
    full = generate_answers(tiny_llama, demo_tokenizer, prompts, max_new_tokens=12, batch_size=4)
    refs = _references_from(full, demo_tokenizer)
    widths = []
    real = tiny_llama.forward
    monkeypatch.setattr(tiny_llama, "forward", lambda *a, **k: widths.append(k["input_ids"].shape[0]) or real(*a, **k))
    hopeless = [lambda text, r=r: not can_still_match(text, r) for r in refs]
    cut = generate_answers(tiny_llama, demo_tokenizer, prompts, max_new_tokens=12, batch_size=4, settled=hopeless)
    monkeypatch.undo()
    rows = [(exact_match(f, r), exact_match(c, r)) for f, c, r in zip(full, cut, refs, strict=True)]
    assert [a for a, _ in rows] == [b for _, b in rows]
    assert {a for a, _ in rows} == {True, False}  # both outcomes occur
    shortened = [(f, c) for f, c in zip(full, cut, strict=True) if c.endswith(CUT)]
    assert len(shortened) >= len(prompts) // 2  # the wrong rows, early and late, and those that went on
    for f, c in shortened:  # a cut answer is the start of the full one
        assert f.startswith(c[: -len(CUT)]) and f != c[: -len(CUT)]
    for f, c, r in zip(full, cut, refs, strict=True):
        if exact_match(f, r):
            assert c == f  # a right answer is generated in full
    assert sum(widths) < len(prompts) * 12  # fewer rows decoded than with every row to the end


def test_retention_stops_a_row_once_its_answer_is_settled(demo_tokenizer, tiny_llama, tmp_path):
    prompts = PROMPTS * 2
    full = generate_answers(tiny_llama, demo_tokenizer, prompts, max_new_tokens=16, batch_size=4)
    rows = []
    for i, (p, answer) in enumerate(zip(prompts, full, strict=True)):
        words = answer.split()
        said = words[1] if i % 2 == 0 and len(words) > 3 else "zebra-never-said"  # found early, or never
        rows.append({"messages": p, "reference": answer or "x", "answer": said})
    expect = sum(contains_answer(f, r["answer"]) for f, r in zip(full, rows, strict=True)) / len(rows)
    found = [lambda text, a=r["answer"]: answer_found(text, a) for r in rows]
    cut = generate_answers(tiny_llama, demo_tokenizer, prompts, max_new_tokens=16, batch_size=4, settled=found)
    assert any(c.endswith(CUT) for c in cut) and 0 < expect < 1
    r = retention_score(tiny_llama, demo_tokenizer, _write(tmp_path / "r.jsonl", rows), max_new_tokens=16)
    assert r["accuracy"] == expect


def test_settled_checks_are_one_per_prompt(demo_tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="1 settled checks for 2 prompts"):
        generate_answers(tiny_llama, demo_tokenizer, PROMPTS[:2], max_new_tokens=2, settled=[lambda text: False])
