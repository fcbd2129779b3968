"""Checkpoint manifests (issue 8, item 5), on files only: sizes and CRC-32 catch damage.

The CRC is checked against ``zlib.crc32`` of the whole file read at once (an independent
reference for the streamed, block-wise computation).
"""
from __future__ import annotations

import json
import os
import zlib

import pytest

from megatron_csd.models.manifest import (BLOCK_BYTES, MANIFEST_FILE, CheckpointDamagedError,
                                          file_crc32, verify_manifest, write_manifest)


def _checkpoint(root) -> str:
    """A folder with a multi-block shard, a small file and a nested one."""
    directory = root / "iter_0000002"
    (directory / "model").mkdir(parents=True)
    (directory / "model" / "__0_0.distcp").write_bytes(os.urandom(BLOCK_BYTES + 100_000))
    (directory / "trainer_state.json").write_text('{"iteration": 2}')
    (directory / "optimizer").mkdir()
    (directory / "optimizer" / "__0_0.distcp").write_bytes(os.urandom(50_000))
    write_manifest(directory)
    return str(directory)


def test_streamed_crc_matches_a_whole_file_crc_and_every_file_is_listed(tmp_path):
    directory = _checkpoint(tmp_path)
    shard = os.path.join(directory, "model", "__0_0.distcp")
    with open(shard, "rb") as handle:
        assert file_crc32(shard) == f"{zlib.crc32(handle.read()):08x}"
    with open(os.path.join(directory, MANIFEST_FILE)) as handle:
        manifest = json.load(handle)
    assert sorted(manifest["files"]) == ["model/__0_0.distcp", "optimizer/__0_0.distcp",
                                         "trainer_state.json"]
    assert manifest["files"]["model/__0_0.distcp"]["size"] == BLOCK_BYTES + 100_000
    assert verify_manifest(directory) is None


def _zero_middle(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\0" * 8192)
    assert os.path.getsize(path) == size


def test_zeroed_8kib_in_the_middle_is_a_clear_error(tmp_path):
    directory = _checkpoint(tmp_path)
    shard = os.path.join(directory, "model", "__0_0.distcp")
    _zero_middle(shard)
    with pytest.raises(CheckpointDamagedError) as info:
        verify_manifest(directory)
    message = str(info.value)
    assert shard in message and "changed since it was saved" in message
    assert "earlier iter_*" in message and "--no-verify-checkpoint" in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_truncated_or_missing_file_is_a_clear_error(tmp_path, damage):
    directory = _checkpoint(tmp_path)
    shard = os.path.join(directory, "optimizer", "__0_0.distcp")
    if damage == "truncated":
        os.truncate(shard, 1000)
    else:
        os.remove(shard)
    with pytest.raises(CheckpointDamagedError, match=f"{shard} is {damage}"):
        verify_manifest(directory)
    assert verify_manifest(directory, skip=("optimizer/",)) is None  # a model-only load


def test_no_manifest_is_a_notice_and_foreign_files_are_ignored(tmp_path):
    directory = _checkpoint(tmp_path)
    with open(os.path.join(directory, "notes.txt"), "w") as handle:
        handle.write("added after the save")
    assert verify_manifest(directory) is None
    os.remove(os.path.join(directory, MANIFEST_FILE))
    notice = verify_manifest(directory)
    assert "no manifest.json" in notice and "without verification" in notice


def test_shares_split_the_checksums(tmp_path):
    directory = _checkpoint(tmp_path)
    _zero_middle(os.path.join(directory, "model", "__0_0.distcp"))
    outcomes = []
    for index in (0, 1):
        try:
            outcomes.append(verify_manifest(directory, share=(index, 2)))
        except CheckpointDamagedError:
            outcomes.append("error")
    assert outcomes == ["error", None]  # the largest file is in share 0 only


def _verify_on_ranks(rank, world_size, directory, out_dir):
    from megatron_csd.models.manifest import verify_checkpoint

    try:
        verify_checkpoint(directory)
        outcome = "ok"
    except CheckpointDamagedError as err:
        outcome = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as handle:
        handle.write(outcome)


@pytest.mark.slow
def test_every_rank_raises_the_error_one_rank_found(tmp_path):
    from tests.spawn import run_distributed

    directory = _checkpoint(tmp_path)
    shard = os.path.join(directory, "model", "__0_0.distcp")  # checksummed by rank 0 only
    _zero_middle(shard)
    run_distributed(_verify_on_ranks, 2, directory, str(tmp_path), timeout=120)
    texts = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert texts[0] == texts[1] and shard in texts[0] and "changed since it was saved" in texts[0]
