"""Write the sample chat dataset (train.jsonl, eval.jsonl) that `examples/train_phi3.py` trains on by default.

Deterministic (a fixed seed), so the files in the repository are exactly what this script prints:

    python examples/data/make_sample_data.py      # rewrites examples/data/train.jsonl and eval.jsonl

Conversations are short, templated and correct: arithmetic (with follow-ups), unit conversions, string
manipulation, capitals, and small facts, with and without a system prompt, one to three user turns. The
answers follow fixed patterns so that a tiny model can learn them within a few minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
Turns = list[tuple[str, str]]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a patient math tutor.",
    "You are a friendly geography teacher.",
    "Answer briefly and precisely.",
]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Greece": "Athens", "Ireland": "Dublin", "Japan": "Tokyo", "China": "Beijing",
    "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Australia": "Canberra",
}
CONVERSIONS = [  # (from unit, to unit, factor)
    ("km", "meters", 1000), ("m", "centimeters", 100), ("kg", "grams", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("liters", "milliliters", 1000),
]
WORDS = ["apple", "banana", "cherry", "garden", "planet", "window", "silver", "rocket", "forest", "candle",
         "pencil", "river", "orange", "yellow", "castle", "dragon", "summer", "winter", "butter", "mirror"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark", "happy": "sad",
             "open": "closed", "early": "late", "full": "empty", "old": "new"}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
          "a tomato": "red", "an orange": "orange", "a lemon": "yellow"}


def arithmetic(rng: random.Random) -> Turns:
    """`a op b` with the result; maybe doubling it and asking even or odd."""
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice(["+", "-", "*"])
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?"])
    turns = [(question, f"{a} {op} {b} = {value}.")]
    if rng.random() < 0.5:
        value *= 2
        turns.append(("And if you double it?", f"Doubling {value // 2} gives {value}."))
    if rng.random() < 0.3:
        turns.append(("Is that even or odd?", f"{value} is {'even' if value % 2 == 0 else 'odd'}."))
    return turns


def conversion(rng: random.Random) -> Turns:
    """A whole number of one unit in another; maybe a second amount."""
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 12)
    turns = [(rng.choice([f"Convert {n} {src} to {dst}.", f"How many {dst} are in {n} {src}?"]),
              f"{n} {src} is {n * factor} {dst}.")]
    if rng.random() < 0.4:
        m = rng.randint(1, 12)
        turns.append((f"What about {m} {src}?", f"{m} {src} is {m * factor} {dst}."))
    return turns


def strings(rng: random.Random) -> Turns:
    """Reverse, count, capitalise or take the first letter of a word; maybe its last letter."""
    word = rng.choice(WORDS)
    kind = rng.randrange(4)
    if kind == 0:
        turns = [(f"Reverse the word '{word}'.", f"The reverse of '{word}' is '{word[::-1]}'.")]
    elif kind == 1:
        turns = [(f"How many letters are in '{word}'?", f"'{word}' has {len(word)} letters.")]
    elif kind == 2:
        turns = [(f"Write '{word}' in capital letters.", f"'{word}' in capital letters is '{word.upper()}'.")]
    else:
        turns = [(f"What is the first letter of '{word}'?", f"The first letter of '{word}' is '{word[0]}'.")]
    if rng.random() < 0.3:
        turns.append((f"And the last letter of '{word}'?", f"The last letter of '{word}' is '{word[-1]}'."))
    return turns


def capitals(rng: random.Random) -> Turns:
    """The capital of a country; maybe of a second one."""
    countries = rng.sample(sorted(CAPITALS), 2)
    turns = [(rng.choice([f"What is the capital of {countries[0]}?", f"Name the capital of {countries[0]}."]),
              f"The capital of {countries[0]} is {CAPITALS[countries[0]]}.")]
    if rng.random() < 0.5:
        turns.append((f"And of {countries[1]}?", f"The capital of {countries[1]} is {CAPITALS[countries[1]]}."))
    return turns


def facts(rng: random.Random) -> Turns:
    """The next weekday, an opposite, or the color of a thing."""
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(7)
        return [(f"What day comes after {DAYS[i]}?", f"The day after {DAYS[i]} is {DAYS[(i + 1) % 7]}.")]
    if kind == 1:
        word = rng.choice(sorted(OPPOSITES))
        return [(f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{OPPOSITES[word]}'.")]
    thing = rng.choice(sorted(COLORS))
    return [(f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}.")]


TASKS: list[Callable[[random.Random], Turns]] = [arithmetic, conversion, strings, capitals, facts]


def conversation(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """One conversation: an optional system prompt, then the turns of one or two tasks."""
    messages = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.choice(TASKS)(rng)
    if rng.random() < 0.25:
        turns += rng.choice(TASKS)(rng)
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def write(path: Path, count: int, seed: int) -> None:
    """`count` conversations from `Random(seed)`, one JSON object per line."""
    rng = random.Random(seed)
    lines = [json.dumps(conversation(rng), ensure_ascii=False) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(HERE / "train.jsonl", 480, seed=0)
    write(HERE / "eval.jsonl", 64, seed=1)
    print(f"wrote {HERE / 'train.jsonl'} and {HERE / 'eval.jsonl'}")
