"""Prepare step (tools/prepare_data.py) -> InstructionDataset round trip and metadata checks."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_csd.data.dataset import InstructionDataset, collate
from megatron_csd.data.prepare import prepare_dataset, token_dtype_for
from megatron_csd.data.records import FieldMap, read_records
from megatron_csd.data.samples import build_training_sample, encode_prompt, tokenize_records
from megatron_csd.data.tokenizer import load_tokenizer
from megatron_csd.data.tokenizer_training import train_sentencepiece
from megatron_csd.data.toy import generate_records

REPO = Path(__file__).resolve().parents[1]


def _load_cli():
    spec = importlib.util.spec_from_file_location("prepare_data_cli", REPO / "tools" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few hundred toy records (one with a very long context) and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    records = generate_records(300, seed=5)
    records[7] = dict(records[7], context=" ".join(["apple stone river"] * 60))
    train = _write_jsonl(root / "train.jsonl", records[:250])
    valid = _write_jsonl(root / "valid.jsonl", records[250:])
    texts = [r["instruction"] + " " + r["context"] + " " + r["response"] for r in records]
    tokenizer_file = train_sentencepiece(texts, root / "tok" / "tokenizer.model", vocab_size=600)
    return {"train": train, "valid": valid, "tokenizer": load_tokenizer(tokenizer_file), "root": root}


def _direct(path, template, tokenizer, seq_length, **kw):
    records = list(read_records(path))
    return [build_training_sample(s.ids, s.prompt_length, seq_length, tokenizer.pad_id)
            for s in tokenize_records(records, template, tokenizer, seq_length=seq_length, **kw)]


@pytest.mark.parametrize("template", ["dolly", "gemma-chat"])
def test_prepared_dataset_equals_direct_tokenization(corpus, tmp_path, template):
    tok = corpus["tokenizer"]
    result = prepare_dataset(corpus["train"], tok, tmp_path, seq_length=64, template=template,
                             valid_input=corpus["valid"], max_prompt_length=48)
    assert set(result.splits) == {"train", "valid"}
    assert result.splits["train"]["num_prompt_truncated"] >= 1  # the long-context record
    for split, source in (("train", corpus["train"]), ("valid", corpus["valid"])):
        dataset = InstructionDataset(tmp_path / split, 64, tokenizer=tok)
        expected = _direct(source, template, tok, 64, max_prompt_length=48)
        assert len(dataset) == len(expected) == result.splits[split]["num_samples"]
        for i in range(len(dataset)):
            got = dataset[i]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(got[key], expected[i][key]), (split, i, key)
        assert sum(float(s["loss_mask"].sum()) for s in expected) == result.splits[split]["num_loss_tokens"]
    records = list(read_records(corpus["valid"]))
    prompt, response = dataset.prompt_and_response(4)
    suffix = "<end_of_turn>" if template == "gemma-chat" else ""
    assert tok.decode(response.tolist()) == records[4].response + suffix and response[-1] == tok.eos_id
    assert prompt.tolist() == encode_prompt(records[4], template, tok, max_prompt_length=48)
    batch = collate([dataset[0], dataset[1], dataset[2]])
    assert batch["tokens"].shape == (3, 64) and batch["loss_mask"].dtype == torch.float32
    assert np.load(tmp_path / "train" / "tokens.npy").dtype == np.uint16


def test_longer_seq_length_pads_more_and_shorter_is_refused(corpus, tmp_path):
    tok = corpus["tokenizer"]
    prepare_dataset(corpus["valid"], tok, tmp_path, seq_length=48, template="dolly")
    at_96 = InstructionDataset(tmp_path / "train", 96)
    at_48 = InstructionDataset(tmp_path / "train", 48)
    assert torch.equal(at_96[3]["tokens"][:48], at_48[3]["tokens"])
    assert float(at_96[3]["loss_mask"].sum()) == float(at_48[3]["loss_mask"].sum())
    with pytest.raises(ValueError, match="re-run tools/prepare_data.py with --seq-length 16"):
        InstructionDataset(tmp_path / "train", 16)


def test_valid_fraction_split_is_exact_and_deterministic(corpus, tmp_path):
    tok = corpus["tokenizer"]
    first = prepare_dataset(corpus["train"], tok, tmp_path / "a", seq_length=64, template="dolly",
                            valid_fraction=0.2, split_seed=3)
    prepare_dataset(corpus["train"], tok, tmp_path / "b", seq_length=64, template="dolly",
                    valid_fraction=0.2, split_seed=3)
    assert first.splits["valid"]["num_samples"] == 50 and first.splits["train"]["num_samples"] == 200
    for split in ("train", "valid"):
        for name in ("tokens.npy", "offsets.npy", "prompt_lengths.npy"):
            assert np.array_equal(np.load(tmp_path / "a" / split / name), np.load(tmp_path / "b" / split / name))
    whole = InstructionDataset(_prepared_whole(corpus, tmp_path), 64)
    parts = [InstructionDataset(tmp_path / "a" / s, 64) for s in ("train", "valid")]
    as_tuples = lambda ds: sorted(tuple(ds.sample_ids(i).tolist()) for i in range(len(ds)))
    assert as_tuples(whole) == sorted(as_tuples(parts[0]) + as_tuples(parts[1]))
    other_seed = prepare_dataset(corpus["train"], tok, tmp_path / "c", seq_length=64, template="dolly",
                                 valid_fraction=0.2, split_seed=4)
    assert other_seed.splits["valid"]["num_samples"] == 50
    assert not np.array_equal(np.load(tmp_path / "a" / "valid" / "tokens.npy"),
                              np.load(tmp_path / "c" / "valid" / "tokens.npy"))


def _prepared_whole(corpus, tmp_path):
    prepare_dataset(corpus["train"], corpus["tokenizer"], tmp_path / "whole", seq_length=64, template="dolly")
    return tmp_path / "whole" / "train"


def test_metadata_checks_on_load(corpus, tmp_path):
    tok = corpus["tokenizer"]
    prepare_dataset(corpus["valid"], tok, tmp_path, seq_length=64, template="dolly")
    other = load_tokenizer(train_sentencepiece(["a different corpus altogether"] * 3,
                                               tmp_path / "other.model", vocab_size=300))
    with pytest.raises(ValueError, match="differs from the given tokenizer"):
        InstructionDataset(tmp_path / "train", 64, tokenizer=other)
    with pytest.raises(ValueError, match="differs from the given expected_fingerprint"):
        InstructionDataset(tmp_path / "train", 64, expected_fingerprint=other.fingerprint)
    InstructionDataset(tmp_path / "train", 64, expected_fingerprint=tok.fingerprint)
    with pytest.raises(ValueError, match="holds prepared splits; pass .*train"):
        InstructionDataset(tmp_path, 64)
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        InstructionDataset(tmp_path / "nothing", 64)
    meta_file = tmp_path / "train" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        InstructionDataset(tmp_path / "train", 64)
    meta_file.write_text(json.dumps(dict(meta, num_samples=meta["num_samples"] + 1)))
    with pytest.raises(ValueError, match="array sizes disagree"):
        InstructionDataset(tmp_path / "train", 64)
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "train" / "offsets.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        InstructionDataset(tmp_path / "train", 64)


def test_bad_prepare_arguments(corpus, tmp_path):
    tok = corpus["tokenizer"]
    with pytest.raises(ValueError, match="unknown prompt template"):
        prepare_dataset(corpus["valid"], tok, tmp_path, seq_length=64, template="chatml")
    with pytest.raises(ValueError, match="either a separate validation file or valid_fraction"):
        prepare_dataset(corpus["valid"], tok, tmp_path, seq_length=64, template="dolly",
                        valid_input=corpus["valid"], valid_fraction=0.1)
    with pytest.raises(ValueError, match="valid_fraction must be in"):
        prepare_dataset(corpus["valid"], tok, tmp_path, seq_length=64, template="dolly", valid_fraction=1.0)
    with pytest.raises(ValueError, match="cannot hold the prompt template"):
        prepare_dataset(corpus["valid"], tok, tmp_path, seq_length=4, template="dolly")
    assert token_dtype_for(65536) == np.uint16 and token_dtype_for(256000) == np.int32


def test_existing_prepared_dir_is_refused_and_kept(corpus, tmp_path):
    tok = corpus["tokenizer"]
    prepare_dataset(corpus["train"], tok, tmp_path, seq_length=64, template="dolly", valid_input=corpus["valid"])
    before = (tmp_path / "valid" / "tokens.npy").read_bytes()
    with pytest.raises(ValueError, match="already holds a prepared dataset.*new --out"):
        prepare_dataset(corpus["train"], tok, tmp_path, seq_length=64, template="dolly")
    assert (tmp_path / "valid" / "tokens.npy").read_bytes() == before


def test_cli_prepares_and_reports_malformed_lines(corpus, tmp_path, capsys):
    cli = _load_cli()
    tok_dir = str(corpus["tokenizer"].source).rsplit("/", 1)[0]
    code = cli.main(["--input", str(corpus["train"]), "--tokenizer", tok_dir, "--out", str(tmp_path / "ok"),
                     "--seq-length", "64", "--template", "gemma-chat", "--valid-fraction", "0.1"])
    captured = capsys.readouterr()
    assert code == 0 and "225 samples" in captured.out and "25 samples" in captured.out
    assert "100.0%" in captured.err
    meta = json.loads((tmp_path / "ok" / "valid" / "metadata.json").read_text())
    assert meta["template"] == "gemma-chat" and meta["tokenizer"]["fingerprint"] == corpus["tokenizer"].fingerprint

    lines = corpus["train"].read_text().splitlines()
    lines[4] = '{"instruction": "x", "output": "y"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    args = ["--input", str(bad), "--tokenizer", tok_dir, "--out", str(tmp_path / "bad"), "--seq-length", "64"]
    assert cli.main(args) == 2
    assert f"{bad}:5: missing field 'response'" in capsys.readouterr().err
    assert cli.main(args + ["--skip-malformed", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 malformed lines" in captured.err and "249 samples" in captured.out

    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add.", "input": "2 3", "output": "5"}])
    assert cli.main(["--input", str(alpaca), "--tokenizer", tok_dir, "--out", str(tmp_path / "alp"),
                     "--seq-length", "256", "--fields", "alpaca", "--quiet"]) == 0
    sample = InstructionDataset(tmp_path / "alp" / "train", 256)[0]
    assert corpus["tokenizer"].decode(sample["labels"][sample["loss_mask"] > 0].tolist()) == "5"
    assert corpus["tokenizer"].decode(sample["tokens"].tolist()).endswith(
        "### Instruction:\nAdd.\n\n### Input:\n2 3\n\n### Response:\n5")
