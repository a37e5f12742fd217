"""Make the retention set: prompts the base SmolLM2-135M-Instruct already answers correctly, with its own answers.

Used to measure forgetting (issue 6): after fine-tuning, does the model still answer these correctly, and
how likely does it still find the base model's own answers? ``lorafit.eval.tasks.retention_score`` computes both.

How it is made (once; the output is shipped in ``retention/retention.jsonl``):

1. ``CANDIDATES`` below is a fixed list of short questions with known correct answers (capitals, small
   arithmetic, everyday science and language facts, common sense), written by hand. An answer may list
   several accepted forms (``["8", "eight"]``).
2. The base model answers each greedily (``MAX_NEW_TOKENS`` new tokens at most).
3. A candidate is kept when it is not in ``EXCLUDE`` (answers read by hand that contain the known answer
   but are wrong around it), when the answer contains a known answer as a whole word
   (``lorafit.eval.tasks.contains_answer``) and finished (ended its turn) well within the token limit, so the
   stored answer is complete.
4. Each kept row is ``{"messages": [user prompt], "reference": base answer, "answer": known answer(s)}``.

Arithmetic questions avoid answers equal to an operand (``10 / 10``), so echoing the question never counts
as a correct answer.

Run: ``python examples/make_retention_set.py`` (needs the demo model; ~1-2 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lorafit.eval.tasks import contains_answer, generate_answers
from lorafit.models import load_model_and_tokenizer

MAX_NEW_TOKENS = 64
KEEP_MAX_TOKENS = 56  # an answer this long or longer may have been cut off: dropped

Q = list[tuple[str, str | list[str]]]

CAPITALS: Q = [(f"What is the capital of {country}?", city) for country, city in [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("India", ["New Delhi", "Delhi"]),
    ("Brazil", ["Brasília", "Brasilia"]), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"),
    ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Switzerland", "Bern"), ("Ireland", "Dublin"),
    ("Turkey", "Ankara"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Kenya", "Nairobi"),
    ("Peru", "Lima"), ("Cuba", "Havana"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Vietnam", "Hanoi"),
    ("the United States", "Washington"), ("Scotland", "Edinburgh"),
]]

ARITHMETIC: Q = [(f"What is {a}?", str(b)) for a, b in [
    ("2 + 2", 4), ("3 + 5", 8), ("7 + 6", 13), ("9 + 10", 19), ("12 + 15", 27), ("20 + 30", 50),
    ("100 + 200", 300), ("45 + 55", 100), ("10 - 3", 7), ("15 - 7", 8), ("100 - 1", 99), ("3 times 4", 12),
    ("5 times 6", 30), ("7 times 8", 56), ("9 times 9", 81), ("12 times 12", 144), ("10 times 10", 100),
    ("6 times 7", 42), ("20 divided by 4", 5), ("1000 + 1000", 2000), ("11 + 11", 22), ("8 + 8", 16),
    ("25 times 4", 100), ("99 + 1", 100), ("half of 50", 25), ("double 21", 42), ("the square root of 81", 9),
    ("3 squared", 9), ("50 + 50", 100), ("2 times 3", 6),
]]

FACTS: Q = [
    ("Which planet do we live on?", "Earth"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the closest star to Earth?", "Sun"),
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("What gas do humans need to breathe to stay alive?", "oxygen"),
    ("What is the chemical formula of water?", "H2O"),
    ("What is the chemical symbol for gold?", "Au"),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100"),
    ("At what temperature in degrees Celsius does water freeze?", ["0", "zero"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("How many months are there in a year?", ["12", "twelve"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("How many minutes are there in an hour?", ["60", "sixty"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("How many legs does an insect have?", ["6", "six"]),
    ("How many continents are there on Earth?", ["7", "seven"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("How many wheels does a bicycle have?", ["2", "two"]),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the tallest mountain in the world?", "Everest"),
    ("What is the largest mammal in the world?", "blue whale"),
    ("What is the largest country in the world by area?", "Russia"),
    ("What organ pumps blood through the human body?", "heart"),
    ("Which organs do humans use to breathe?", "lungs"),
    ("What is the hardest natural substance?", "diamond"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", ["Leonardo", "da Vinci"]),
    ("Who developed the theory of relativity?", "Einstein"),
    ("Who discovered penicillin?", "Fleming"),
    ("Who wrote the Harry Potter books?", "Rowling"),
    ("Who was the first president of the United States?", "George Washington"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("In which city is the Eiffel Tower?", "Paris"),
    ("In which city is the Statue of Liberty?", "New York"),
    ("In which city is the Colosseum?", "Rome"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What language is mainly spoken in France?", "French"),
    ("What language is mainly spoken in Germany?", "German"),
    ("What is the currency of Japan?", "yen"),
    ("What is the currency of the United Kingdom?", ["pound", "pounds", "sterling"]),
    ("What is the currency of the United States?", ["dollar", "dollars"]),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth", "moths"]),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is a baby cat called?", "kitten"),
    ("What is a baby dog called?", "puppy"),
    ("Which animal says moo?", ["cow", "cows"]),
    ("Which animal barks?", ["dog", "dogs"]),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color do you get when you mix blue and yellow?", "green"),
    ("What color do you get when you mix red and white?", "pink"),
    ("What fruit is long, curved and yellow?", ["banana", "bananas"]),
    ("What season comes after winter?", "spring"),
    ("What season comes after summer?", ["autumn", "fall"]),
    ("What day comes after Monday?", "Tuesday"),
    ("What day comes after Friday?", "Saturday"),
    ("Which month comes after January?", "February"),
    ("Which month comes before December?", "November"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of big?", ["small", "little"]),
    ("What is the opposite of day?", "night"),
    ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"),
    ("What is the past tense of go?", "went"),
    ("What is the past tense of eat?", "ate"),
    ("What do you call a shape with four equal sides and four right angles?", "square"),
    ("What is the boiling point of water in degrees Fahrenheit?", "212"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32"),
    ("Which instrument has black and white keys?", "piano"),
    ("What do people use an umbrella for?", "rain"),
    ("Where do penguins mainly live, the North Pole or the South Pole?", ["South Pole", "Antarctica"]),
    ("What is the main ingredient of bread?", "flour"),
    ("What do you call the person who flies an airplane?", "pilot"),
    ("What is the name of our galaxy?", "Milky Way"),
    ("What force keeps us on the ground?", "gravity"),
]

CANDIDATES: Q = CAPITALS + ARITHMETIC + FACTS

# Read from the base model's answers: they contain the known answer but say something wrong around it
# ("The planet we live on is called Kepler-41B ... similar to Earth"), so they are not things it does well.
EXCLUDE = {
    "Which planet do we live on?",         # "Kepler-41B ... similar to Earth"
    "What is the closest star to Earth?",  # "Proxima Centauri ... from our Sun"
    "What is the tallest mountain in the world?",  # "Mount Everest, also known as K2"
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "retention" / "retention.jsonl")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("demo")
    prompts = [[{"role": "user", "content": q}] for q, _ in CANDIDATES]
    answers = generate_answers(model, tok, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=16)
    kept, wrong, cut = [], [], []
    for (question, known), prompt, reply in zip(CANDIDATES, prompts, answers, strict=True):
        n_tokens = len(tok(reply, add_special_tokens=False)["input_ids"])
        if question in EXCLUDE:
            wrong.append((question, known, reply))
        elif not contains_answer(reply, known):
            wrong.append((question, known, reply))
        elif n_tokens >= KEEP_MAX_TOKENS:
            cut.append((question, known, reply))
        else:
            kept.append({"messages": prompt, "reference": reply, "answer": known})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in kept:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(args.out)
    print(f"{len(CANDIDATES)} candidates: kept {len(kept)}, wrong {len(wrong)}, too long {len(cut)} -> {args.out}")
    for question, known, reply in wrong:
        print(f"  wrong: {question!r} expected {known!r}, got {reply[:80]!r}")
    for question, _, reply in cut:
        print(f"  too long: {question!r}: {reply[:60]!r}...")


if __name__ == "__main__":
    main()
