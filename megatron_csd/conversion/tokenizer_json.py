"""Write an HF fast-tokenizer ``tokenizer.json`` for a sentencepiece BPE ``tokenizer.model``.

``transformers`` can only load a folder holding just ``tokenizer.model`` by converting it
itself, which needs ``protobuf`` (or falls back to ``tiktoken``). The exporter therefore writes
the converted ``tokenizer.json`` (and a ``tokenizer_config.json`` naming
``PreTrainedTokenizerFast`` when the folder has none), built with the ``tokenizers`` library
from the model's own pieces (read by ``sentencepiece_proto``), so loading needs no conversion:

- model: ``BPE`` with the sentencepiece vocabulary (id = piece index) and one merge per way a
  NORMAL piece splits into two NORMAL pieces, ranked by the merged piece's id (sentencepiece
  BPE ids are in score order; ties by the left, then the right piece's id); ``byte_fallback``
  and the unknown piece as in the model;
- normalizer: the model's precompiled charsmap when it has one, the removal of extra
  whitespace when the model asks for it, the dummy prefix (``add_dummy_prefix``) and
  space -> U+2581 (``Metaspace`` instead when user-defined pieces would split the text);
  decoder: U+2581 -> space, byte fallback, fuse (and strip the dummy prefix);
- added tokens: control and unknown pieces as special tokens, user-defined pieces (Gemma's
  ``<start_of_turn>``, ...) as plain added tokens; post-processor: bos before the text when
  the model has a bos.

The result is checked before it is written: every NORMAL and USER_DEFINED piece's text and a
set of probe strings must encode to the same ids as sentencepiece and decode to the same text.
When the model is not BPE, or the check fails, nothing is written and the reason is returned.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from megatron_csd.conversion.sentencepiece_proto import (
    CONTROL, NORMAL, UNKNOWN, USER_DEFINED, read_sentencepiece_model)

_SPACE = "\u2581"
PROBE_TEXTS = (
    "Hello world", " leading space", "two  spaces and\ttab", "trailing space ", "line\nbreak\n\n",
    "digits 1234567890 and 3.14", "Ünïcödé naïve café", "日本語のテキスト", "emoji 🙂👍", "x" * 40,
    "What is the capital of France?\n\n### Response:\nParis.",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "a<b>c</b>", "",
)


def build_tokenizer_json(model_file: str | Path):
    """(tokenizers.Tokenizer, special token strings) for a BPE tokenizer.model, or (None, why)."""
    import sentencepiece
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    proto = Path(model_file).read_bytes()
    model = read_sentencepiece_model(proto)
    if model.model_type != "bpe":
        return None, f"the sentencepiece model is {model.model_type}, only bpe is converted"
    if not model.escape_whitespaces:
        return None, "the sentencepiece model does not escape whitespace"
    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    pieces = model.pieces
    vocab = {p.piece: index for index, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == NORMAL}
    merges = []
    for index, p in enumerate(pieces):
        if p.type != NORMAL:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in normal and right in normal:
                merges.append((index, vocab[left], vocab[right], left, right))
    merges.sort()
    unk = pieces[sp.unk_id()].piece if sp.unk_id() >= 0 else None
    tok = Tokenizer(BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                        fuse_unk=True, byte_fallback=model.byte_fallback))
    norm = []
    if model.precompiled_charsmap:
        norm.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ +| +$"), "")]
    user_defined = [p for p in pieces if p.type == USER_DEFINED]
    if model.add_dummy_prefix and user_defined:
        # Added tokens split the text before normalizing, so a Prepend normalizer would put a
        # dummy prefix on every segment; Metaspace puts it on the first one only (but skips
        # text that already starts with a space: the check below then refuses the result).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
    else:
        norm += [normalizers.Prepend(_SPACE)] if model.add_dummy_prefix else []
        norm.append(normalizers.Replace(" ", _SPACE))
    if norm:
        tok.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in user_defined])
    special = {"unk_token": unk}
    for role, token_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
        special[role] = pieces[token_id].piece if token_id >= 0 else None
    if special["bos_token"] is not None:
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    texts = [p.piece.replace(_SPACE, " ") for p in pieces if p.type in (NORMAL, USER_DEFINED)]
    mismatch = _first_mismatch(sp, tok, texts + list(PROBE_TEXTS),
                               skip_ids={i for i, p in enumerate(pieces) if p.type in (CONTROL, UNKNOWN)})
    if mismatch is not None:
        return None, f"the converted tokenizer differs from sentencepiece on {mismatch!r}"
    return tok, special


def _first_mismatch(sp, tok, texts: Sequence[str], skip_ids: set) -> Optional[str]:
    expected = sp.encode(list(texts))
    got = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    for text, want, have in zip(texts, expected, got):
        if want != have:
            return text
        kept = [i for i in want if i not in skip_ids]
        if sp.decode(kept) != tok.decode(kept, skip_special_tokens=False):
            return text
    return None


def write_tokenizer_json(model_file: str | Path, out_dir: str | Path) -> Optional[str]:
    """Write tokenizer.json (and tokenizer_config.json if absent) into out_dir; None on success,
    else the reason nothing was written."""
    tok, special = build_tokenizer_json(model_file)
    if tok is None:
        return special
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    config_file = out_dir / "tokenizer_config.json"
    if not config_file.exists():
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update({role: token for role, token in special.items() if token is not None})
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    return None
