"""The exported tokenizer.json: transformers loads it without protobuf/tiktoken and it encodes and
decodes exactly like the project's tokenizer (megatron_csd.data.tokenizer) on the same model."""
import io
import json

import pytest
import sentencepiece

from megatron_csd.conversion.sentencepiece_proto import BYTE, CONTROL, NORMAL, USER_DEFINED, read_sentencepiece_model
from megatron_csd.conversion.tokenizer_json import write_tokenizer_json
from megatron_csd.data.tokenizer import load_tokenizer
from megatron_csd.data.toy import generate_records
from megatron_csd.data.tokenizer_training import train_sentencepiece

transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of Peru is Lima.", "  two  spaces\nand a newline\n", "héllo wörld ☃ 🙂 日本",
         "<start_of_turn>user\n12 plus 30?<end_of_turn>\n<start_of_turn>model\n42<end_of_turn>",
         " leading and trailing ", "Reverse the words: one two three", "", "x\t\ty", "0.5 + 12345"]


def _corpus():
    records = generate_records(300, seed=0)
    return [f"{r['instruction']}\n{r.get('context') or ''}\n{r['response']}" for r in records]


def _llama_style_model(path):
    """A BPE model laid out like LLaMA's: dummy prefix, <s>/</s>, byte fallback."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=500, model_type="bpe",
        hard_vocab_limit=False, byte_fallback=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2, num_threads=1)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module", params=["gemma", "llama"])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "gemma":  # the toy tokenizer of the embedded default (Gemma's layout)
        train_sentencepiece(_corpus(), folder / "tokenizer.model", vocab_size=1024)
    else:
        _llama_style_model(folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps({"model_type": request.param}))
    assert write_tokenizer_json(folder / "tokenizer.model", folder) is None
    return folder


def test_exported_tokenizer_round_trips_like_the_project_tokenizer(exported):
    from transformers import AutoTokenizer

    ours = load_tokenizer(exported / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(str(exported))  # fails without tokenizer.json (protobuf)
    for text in TEXTS + _corpus()[:40]:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids), text
        with_specials = [ours.bos_id] + ids + [ours.eos_id]
        assert hf.decode(with_specials, skip_special_tokens=True) == ours.decode(with_specials)
    assert hf("Paris")["input_ids"][0] == ours.bos_id  # bos added like the original
    assert (hf.bos_token_id, hf.eos_token_id) == (ours.bos_id, ours.eos_id)
    if ours.pad_id != ours.eos_id:
        assert hf.pad_token_id == ours.pad_id
    # The project's own HF-tokenizer reader sees the same tokenizer (same fingerprint).
    assert load_tokenizer(exported / "tokenizer.json").fingerprint == ours.fingerprint


def test_sentencepiece_proto_reader_matches_the_library(exported):
    proto = (exported / "tokenizer.model").read_bytes()
    model = read_sentencepiece_model(proto)
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    assert len(model.pieces) == sp.get_piece_size() and model.model_type == "bpe"
    for index, piece in enumerate(model.pieces):
        assert piece.piece == sp.id_to_piece(index)
        assert piece.score == pytest.approx(sp.get_score(index))
        assert (piece.type == CONTROL) == sp.is_control(index)
        assert (piece.type == BYTE) == sp.is_byte(index)
    assert model.byte_fallback
    assert model.add_dummy_prefix == (exported.name.startswith("llama"))
    assert any(p.type == NORMAL for p in model.pieces)
    if not model.add_dummy_prefix:
        assert [p.piece for p in model.pieces if p.type == USER_DEFINED][:2] == ["<start_of_turn>", "<end_of_turn>"]


def test_unsupported_model_type_writes_nothing_and_says_why(tmp_path):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=300, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    reason = write_tokenizer_json(tmp_path / "tokenizer.model", tmp_path)
    assert "unigram" in reason
    assert not (tmp_path / "tokenizer.json").exists() and not (tmp_path / "tokenizer_config.json").exists()
