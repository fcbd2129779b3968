"""Per-request stop bookkeeping: eos, stop strings, max new tokens, the model's position limit."""
from __future__ import annotations

from megatron_csd.generation.params import GenerationResult, SamplingParams


def decode_text(tokenizer, ids: list[int]) -> str:
    """tokenizer.decode(ids), skipping ids the tokenizer does not have (only produced with
    ``allow_undecodable_ids``: they stay in completion_ids and are left out of the text)."""
    return tokenizer.decode([i for i in ids if i < tokenizer.vocab_size])


class StopState:
    """Collects one request's generated ids and decides when it is done.

    Order of checks after each new id: eos (the eos id is not kept), then stop strings (the
    decoded completion contains one: the ids are kept up to and including this one, the text
    is cut before the earliest stop string), then max_new_tokens / the model's last position
    ("length").
    """

    def __init__(self, params: SamplingParams, tokenizer, prompt_length: int, max_positions: int):
        self.params = params
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.max_positions = max_positions
        self.ids: list[int] = []
        self.reason = None
        self.text = None

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def num_generated(self) -> int:
        return len(self.ids)

    def add(self, token_id: int) -> None:
        if self.params.eos_id is not None and token_id == self.params.eos_id:
            self.reason = "eos"
            return
        self.ids.append(token_id)
        if self.params.stop_strings:
            text = decode_text(self.tokenizer, self.ids)
            cuts = [text.find(stop) for stop in self.params.stop_strings if stop in text]
            if cuts:
                self.reason, self.text = "stop", text[:min(cuts)]
                return
        if (len(self.ids) >= self.params.max_new_tokens
                or self.prompt_length + len(self.ids) >= self.max_positions):
            self.reason = "length"

    def finish_at_length(self) -> None:
        if self.reason is None:
            self.reason = "length"

    def result(self) -> GenerationResult:
        text = self.text
        if text is None and self.tokenizer is not None:
            text = decode_text(self.tokenizer, self.ids)
        return GenerationResult(list(self.ids), self.reason, text)
