"""Toy instruction data and tokenizer of the embedded default."""
import json
import re
from collections import Counter

import pytest

from megatron_csd.data.prepare import prepare_dataset
from megatron_csd.data.records import read_records
from megatron_csd.data.tokenizer import load_tokenizer
from megatron_csd.data.toy import (CAPITALS, NUMBER_WORDS, OPPOSITES, build_toy_data, generate_records,
                                  main)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    assert main(["--out", str(out)]) == 0
    return out


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_toy_files_are_valid_and_splits_disjoint(toy):
    assert sorted(p.name for p in toy.iterdir()) == ["tokenizer.model", "train.jsonl", "valid.jsonl"]
    train, valid = list(read_records(toy / "train.jsonl")), list(read_records(toy / "valid.jsonl"))
    assert (len(train), len(valid)) == (4000, 400)
    train_prompts = {(r.instruction, r.context) for r in train}
    assert len(train_prompts) == 4000
    assert not train_prompts & {(r.instruction, r.context) for r in valid}
    train_counts = Counter(row["category"] for row in _rows(toy / "train.jsonl"))
    valid_counts = Counter(row["category"] for row in _rows(toy / "valid.jsonl"))
    assert set(train_counts) == set(valid_counts) and len(train_counts) == 10  # every task held out
    for category, count in valid_counts.items():  # stratified: ~1/11 of each task
        assert abs(count / (count + train_counts[category]) - 400 / 4400) < 0.02, category


def _check_answer(row):
    """Recompute each task's answer from its prompt (independent of the generators)."""
    instruction, context, response = row["instruction"], row["context"], row["response"]
    words = context.split()
    category = row["category"]
    if category == "reverse":
        return response == " ".join(reversed(words))
    if category == "sort":
        return response == " ".join(sorted(words))
    if category == "first_last":
        return response in (f"The first word is {words[0]}.", f"The last word is {words[-1]}.") and \
            (words[0] if "first" in instruction else words[-1]) in response
    if category == "count":
        return response == f"There are {NUMBER_WORDS[len(words)]} words."
    if category == "repeat":
        word, times = re.fullmatch(r"Repeat the word (\w+) (\w+) times\.", instruction).groups()
        return response == " ".join([word] * NUMBER_WORDS.index(times))
    if category == "add":
        a, b = map(int, re.findall(r"\d+", instruction))
        return response == f"{a} plus {b} is {a + b}."
    if category == "successor":
        n = int(re.search(r"\d+", instruction).group())
        return response.endswith(f" is {n + 1}.") if "after" in instruction else response.endswith(f" is {n - 1}.")
    if category == "capital":
        country = next(c for c in CAPITALS if c in instruction)
        return response == f"The capital of {country} is {CAPITALS[country]}."
    if category == "opposite":
        word = instruction.rstrip("?.").split()[-1]
        return response == f"The opposite of {word} is {OPPOSITES[word]}."
    if category == "owner_fact":
        facts = dict((name, (color, obj)) for name, color, obj in re.findall(r"(\w+) has a (\w+) (\w+)\.", context))
        name = next(n for n in facts if n in instruction)
        color, obj = facts[name]
        return response in (f"{name} has a {color} {obj}.", f"The {obj} of {name} is {color}.")
    raise AssertionError(category)


def test_toy_answers_follow_their_rules(toy):
    rows = _rows(toy / "train.jsonl") + _rows(toy / "valid.jsonl")
    wrong = [row for row in rows if not _check_answer(row)]
    assert not wrong, wrong[:3]


def test_toy_tokenizer_layout_and_fit(toy):
    tok = load_tokenizer(toy / "tokenizer.model")
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert 512 <= tok.vocab_size <= 1024
    for text in ("The capital of Peru is Lima.", "unseen: Ωmega ✓ 😀\n\tend"):
        assert tok.decode(tok.encode(text)) == text  # byte fallback covers unseen characters
    assert len(tok.encode("<start_of_turn>")) == 1 and len(tok.encode("<end_of_turn>")) == 1


def test_toy_build_is_deterministic(toy, tmp_path):
    build_toy_data(tmp_path, num_train=4000, num_valid=400)
    for name in ("train.jsonl", "valid.jsonl", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == (toy / name).read_bytes()
    assert generate_records(60, seed=1) != generate_records(60, seed=0)


def test_toy_data_fits_short_sequences_with_short_responses(toy, tmp_path):
    tok = load_tokenizer(toy)
    for template, seq_length in (("dolly", 96), ("gemma-chat", 64)):
        result = prepare_dataset(toy / "train.jsonl", tok, tmp_path / template, seq_length=seq_length,
                                 template=template, valid_input=toy / "valid.jsonl")
        for meta in result.splits.values():
            assert meta["num_prompt_truncated"] == meta["num_response_truncated"] == 0
            assert meta["num_loss_tokens"] / meta["num_samples"] < 16  # short, regular answers
