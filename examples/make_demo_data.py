"""Make the demo dataset: date normalisation, "Convert to ISO date (YYYY-MM-DD): March 5, 2021" -> "2021-03-05".

Why this task: the base SmolLM2-135M-Instruct mostly echoes the date or answers in another format (a few
per cent exact match), a 135M model learns it in a few hundred LoRA steps (month name -> number, zero-padded
day, copied year), the answer is 10 characters so evaluation is fast, and exact match is an unambiguous score.

Deterministic (fixed seed, pure Python, no model needed). Writes, next to this file:

- ``demo/train.jsonl``    (1500 rows) and ``demo/heldout.jsonl`` (100 rows), ``chat_template`` format:
  ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` (no system message: the tokenizer's
  template adds its default one);
- ``demo/train_alpaca.jsonl``: the same training rows in ``alpaca`` format (instruction / input / output).

Held-out dates are disjoint from training dates (not only the strings: no calendar day appears in both), so
the held-out score measures the rule, not memorised days. Every input names its month in words, so no
input is ambiguous (no 03/05 vs 05/03).

Run: ``python examples/make_demo_data.py`` (rewrites the files; the output is identical each time).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN = 1500
N_HELDOUT = 100
FIRST_YEAR, LAST_YEAR = 1950, 2049
INSTRUCTION = "Convert to ISO date (YYYY-MM-DD)"

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# Each format turns a date into one way people write it; the month always appears as a word.
FORMATS = {
    "month_day_year": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",          # March 5, 2021
    "day_month_year": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",           # 5 March 2021
    "abbr_month_day_year": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",  # Mar 5, 2021
    "day_abbr_month_year": lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",   # 5 Mar 2021
    "ordinal_of": lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",     # 5th of March 2021
    "month_ordinal": lambda d: f"{MONTHS[d.month - 1]} {ordinal(d.day)}, {d.year}",    # March 5th, 2021
    "weekday": lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Friday, March 5, 2021
}


def make_row(date: dt.date, fmt: str) -> dict:
    question = f"{INSTRUCTION}: {FORMATS[fmt](date)}"
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": date.isoformat()}]}


def sample_dates(rng: random.Random, n: int) -> list[dt.date]:
    """``n`` distinct calendar days, uniform over FIRST_YEAR..LAST_YEAR."""
    start = dt.date(FIRST_YEAR, 1, 1).toordinal()
    end = dt.date(LAST_YEAR, 12, 31).toordinal()
    return [dt.date.fromordinal(o) for o in rng.sample(range(start, end + 1), n)]


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    dates = sample_dates(rng, N_TRAIN + N_HELDOUT)  # distinct days: held-out days never appear in train
    fmts = list(FORMATS)
    # Formats are spread evenly (cycled, then shuffled) so every split has each format in the same share.
    train_fmts = [fmts[i % len(fmts)] for i in range(N_TRAIN)]
    heldout_fmts = [fmts[i % len(fmts)] for i in range(N_HELDOUT)]
    rng.shuffle(train_fmts)
    rng.shuffle(heldout_fmts)
    train = [make_row(d, f) for d, f in zip(dates[:N_TRAIN], train_fmts, strict=True)]
    heldout = [make_row(d, f) for d, f in zip(dates[N_TRAIN:], heldout_fmts, strict=True)]
    return train, heldout


def to_alpaca(row: dict) -> dict:
    question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    instruction, _, date_text = question.partition(": ")
    return {"instruction": instruction + ".", "input": date_text, "output": answer}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main() -> None:
    out = Path(__file__).resolve().parent / "demo"
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = build()
    train_inputs = {r["messages"][0]["content"] for r in train}
    assert not train_inputs & {r["messages"][0]["content"] for r in heldout}
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    write_jsonl(out / "train_alpaca.jsonl", [to_alpaca(r) for r in train])
    print(f"wrote {len(train)} train rows, {len(heldout)} held-out rows to {out}")


if __name__ == "__main__":
    main()
