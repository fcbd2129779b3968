"""Train a small sentencepiece tokenizer locally, laid out like Gemma's.

Gemma's `tokenizer.model` is a sentencepiece BPE model with pad 0, eos 1, bos 2, unk 3, byte
fallback, split digits, no dummy prefix and no whitespace normalisation; its chat markers
`<start_of_turn>` / `<end_of_turn>` are user-defined pieces (encoded from plain text). The
tokenizer trained here copies those choices so the same code paths serve the real model and
the toy one. Training is deterministic (one thread, no sentence sampling).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

GEMMA_CHAT_SYMBOLS = ("<start_of_turn>", "<end_of_turn>")


def train_sentencepiece(texts: Iterable[str], out_file: str | os.PathLike, *, vocab_size: int = 1024,
                        user_defined_symbols: Iterable[str] = GEMMA_CHAT_SYMBOLS) -> Path:
    """Train a BPE model on `texts` and write it to `out_file` (e.g. DIR/tokenizer.model).

    `vocab_size` is an upper bound: a small corpus may support fewer pieces (the 256 byte
    pieces, 4 special and the user-defined symbols always exist, so it must exceed those).
    """
    import sentencepiece

    symbols = list(user_defined_symbols) + ["\n"]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no training text for the tokenizer")
    # every character of the corpus, the 256 byte pieces, 4 special pieces and the symbols
    num_characters = len(set("".join(texts)) - set("\n"))
    minimum = 4 + 256 + len(symbols) + num_characters
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is too small for this corpus: byte fallback, "
                         f"special, user-defined and character pieces need {minimum}")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=symbols, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0, max_sentence_length=1 << 16,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())
    return out_file
