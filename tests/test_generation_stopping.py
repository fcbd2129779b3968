"""Per-request stopping (eos, stop strings, max new tokens, the last position) and decoding of
completions that hold ids the tokenizer does not have."""
from megatron_csd.generation.params import SamplingParams
from megatron_csd.generation.stopping import StopState


class _Letters:
    """A fake tokenizer: id i < 26 decodes to the i-th lowercase letter; 26 ids."""

    vocab_size = 26

    def decode(self, ids):
        assert all(i < 26 for i in ids)
        return "".join(chr(ord("a") + i) for i in ids)


def _run(params, ids, *, tokenizer=None, prompt_length=3, max_positions=100):
    state = StopState(params, tokenizer, prompt_length, max_positions)
    for token in ids:
        if state.done:
            break
        state.add(token)
    state.finish_at_length()
    return state.result()


def test_eos_stops_and_is_not_kept():
    result = _run(SamplingParams(eos_id=4, max_new_tokens=10), [7, 8, 4, 9])
    assert (result.completion_ids, result.finish_reason, result.completion) == ([7, 8], "eos", None)


def test_stop_string_cuts_the_text_and_keeps_the_completing_token():
    params = SamplingParams(stop_strings=("cd", "zz"), max_new_tokens=10)
    result = _run(params, [0, 1, 2, 3, 4, 5], tokenizer=_Letters())
    assert result.completion_ids == [0, 1, 2, 3] and result.finish_reason == "stop"
    assert result.completion == "ab"


def test_max_new_tokens_and_last_position_end_with_length():
    assert _run(SamplingParams(max_new_tokens=3), [5, 6, 7, 8]).completion_ids == [5, 6, 7]
    result = _run(SamplingParams(max_new_tokens=30), list(range(20)), prompt_length=95)
    assert result.completion_ids == [0, 1, 2, 3, 4] and result.finish_reason == "length"


def test_undecodable_ids_stay_in_the_ids_and_out_of_the_text():
    result = _run(SamplingParams(max_new_tokens=4), [0, 30, 1, 27], tokenizer=_Letters())
    assert result.completion_ids == [0, 30, 1, 27] and result.completion == "ab"
