"""Make the demo's replay set: general prompts answered by the base SmolLM2-135M-Instruct itself.

Why: trained on date conversions alone, the model learns "answer tersely, with a date" for every prompt and
forgets how it answered everything else (retention 27% in the first demo). Mixing in the base model's own
answers to *other* prompts (self-replay) tells the adapter that only the date prompts change. The prompts
here are general instructions and questions written from templates below; none is a retention question
(``examples/retention/``, checked at run time), so retention still measures what was not trained on.

How it is made (once; the output is shipped in ``demo/replay.jsonl``):

1. ``prompts()`` builds the prompts from the templates (fixed order, no randomness).
2. The base model answers each greedily (``MAX_NEW_TOKENS`` new tokens at most).
3. An answer is kept when it ended its turn within ``KEEP_MAX_TOKENS`` tokens (so it is complete, and short
   enough to keep the demo's steps cheap). No answer is checked for correctness: the point is to keep what
   the base model does, right or wrong.

Run: ``python examples/make_replay_set.py`` (needs the demo model; a few minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorafit.eval.tasks import generate_answers, load_retention
from lorafit.models import load_model_and_tokenizer

MAX_NEW_TOKENS = 72
KEEP_MAX_TOKENS = 64

WORDS = ["happy", "fast", "cold", "bright", "quiet", "strong", "angry", "tiny", "old", "brave", "clean", "rich",
         "hard", "funny", "calm", "wet", "sharp", "heavy", "kind", "dark"]
TOPICS = ["the ocean", "a forest", "the moon", "coffee", "a library", "rain", "a mountain", "friendship", "winter",
          "a garden", "trains", "music", "the desert", "a river", "bread", "the city at night", "birds", "a bicycle",
          "autumn leaves", "the stars"]
ANIMALS = ["elephant", "giraffe", "dolphin", "owl", "kangaroo", "horse", "rabbit", "frog", "eagle", "shark",
           "camel", "zebra", "bear", "octopus", "parrot", "tiger", "wolf", "turtle", "bat", "fox"]
JOBS = ["teacher", "doctor", "farmer", "chef", "firefighter", "librarian", "mechanic", "nurse", "carpenter",
        "scientist", "baker", "dentist", "plumber", "journalist", "architect", "gardener", "police officer",
        "musician", "programmer", "veterinarian"]
CONCEPTS = ["photosynthesis", "gravity", "a noun", "a verb", "democracy", "an atom", "evaporation", "a volcano",
            "a computer", "the internet", "a rainbow", "an eclipse", "recycling", "a vaccine", "inflation",
            "a poem", "an election", "a cell", "friction", "a map"]
THINGS = ["a hammer", "a spoon", "a pencil", "a ladder", "a clock", "a key", "a pillow", "a map", "a towel",
          "a candle", "a backpack", "a thermometer", "a compass", "a broom", "scissors", "a kettle", "a stapler",
          "a telescope", "glasses", "a wallet"]

TEMPLATES = [
    ("Give one synonym for the word '{}'.", WORDS),
    ("Write one sentence about {}.", TOPICS),
    ("Tell me one interesting fact about the {}.", ANIMALS),
    ("What does a {} do?", JOBS),
    ("Explain {} in one sentence.", CONCEPTS),
    ("What is {} used for?", THINGS),
    ("Write a short title for a story about {}.", TOPICS),
    ("Where does the {} usually live?", ANIMALS),
    ("Give an antonym of '{}'.", WORDS),
    ("Describe {} in three words.", TOPICS),
]


def prompts() -> list[str]:
    return [template.format(x) for template, values in TEMPLATES for x in values]


def retention_questions() -> set[str]:
    path = Path(__file__).resolve().parent / "retention" / "retention.jsonl"
    return {row["messages"][-1]["content"] for row in load_retention(path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo" / "replay.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = prompts()
    overlap = set(questions) & retention_questions()
    if overlap:
        raise SystemExit(f"replay prompts overlap the retention set: {sorted(overlap)}")
    model, tok = load_model_and_tokenizer("demo")
    messages = [[{"role": "user", "content": q}] for q in questions]
    answers = generate_answers(model, tok, messages, max_new_tokens=MAX_NEW_TOKENS, batch_size=32)
    kept, cut = [], 0
    for prompt, reply in zip(messages, answers, strict=True):
        if len(tok(reply, add_special_tokens=False)["input_ids"]) >= KEEP_MAX_TOKENS:
            cut += 1
        else:
            kept.append({"messages": prompt + [{"role": "assistant", "content": reply}]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    print(f"{len(questions)} prompts: kept {len(kept)}, too long {cut} -> {args.out}")


if __name__ == "__main__":
    main()
