"""Masking, truncation and padding of instruction samples."""
import random

import pytest
import torch

from megatron_csd.data.records import InstructionRecord
from megatron_csd.data.samples import (build_training_sample, encode_prompt, tokenize_records,
                                       truncate_sample)
from megatron_csd.data.tokenizer import load_tokenizer
from megatron_csd.data.tokenizer_training import train_sentencepiece

BOS, EOS, PAD = 2, 1, 0


def _reference_sample(ids, prompt_length, seq_length, pad_id):
    """Position-by-position restatement of the documented rules (loops, no numpy)."""
    tokens, labels, mask = [], [], []
    for t in range(seq_length):
        tokens.append(ids[t] if t < len(ids) else pad_id)
        labels.append(ids[t + 1] if t + 1 < len(ids) else pad_id)
        mask.append(1.0 if prompt_length <= t + 1 < len(ids) else 0.0)
    return tokens, labels, mask


@pytest.mark.parametrize("seed", range(6))
def test_training_sample_matches_reference_and_invariants(seed):
    rng = random.Random(seed)
    seq_length = rng.randint(4, 24)
    num_ids = rng.randint(2, seq_length + 1)
    ids = [rng.randint(3, 99) for _ in range(num_ids)]
    prompt_length = rng.randint(1, num_ids - 1)
    sample = build_training_sample(ids, prompt_length, seq_length, PAD)
    tokens, labels, mask = _reference_sample(ids, prompt_length, seq_length, PAD)
    assert sample["tokens"].tolist() == tokens and sample["labels"].tolist() == labels
    assert sample["loss_mask"].tolist() == mask
    assert sample["position_ids"].tolist() == list(range(seq_length))
    assert [sample[k].dtype for k in ("tokens", "labels", "loss_mask", "position_ids")] == \
        [torch.int64, torch.int64, torch.float32, torch.int64]
    # labels are the tokens shifted by one; the mask covers exactly the response ids
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert sample["labels"][sample["loss_mask"] > 0].tolist() == ids[prompt_length:]
    assert (sample["tokens"][num_ids:] == PAD).all() and (sample["loss_mask"][num_ids - 1:] == 0).all()


def test_sample_longer_than_seq_length_is_rejected():
    with pytest.raises(ValueError, match="at most 5"):
        build_training_sample(list(range(6)), 2, 4, PAD)


HEAD, TAIL, RESPONSE = [10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32]


def test_truncation_not_needed_keeps_everything():
    sample = truncate_sample(HEAD, TAIL, RESPONSE, bos_id=BOS, eos_id=EOS, seq_length=20)
    assert sample.ids == [BOS] + HEAD + TAIL + RESPONSE + [EOS]
    assert sample.prompt_length == 1 + len(HEAD) + len(TAIL)
    assert not sample.prompt_truncated and not sample.response_truncated


def test_truncation_cuts_prompt_head_and_keeps_response():
    # 1 + 6 + 2 + 3 + 1 = 13 ids; seq_length 9 allows 10: the head loses its last 3 ids
    sample = truncate_sample(HEAD, TAIL, RESPONSE, bos_id=BOS, eos_id=EOS, seq_length=9)
    assert sample.ids == [BOS] + HEAD[:3] + TAIL + RESPONSE + [EOS]
    assert sample.prompt_truncated and not sample.response_truncated
    assert len(sample.ids) == 10 and sample.prompt_length == 6


def test_max_prompt_length_applies_before_seq_length():
    sample = truncate_sample(HEAD, TAIL, RESPONSE, bos_id=BOS, eos_id=EOS, seq_length=20,
                             max_prompt_length=5)
    assert sample.ids == [BOS] + HEAD[:2] + TAIL + RESPONSE + [EOS] and sample.prompt_length == 5
    assert sample.prompt_truncated
    tiny = truncate_sample(HEAD, TAIL, RESPONSE, bos_id=BOS, eos_id=EOS, seq_length=20, max_prompt_length=1)
    assert tiny.ids == [BOS] + TAIL + RESPONSE + [EOS]  # bos and template tail are never cut


def test_response_too_long_loses_its_end():
    response = list(range(40, 60))
    sample = truncate_sample(HEAD, TAIL, response, bos_id=BOS, eos_id=EOS, seq_length=10)
    assert sample.ids == [BOS] + TAIL + response[:8]  # no eos: the response end was cut
    assert sample.prompt_truncated and sample.response_truncated
    built = build_training_sample(sample.ids, sample.prompt_length, 10, PAD)
    assert built["loss_mask"].sum() == 8


def test_without_bos_and_seq_too_small():
    sample = truncate_sample(HEAD, TAIL, RESPONSE, bos_id=None, eos_id=EOS, seq_length=20)
    assert sample.ids == HEAD + TAIL + RESPONSE + [EOS] and sample.prompt_length == 8
    with pytest.raises(ValueError, match="cannot hold the prompt template"):
        truncate_sample(HEAD, TAIL, RESPONSE, bos_id=BOS, eos_id=EOS, seq_length=2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["Below is an instruction that describes a task. Write a response.\n\n### Response:\n",
             "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
             "The capital of France is Paris. Reverse these words: apple tree stone."] * 5
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)
    return load_tokenizer(path)


@pytest.mark.parametrize("template, response_text", [
    ("dolly", "The capital of France is Paris."),
    ("gemma-chat", "The capital of France is Paris.<end_of_turn>"),
])
def test_tokenized_record_masks_exactly_the_response(tokenizer, template, response_text):
    record = InstructionRecord(instruction="What is the capital of France?", context="Europe.",
                               response="The capital of France is Paris.")
    (sample,) = tokenize_records([record], template, tokenizer, seq_length=128)
    prompt = encode_prompt(record, template, tokenizer)
    assert sample.ids[:sample.prompt_length] == prompt and prompt[0] == tokenizer.bos_id
    built = build_training_sample(sample.ids, sample.prompt_length, 128, tokenizer.pad_id)
    targets = built["labels"][built["loss_mask"] > 0].tolist()
    assert targets[-1] == tokenizer.eos_id
    assert targets[:-1] == tokenizer.encode(response_text)
    assert tokenizer.decode(targets) == response_text


def test_tokenized_record_truncated_prompt_keeps_response(tokenizer):
    record = InstructionRecord(instruction="Reverse these words: " + "apple tree stone " * 30,
                               response="stone tree apple")
    full = encode_prompt(record, "gemma-chat", tokenizer)
    (sample,) = tokenize_records([record], "gemma-chat", tokenizer, seq_length=40)
    assert len(full) > 40 and len(sample.ids) == 41 and sample.prompt_truncated
    response_ids = tokenizer.encode("stone tree apple<end_of_turn>") + [tokenizer.eos_id]
    assert sample.ids[sample.prompt_length:] == response_ids
    tail = tokenizer.encode("<end_of_turn>\n<start_of_turn>model\n")
    assert sample.ids[sample.prompt_length - len(tail):sample.prompt_length] == tail
    assert encode_prompt(record, "gemma-chat", tokenizer, max_prompt_length=12) == \
        tokenize_records([record], "gemma-chat", tokenizer, seq_length=100, max_prompt_length=12)[0].ids[:12]


def test_full_length_sample_has_no_padding():
    ids = list(range(10, 19))  # seq_length 8 holds 9 ids
    sample = build_training_sample(ids, 3, 8, PAD)
    assert sample["tokens"].tolist() == ids[:-1] and sample["labels"].tolist() == ids[1:]
    assert sample["loss_mask"].tolist() == [0.0, 0.0] + [1.0] * 6
