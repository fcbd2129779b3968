"""Tokenizer loading: sentencepiece models and HF tokenizer.json files built in-test."""
import json

import pytest
import sentencepiece

from megatron_csd.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from megatron_csd.data.tokenizer_training import train_sentencepiece

CORPUS = [f"The capital of {c} is {k}. {n} plus {n} is {2 * n}.\nReverse: {c} {k}"
          for n, (c, k) in enumerate([("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"),
                                      ("Kenya", "Nairobi"), ("Chile", "Santiago")] * 8)]
SAMPLE_TEXTS = ["The capital of Peru is Lima.", "  two  spaces\nand a newline\n", "héllo wörld ☃ 🙂",
                "<start_of_turn>user\n12 plus 30?<end_of_turn>\n", ""]


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tokenizer.model", vocab_size=400)


def _train_sp_with_layout(path, **ids):
    """A sentencepiece model with a non-Gemma special-id layout, trained directly."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(path), vocab_size=80, model_type="bpe",
        hard_vocab_limit=False, minloglevel=2, num_threads=1, **ids)
    return path.with_suffix(".model")


def test_sentencepiece_special_ids_read_from_gemma_layout_model(sp_model_file):
    tok = load_tokenizer(sp_model_file)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.id_to_piece(tok.bos_id) == "<bos>" and tok.id_to_piece(tok.eos_id) == "<eos>"
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_file))
    assert tok.vocab_size == reference.get_piece_size()


def test_sentencepiece_special_ids_not_hard_coded(tmp_path):
    model = _train_sp_with_layout(tmp_path / "llama_like", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    tok = load_tokenizer(model)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # no pad piece: pad with eos (padding is never a target)
    no_bos = load_tokenizer(_train_sp_with_layout(tmp_path / "no_bos", unk_id=0, bos_id=-1, eos_id=1,
                                                  pad_id=2))
    assert no_bos.bos_id is None and (no_bos.eos_id, no_bos.pad_id) == (1, 2)


def test_sentencepiece_round_trip_matches_library(sp_model_file):
    tok = load_tokenizer(sp_model_file.parent)  # directory form
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_file))
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode("<start_of_turn>user\n")
    assert tok.id_to_piece(ids[0]) == "<start_of_turn>"  # chat markers are single pieces
    assert tok.encode_batch(SAMPLE_TEXTS) == [tok.encode(t) for t in SAMPLE_TEXTS]


def test_decode_drops_bos_eos_pad(sp_model_file):
    tok = load_tokenizer(sp_model_file)
    ids = tok.encode("Lima")
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "Lima"


def _build_hf_tokenizer(directory, *, config=True, pad=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
             "pad_token": "<pad>" if pad else None}))
    return tokenizer


def test_hf_tokenizer_json_matches_library_and_reads_config(tmp_path):
    reference = _build_hf_tokenizer(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == reference.token_to_id("<s>")
    assert tok.eos_id == reference.token_to_id("</s>")
    assert tok.pad_id == reference.token_to_id("<pad>")
    assert tok.vocab_size == reference.get_vocab_size()
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + tok.encode("Paris") + [tok.eos_id]) == "Paris"


def test_hf_tokenizer_without_config_uses_usual_names_and_eos_as_pad(tmp_path):
    reference = _build_hf_tokenizer(tmp_path / "bare", config=False, pad=False)
    tok = load_tokenizer(tmp_path / "bare" / "tokenizer.json")
    assert tok.bos_id == reference.token_to_id("<s>") and tok.eos_id == reference.token_to_id("</s>")
    assert tok.pad_id == tok.eos_id
    explicit = load_tokenizer(tmp_path / "bare", eos_token="<unk>")
    assert explicit.eos_id == reference.token_to_id("<unk>")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(tmp_path / "bare", eos_token="<nope>")


def test_fingerprint_tells_tokenizers_apart(sp_model_file, tmp_path):
    same = load_tokenizer(sp_model_file)
    copy = tmp_path / "copy" / "tokenizer.model"
    copy.parent.mkdir()
    copy.write_bytes(sp_model_file.read_bytes())
    assert load_tokenizer(copy).fingerprint == same.fingerprint
    other = train_sentencepiece(CORPUS[:5] + ["something else entirely"], tmp_path / "other.model",
                                vocab_size=390)
    assert load_tokenizer(other).fingerprint != same.fingerprint
    _build_hf_tokenizer(tmp_path / "hf")
    assert load_tokenizer(tmp_path / "hf").fingerprint != same.fingerprint


def test_missing_and_corrupt_files_give_clear_errors(tmp_path, sp_model_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    bad_sp = tmp_path / "bad" / "tokenizer.model"
    bad_sp.parent.mkdir()
    bad_sp.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        load_tokenizer(bad_sp.parent)
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(sp_model_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        load_tokenizer(truncated)
    bad_json = tmp_path / "badjson" / "tokenizer.json"
    bad_json.parent.mkdir()
    bad_json.write_text('{"model": ')
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        load_tokenizer(bad_json)
    with pytest.raises(ValueError, match="HF tokenizer.json files only"):
        load_tokenizer(sp_model_file, eos_token="</s>")
