"""Toy instruction data + tokenizer for the embedded default run (built in a few seconds).

    python -m megatron_csd.data.toy --out DIR   ->   DIR/train.jsonl, DIR/valid.jsonl, DIR/tokenizer.model

The data is generated deterministically from a seed: short instructions from a dozen task
families with regular, learnable answers (word-list reversal and sorting, counting, repetition,
small additions, successor numbers, capitals and opposites from fixed tables, reading a fact
from a `context`). Records are deduplicated on (instruction, context) before a split stratified
by task, so the validation set holds unseen prompts of every task (new word lists, new sums, new
phrasings of known facts).
Responses are short full sentences whose frame is predictable from the prompt, so a tiny model
learns a large part of them within a minute or two, and the rest needs the rule or the fact.

The tokenizer is a Gemma-style sentencepiece BPE model (tokenizer_training.py) trained on the
training split only, rendered with the `dolly` template (so the template's fixed text gets
compact pieces).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from megatron_csd.data.records import InstructionRecord
from megatron_csd.data.templates import render
from megatron_csd.data.tokenizer_training import train_sentencepiece

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "Hungary": "Budapest", "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Thailand": "Bangkok", "Peru": "Lima",
    "Chile": "Santiago", "Canada": "Ottawa", "Mexico": "Mexico City", "Cuba": "Havana",
    "Russia": "Moscow", "Turkey": "Ankara", "Iran": "Tehran", "Australia": "Canberra",
    "Argentina": "Buenos Aires",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "light": "dark",
    "early": "late", "old": "new", "open": "closed", "full": "empty", "high": "low",
    "strong": "weak", "rich": "poor", "hard": "soft", "wet": "dry", "long": "short",
    "near": "far", "loud": "quiet", "clean": "dirty", "first": "last",
}
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "pencil", "window", "bread",
         "horse", "music", "ocean", "candle", "forest", "silver", "rabbit", "mountain", "paper",
         "orange", "bottle", "castle", "dragon", "flower", "guitar", "island", "jacket", "kettle",
         "lemon", "mirror", "needle", "pillow", "rocket", "shadow", "table", "violin", "wagon",
         "yellow", "zebra", "button"]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
         "Lena", "Max", "Nora", "Oscar", "Paula", "Sam"]
COLORS = ["red", "blue", "green", "black", "white", "brown", "pink", "gray"]
OBJECTS = ["ball", "car", "hat", "bike", "book", "cup", "kite", "box", "coat", "bag"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten"]


def _word_list(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng):
    words = _word_list(rng)
    return ("Reverse the order of these words.", " ".join(words), " ".join(reversed(words)))


def _sort(rng):
    words = _word_list(rng)
    return ("Sort these words in alphabetical order.", " ".join(words), " ".join(sorted(words)))


def _first_last(rng):
    words = _word_list(rng)
    if rng.random() < 0.5:
        return ("What is the first word in this list?", " ".join(words), f"The first word is {words[0]}.")
    return ("What is the last word in this list?", " ".join(words), f"The last word is {words[-1]}.")


def _count(rng):
    words = _word_list(rng, 2, 7)
    return ("How many words are in this list?", " ".join(words),
            f"There are {NUMBER_WORDS[len(words)]} words.")


def _repeat(rng):
    word, times = rng.choice(WORDS), rng.randint(2, 4)
    return (f"Repeat the word {word} {NUMBER_WORDS[times]} times.", "", " ".join([word] * times))


def _add(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return (f"What is {a} plus {b}?", "", f"{a} plus {b} is {a + b}.")


def _successor(rng):
    n = rng.randint(0, 98)
    if rng.random() < 0.5:
        return (f"What number comes after {n}?", "", f"The number after {n} is {n + 1}.")
    return (f"What number comes before {n + 1}?", "", f"The number before {n + 1} is {n}.")


def _capital(rng):
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice(["What is the capital of {}?", "Name the capital city of {}.",
                           "Which city is the capital of {}?"]).format(country)
    return (question, "", f"The capital of {country} is {CAPITALS[country]}.")


def _opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    question = rng.choice(["What is the opposite of {}?", "Give the opposite of the word {}."])
    return (question.format(word), "", f"The opposite of {word} is {OPPOSITES[word]}.")


def _owner_fact(rng):
    people = rng.sample(NAMES, 3)
    things = [(rng.choice(COLORS), rng.choice(OBJECTS)) for _ in people]
    context = " ".join(f"{p} has a {c} {o}." for p, (c, o) in zip(people, things))
    k = rng.randrange(3)
    if rng.random() < 0.5:
        return (f"What does {people[k]} have?", context,
                f"{people[k]} has a {things[k][0]} {things[k][1]}.")
    return (f"What color is the {things[k][1]} of {people[k]}?", context,
            f"The {things[k][1]} of {people[k]} is {things[k][0]}.")


TASKS = {"reverse": _reverse, "sort": _sort, "first_last": _first_last, "count": _count,
         "repeat": _repeat, "add": _add, "successor": _successor, "capital": _capital,
         "opposite": _opposite, "owner_fact": _owner_fact}


def generate_records(num_records: int, seed: int) -> list[dict]:
    """`num_records` distinct Dolly-style dicts (instruction, context, response, category)."""
    rng = random.Random(seed)
    names = list(TASKS)
    seen: set[tuple[str, str]] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < num_records:
        attempts += 1
        if attempts > 50 * num_records:
            raise ValueError(f"cannot generate {num_records} distinct toy records")
        category = names[rng.randrange(len(names))]
        instruction, context, response = TASKS[category](rng)
        if (instruction, context) in seen:
            continue
        seen.add((instruction, context))
        records.append({"instruction": instruction, "context": context, "response": response,
                        "category": category})
    return records


def stratified_split(records: list[dict], num_valid: int) -> tuple[list[dict], list[dict]]:
    """(train, valid) with each category's share of `valid` proportional to its size.

    Record j of a category with n records gets the key (j + 0.5) / n; the `num_valid` smallest
    keys (ties by position) go to validation, so small categories (the fact tables) are held out
    too. Both parts keep the generation order.
    """
    position_in_category: dict[str, int] = {}
    counts: dict[str, int] = {}
    for record in records:
        counts[record["category"]] = counts.get(record["category"], 0) + 1
    keys = []
    for index, record in enumerate(records):
        j = position_in_category.get(record["category"], 0)
        position_in_category[record["category"]] = j + 1
        keys.append(((j + 0.5) / counts[record["category"]], index))
    valid_indices = {index for _, index in sorted(keys)[:num_valid]}
    return ([r for i, r in enumerate(records) if i not in valid_indices],
            [r for i, r in enumerate(records) if i in valid_indices])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_toy_data(out_dir, *, num_train: int = 4000, num_valid: int = 400, seed: int = 0,
                   vocab_size: int = 1024) -> dict[str, Path]:
    """Write train.jsonl, valid.jsonl and tokenizer.model under `out_dir`; returns their paths."""
    if num_train < 1 or num_valid < 1:
        raise ValueError(f"need at least one train and one valid record, got {num_train}/{num_valid}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, valid = stratified_split(generate_records(num_train + num_valid, seed), num_valid)
    paths = {"train": out_dir / "train.jsonl", "valid": out_dir / "valid.jsonl",
             "tokenizer": out_dir / "tokenizer.model"}
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["valid"], valid)
    corpus = []
    for r in train:
        rendered = render(InstructionRecord(r["instruction"], r["response"], r["context"]), "dolly")
        corpus.append(rendered.prompt + rendered.response)
    train_sentencepiece(corpus, paths["tokenizer"], vocab_size=vocab_size)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-valid", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="upper bound on the tokenizer's vocabulary (default 1024)")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        paths = build_toy_data(args.out, num_train=args.num_train, num_valid=args.num_valid,
                               seed=args.seed, vocab_size=args.vocab_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"toy data: {args.num_train} train / {args.num_valid} valid records and tokenizer in "
          f"{time.time() - start:.1f}s: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
