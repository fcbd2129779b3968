"""Converter outputs (issue 8, items 2 and 5): a manifest with every output, verified on export,
and ``--force`` replaces only what a converter wrote (a user's file in --out survives).

A tiny random GPT-2 (transformers, no download) is converted HF -> Megatron and exported back.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from megatron_csd.models.manifest import CheckpointDamagedError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("converted")
    config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    convert_hf_to_megatron(root / "hf", root / "mg")
    return root


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())["files"]


def test_force_replaces_only_what_the_converter_wrote(converted, tmp_path):
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    out = tmp_path / "mg"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    convert_hf_to_megatron(converted / "hf", out, force=True)
    assert (out / "notes.txt").read_text() == "user data"
    assert "notes.txt" not in _manifest(out) and "model_config.json" in _manifest(out)

    # Export in 3+ shards, then again in one: the stale shards (listed in the old manifest)
    # go, the user's file stays, the new manifest lists exactly the new files.
    hf = tmp_path / "hf"
    convert_megatron_to_hf(converted / "mg", hf, max_shard_bytes=60_000)
    shards = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(shards) >= 3
    (hf / "notes.txt").write_text("user data")
    convert_megatron_to_hf(converted / "mg", hf, force=True)
    files = sorted(p.relative_to(hf).as_posix() for p in hf.rglob("*") if p.is_file())
    assert files == sorted(list(_manifest(hf)) + ["manifest.json", "notes.txt"])
    assert (hf / "notes.txt").read_text() == "user data"
    assert sorted(p.name for p in hf.glob("*.safetensors")) == ["model.safetensors"]
    transformers.AutoModelForCausalLM.from_pretrained(hf)


def test_damaged_converted_checkpoint_is_refused_unless_opted_out(converted, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "mg"
    shutil.copytree(converted / "mg", damaged)
    shard = max((damaged / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    # Near the middle, but where the bytes are not zero already (the vocabulary padding is).
    offset = next(o for o in range(len(data) // 2, -1, -4096) if any(data[o:o + 8192]))
    with open(shard, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * 8192)
    assert shard.stat().st_size == len(data)
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    with pytest.raises(CheckpointDamagedError, match=f"{shard} changed since it was saved"):
        convert_megatron_to_hf(damaged, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export = _tool("convert_megatron_to_hf")
    assert export.main(["--load", str(damaged), "--out", str(tmp_path / "hf")]) == 2
    assert "--no-verify-checkpoint" in capsys.readouterr().err
    assert export.main(["--load", str(damaged), "--out", str(tmp_path / "hf"), "--no-verify-checkpoint"]) == 0
