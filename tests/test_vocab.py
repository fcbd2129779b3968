"""Vocabulary padding and TP shard ranges (megatron_csd.parallel.vocab)."""
import pytest

from megatron_csd.parallel.vocab import padded_vocab_size, vocab_shard_range


@pytest.mark.parametrize("vocab,expected", [(1, 1024), (1024, 1024), (1025, 2048),
                                            (50257, 51200), (256000, 256000), (32000, 32768)])
def test_padded_vocab_size_rounds_up_to_multiple(vocab, expected):
    assert padded_vocab_size(vocab) == expected


def test_padded_vocab_size_serves_every_tp_up_to_8():
    for vocab in (7, 300, 50257, 151936):
        padded = padded_vocab_size(vocab)
        assert padded >= vocab and all(padded % tp == 0 for tp in (1, 2, 4, 8))


def test_padded_vocab_size_custom_multiple():
    assert padded_vocab_size(300, multiple=128) == 384


@pytest.mark.parametrize("bad", [0, -5])
def test_padded_vocab_size_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        padded_vocab_size(bad)
    with pytest.raises(ValueError, match="multiple"):
        padded_vocab_size(10, multiple=bad)


def test_padded_vocab_size_rejects_non_int():
    with pytest.raises(TypeError, match="vocab_size"):
        padded_vocab_size(10.0)


def test_vocab_shard_range_tiles_the_vocabulary():
    for tp in (1, 2, 4, 8):
        ranges = [vocab_shard_range(2048, r, tp) for r in range(tp)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 2048
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert len({end - start for start, end in ranges}) == 1


def test_vocab_shard_range_matches_megatron():
    from megatron.core.tensor_parallel.utils import VocabUtility
    for tp in (1, 2, 4):
        for rank in range(tp):
            assert vocab_shard_range(1024, rank, tp) == tuple(
                VocabUtility.vocab_range_from_global_vocab_size(1024, rank, tp))


def test_vocab_shard_range_rejects_bad_input():
    with pytest.raises(ValueError, match="not divisible"):
        vocab_shard_range(1000, 0, 3)
    with pytest.raises(ValueError, match="tp_rank"):
        vocab_shard_range(1024, 2, 2)
    with pytest.raises(ValueError, match="tp_rank"):
        vocab_shard_range(1024, -1, 2)
