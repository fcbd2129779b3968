"""The evaluation CLI's input checks: one-line errors before any model is loaded."""
from __future__ import annotations

import pytest

from megatron_csd.evaluation.cli import main
from megatron_csd.evaluation.settings import EvalSettings, TestFile


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_cli_rejects_bad_input_with_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    base = ["--load", str(tmp_path), "--output-dir", str(tmp_path / "out")]
    cases = [
        (["--test-file", "a b=" + str(data)], "test file name 'a b'"),
        (["--test-file", "average=" + str(data)], "not one of ['average']"),
        (["--test-file", "x=" + str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--test-file", "x=" + str(data), "--test-file", "x=" + str(data)], "must be unique"),
        (["--test-file", str(data), "--temperature", "0"], "temperature must be > 0"),
        (["--test-file", str(data), "--seeds", "1", "1"], "seeds must be distinct"),
        (["--test-file", str(data), "--template", "chatml"], "unknown prompt template"),
    ]
    for extra, message in cases:
        code, err = _run(base + extra, capsys)
        assert code == 2 and err.startswith("error:") and message in err and "\n" not in err, (extra, err)


def test_cli_refuses_an_output_dir_with_earlier_results(tmp_path, capsys):
    data = tmp_path / "dolly.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    code, err = _run(["--load", str(tmp_path), "--test-file", str(data), "--output-dir", str(out)], capsys)
    assert code == 2 and "already holds evaluation results" in err
    assert (out / "results.json").read_text() == "{}"


def test_test_file_names_and_default_settings():
    assert TestFile.parse("data/dolly_test.jsonl") == TestFile("dolly_test", "data/dolly_test.jsonl")
    assert TestFile.parse("vicuna=v.jsonl") == TestFile("vicuna", "v.jsonl")
    settings = EvalSettings()
    assert settings.seeds == (10, 20, 30, 40, 50)
    assert (settings.temperature, settings.top_k, settings.top_p, settings.greedy) == (1.0, 0, 1.0, False)
    with pytest.raises(ValueError, match="top_p"):
        EvalSettings(top_p=0)


def test_progress_bar_prints_deciles_when_not_a_terminal_and_nothing_when_disabled():
    import io

    from megatron_csd.evaluation.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(20, label="[evaluate]", stream=stream)
    for _ in range(20):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("[evaluate] [") and " 20/20 " in lines[-1]
    quiet = io.StringIO()
    off = ProgressBar(20, stream=quiet, enabled=False)
    off.update()
    off.close()
    assert quiet.getvalue() == ""


def test_prompts_longer_than_the_model_are_refused_before_generating(tmp_path):
    from types import SimpleNamespace

    from megatron_csd.data import load_tokenizer
    from megatron_csd.evaluation import evaluate
    from tests.evaluation.common import build_eval_workspace

    workspace = build_eval_workspace(tmp_path)
    tokenizer = load_tokenizer(workspace["tokenizer"])
    ctx = SimpleNamespace(rank=0, dp_rank=0, dp_size=1, tp_size=1)
    calls = []

    def generate_batch(prompts, seeds):
        calls.append(len(prompts))
        return [([5, 6], "length") for _ in prompts]

    model = SimpleNamespace(training=False, max_sequence_length=8, eval=lambda: None, train=lambda mode: None)
    settings = EvalSettings(seeds=(1,), num_samples=2, response_loss=False)
    with pytest.raises(ValueError, match=r"test file toy, record \d+: the prompt has .* tokens, the model only 8 positions"):
        evaluate(model, [TestFile("toy", workspace["valid"])], tokenizer, settings, ctx,
                 vocab_size=tokenizer.vocab_size, generate_batch=generate_batch, show_progress=False)
    assert calls == []
    model.max_sequence_length = 4096
    result = evaluate(model, [TestFile("toy", workspace["valid"])], tokenizer, settings, ctx,
                      vocab_size=tokenizer.vocab_size, generate_batch=generate_batch, show_progress=False)
    assert calls == [2] and result.files["toy"].metrics["gen_length"]["mean"] == 2.0


def test_tokenizer_check_follows_the_model_rows_not_a_fixed_margin():
    """Qwen2.5-like surplus rows are fine; a tokenizer larger than the model is one clear error."""
    from types import SimpleNamespace

    from megatron_csd.evaluation.cli import _check_tokenizer

    _check_tokenizer(SimpleNamespace(vocab_size=151665), SimpleNamespace(vocab_size=151936), "qwen")
    _check_tokenizer(SimpleNamespace(vocab_size=184), SimpleNamespace(vocab_size=192 + 4096), "big")
    with pytest.raises(ValueError, match="tokenizer has 200 ids but the model has only 192"):
        _check_tokenizer(SimpleNamespace(vocab_size=200), SimpleNamespace(vocab_size=192), "small")
