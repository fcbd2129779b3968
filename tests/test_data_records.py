"""JSONL instruction records: field maps, and malformed lines reported as file:line."""
import json
import re

import pytest

from megatron_csd.data.records import FieldMap, InstructionRecord, MalformedRecordError, ReadStats, read_records


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_dolly_records_read_in_order_with_optional_context(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "a", "context": "c", "response": "r", "category": "x"}),
        "",
        json.dumps({"instruction": "b", "response": "s"}),
        json.dumps({"instruction": "é", "context": None, "response": "t"}, ensure_ascii=False),
    ])
    stats = ReadStats()
    records = list(read_records(path, stats=stats))
    assert records == [InstructionRecord("a", "r", "c"), InstructionRecord("b", "s", ""),
                       InstructionRecord("é", "t", "")]
    assert (stats.num_records, stats.num_blank_lines, stats.num_malformed) == (3, 1, 0)


def test_alpaca_field_map(tmp_path):
    path = _write(tmp_path / "a.jsonl", [json.dumps({"instruction": "i", "input": "x", "output": "o"})])
    with pytest.raises(MalformedRecordError, match="missing field 'response'.*--fields alpaca"):
        list(read_records(path))
    assert list(read_records(path, FieldMap.alpaca())) == [InstructionRecord("i", "o", "x")]
    assert FieldMap.parse("alpaca") == FieldMap.alpaca()
    custom = FieldMap.parse("instruction=q, response=a, context=")
    assert custom == FieldMap(instruction="q", context=None, response="a")
    for bad in ("question=q", "instruction=q", "instruction=q,response=a,response=b", "nonsense"):
        with pytest.raises(ValueError, match="bad field map"):
            FieldMap.parse(bad)


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "a", "response": ', "invalid JSON"),
    ('["instruction", "response"]', "expected a JSON object, got list"),
    ('{"instruction": "a"}', "missing field 'response'"),
    ('{"instruction": "a", "response": 3}', "field 'response' must be a string, got int"),
    ('{"instruction": "a", "context": ["x"], "response": "b"}', "field 'context' must be a string"),
    ('{"instruction": "  ", "response": "b"}', "field 'instruction' is empty"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"instruction": "a", "response": "b"})
    path = _write(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(MalformedRecordError, match="^" + re.escape(f"{tmp_path / 'bad.jsonl'}:3: {message}")):
        list(read_records(path))


def test_skip_malformed_counts_bad_lines(tmp_path):
    good = json.dumps({"instruction": "a", "response": "b"})
    path = tmp_path / "mixed.jsonl"
    path.write_bytes((good + "\n{oops\n" + good + "\n\xff\n").encode("utf-8") + b"\xff\xfe\n")
    stats = ReadStats()
    records = list(read_records(path, skip_malformed=True, stats=stats))
    assert len(records) == 2
    assert stats.num_malformed == 3
    assert stats.first_errors[0].startswith(f"{path}:2: invalid JSON")
    assert stats.first_errors[2].startswith(f"{path}:5: not UTF-8")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_records(tmp_path / "none.jsonl"))
