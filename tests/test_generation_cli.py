"""tools/generate.py end to end (subprocess; torchrun at TP 2) on a converted tiny LLaMA whose
embedding has 8 more rows than its sentencepiece tokenizer has ids (the issue-12 layout).

The 8 extra output rows are made to dominate the logits, so greedy decoding would pick them:
by default they are masked (every completion id decodes); --allow-undecodable-ids lets them
through. --load takes the converted folder, a trainer save directory (latest) and an iter_* folder.
Also: Dolly / prompt / prompt_ids lines, the documented output fields, --eos-id,
per-request seeds S + i, and one-line errors for bad input.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.generation_models import randomize

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
EXTRA_ROWS = 8
CORPUS = [f"The capital of {c} is {k}. {n} plus {n} is {2 * n}.\nReverse: {c} {k}"
          for n, (c, k) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"),
                                      ("Kenya", "Nairobi"), ("Chile", "Santiago")] * 8)]
LINES = [{"instruction": "Name the capital of Peru.", "context": "", "response": "Lima", "id": "dolly"},
         {"prompt": "The capital of Japan is", "id": "text"},
         {"prompt_ids": [2, 40, 41, 42], "id": "ids", "seed": 77}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_csd.data import load_tokenizer
    from megatron_csd.data.tokenizer_training import train_sentencepiece

    root = tmp_path_factory.mktemp("generate_cli")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    train_sentencepiece(CORPUS, hf_dir / "tokenizer.model", vocab_size=400)
    tokenizer = load_tokenizer(hf_dir / "tokenizer.model")
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size + EXTRA_ROWS, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), gemma=False)
    with torch.no_grad():  # the rows the tokenizer cannot decode win every argmax
        model.lm_head.weight[tokenizer.vocab_size:] = model.model.norm.weight.sign() * 5.0
    model.save_pretrained(hf_dir)
    convert_hf_to_megatron(hf_dir, root / "mg", vocab_multiple=64)
    (root / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    (root / "save").mkdir()  # a trainer save directory's layout: latest -> iter_* (model part)
    (root / "save" / "iter_0000003").symlink_to(root / "mg", target_is_directory=True)
    (root / "save" / "latest").write_text("iter_0000003\n")
    return root, tokenizer


def _generate(root, out_name, *extra, nproc=1, load="mg"):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = launcher + [str(REPO / "tools" / "generate.py"), "--load", str(root / load),
                      "--input", str(root / "in.jsonl"), "--output", str(root / out_name),
                      "--max-new-tokens", "6", "--device", "cpu", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = None
    if (root / out_name).exists():
        lines = [json.loads(line) for line in (root / out_name).read_text().splitlines()]
    return proc, lines


@pytest.mark.slow
def test_generate_cli_writes_documented_fields_and_masks_undecodable_ids(checkpoint):
    root, tokenizer = checkpoint
    proc, lines = _generate(root, "greedy.jsonl", "--greedy", "--tensor-model-parallel-size", "1",
                            "--pipeline-model-parallel-size", "1", load="save")  # follows latest
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line["id"] for line in lines] == ["dolly", "text", "ids"]
    for line, original in zip(lines, LINES):
        assert {k: line[k] for k in original} == original  # input fields kept
        assert line["finish_reason"] in ("eos", "length") and isinstance(line["completion"], str)
        assert all(0 <= i < tokenizer.vocab_size for i in line["completion_ids"])
        assert line["completion"] == tokenizer.decode(line["completion_ids"])


@pytest.mark.slow
def test_generate_cli_sampling_at_tp2_under_torchrun_matches_tp1(checkpoint):
    """With --allow-undecodable-ids the dominating extra rows are sampled (kept in the ids,
    left out of the text), identically at TP 1 and TP 2."""
    root, tokenizer = checkpoint
    flags = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "5",
             "--allow-undecodable-ids"]
    proc, tp1 = _generate(root, "tp1.jsonl", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, tp2 = _generate(root, "tp2.jsonl", *flags, "--tensor-model-parallel-size", "2", nproc=2,
                          load="save/iter_0000003")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line["completion_ids"] for line in tp2] == [line["completion_ids"] for line in tp1]
    assert all(max(line["completion_ids"]) >= tokenizer.vocab_size for line in tp1)
    for line in tp1:
        decodable = [i for i in line["completion_ids"] if i < tokenizer.vocab_size]
        assert line["completion"] == tokenizer.decode(decodable)


def test_generate_cli_bad_input_is_a_one_line_error_in_a_subprocess(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt_ids": [1, 2]}\n')
    proc, lines = _generate(tmp_path, "out.jsonl", "--greedy")  # tmp_path/mg does not exist
    assert proc.returncode == 2 and lines is None
    assert proc.stderr.strip().splitlines()[-1].startswith("generate.py: error: --load")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content,flags,message", [
    ('{"prompt_ids": [1, 2]}\nnot json\n', [], "line 2: not valid JSON"),
    ('{"prompt_ids": "abc"}\n', [], "line 1: prompt_ids must be a non-empty list"),
    ('{"text": "hi"}\n', [], "exactly one of"),
    ('{"prompt_ids": [1, 2], "seed": -1}\n', [], "seed must be an int"),
    ('{"prompt_ids": [1, 99999]}\n', [], "outside the model's vocabulary"),
    ('{"prompt_ids": [1, 2]}\n', ["--greedy", "--temperature", "0.5"], "--greedy cannot be combined"),
    ('{"prompt_ids": [1, 2]}\n', ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    ('{"prompt_ids": [1, 2]}\n', ["--eos-id", "99999"], "eos_id 99999 is outside"),
    ('{"prompt_ids": [1, 2]}\n', ["--template", "nope"], "unknown prompt template"),
])
def test_generate_cli_bad_input_is_a_one_line_error(checkpoint, tmp_path, capsys, content, flags, message):
    from megatron_csd.generation.cli import main

    root, _ = checkpoint
    (tmp_path / "in.jsonl").write_text(content)
    code = main(["--load", str(root / "mg"), "--input", str(tmp_path / "in.jsonl"), "--output",
                 str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out.jsonl").exists()
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_requests_get_seed_s_plus_i_unless_the_line_sets_one(checkpoint, tmp_path):
    from megatron_csd.generation.inputs import read_requests

    root, tokenizer = checkpoint
    records, requests = read_requests(str(root / "in.jsonl"), tokenizer=tokenizer, template="dolly",
                                      base_seed=5)
    assert [r.seed for r in requests] == [5, 6, 77] and records == LINES
    assert requests[1].prompt_ids == [tokenizer.bos_id] + tokenizer.encode("The capital of Japan is")
    assert requests[2].prompt_ids == [2, 40, 41, 42]
    assert requests[0].prompt_ids[0] == tokenizer.bos_id and len(requests[0].prompt_ids) > 20
