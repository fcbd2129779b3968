"""HF <-> Megatron conversion on tiny random transformers models (no downloads).

Covers Gemma (MQA with head_dim != hidden/heads, and MHA), LLaMA (GQA, untied) and GPT-2
(tied, learned positions, vocabulary 300 padded to 1024):
- converted checkpoints give transformers' logits (fp32, |diff| <= 1e-5; observed ~1e-7) and
  per-token LM loss at TP x PP in {1,2} x {1,2} and TP 4, through Megatron's forward schedule;
- a checkpoint re-saved by a TP2 x PP2 Megatron model loads at TP1 and TP4 with the same logits,
  and exports back to HF bitwise (every tensor), loadable by AutoModelForCausalLM;
- bad inputs are clear errors and never leave a half-written output behind.
All multi-process checks run in one 4-process gloo job (tests/spawn.py) to keep CI time low.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.spawn import run_distributed

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
VOCAB, SEQ, BATCH = 300, 16, 2
LAYOUTS = ((2, 2), (1, 1), (2, 1), (1, 2), (4, 1))  # TP2 x PP2 first: it writes the re-saved checkpoints
RESHARD_LAYOUTS = ((1, 1), (4, 1))
LOGIT_ATOL = 1e-5  # the bar; observed max |diff| is ~1e-6 or below (printed with -s)


def _hf_configs():
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gemma_mqa": transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                              num_key_value_heads=1, head_dim=64, **common),
        "gemma_mha": transformers.GemmaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                              num_key_value_heads=4, head_dim=16, **common),
        "llama_gqa": transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                              num_key_value_heads=2, tie_word_embeddings=False,
                                              rope_theta=5000.0, **common),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=1, eos_token_id=2),
    }


def _randomize(model, gemma: bool):
    """Weights large enough that a layout bug shows; norms around 1 (Gemma stores w of 1 + w)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                param.copy_(noise * 0.2 if gemma else 1 + noise * 0.2)
            else:
                param.copy_(noise * (0.05 if name.endswith("bias") else 0.2))
    return model.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny HF checkpoints, their Megatron conversions and the transformers references."""
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("conversion")
    refs = {}
    generator = torch.Generator().manual_seed(0)
    for name, config in _hf_configs().items():
        # Eager attention: transformers' reference implementation, same op order as Megatron's
        # local attention (SDPA kernels differ by a few ulp).
        model = _randomize(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager"),
                           name.startswith("gemma"))
        model.save_pretrained(root / f"hf_{name}")
        (root / f"hf_{name}" / "tokenizer.json").write_text("{}")  # copied through untouched
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        with torch.no_grad():
            logits = model(tokens).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
        refs[name] = dict(tokens=tokens, labels=labels, logits=logits, loss=loss.reshape(BATCH, SEQ))
        convert_hf_to_megatron(root / f"hf_{name}", root / f"mg_{name}", tp=2, pp=2)
    torch.save(refs, root / "refs.pt")
    return root


def _layouts_body(rank, world_size, root):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_csd.conversion.verify import gather_vocab_parallel_logits, megatron_logits
    from megatron_csd.models import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, load_model_config, save_model
    from megatron_csd.parallel.cpu_mode import enable_cpu_mode, seed_model_parallel_rng
    from megatron_csd.parallel.vocab import mask_padded_vocab_logits

    root = Path(root)
    enable_cpu_mode()
    refs = torch.load(root / "refs.pt")
    results = {}
    for tp, pp in LAYOUTS:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 pipeline_model_parallel_size=pp)
        seed_model_parallel_rng(0)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        last = parallel_state.is_pipeline_last_stage()
        reporter = last and tp_rank == 0 and parallel_state.get_data_parallel_rank() == 0
        for name, ref in refs.items():
            sources = {"converted": root / f"mg_{name}"}
            if (tp, pp) in RESHARD_LAYOUTS:
                sources["resaved_tp2pp2"] = root / f"tp2pp2_{name}"
            if (tp, pp) == (2, 1) and name == "gemma_mqa":
                sources["repadded_2048"] = root / f"mg_{name}"
            if (tp, pp) == (2, 2):
                sources["sequence_parallel"] = root / f"mg_{name}"
            for source, directory in sources.items():
                cfg = load_model_config(directory)
                if source == "repadded_2048":  # a model padded wider than the checkpoint
                    cfg = cfg.replace(padded_vocab_size=2048)
                model = build_gpt_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                                        post_process=last, perform_initialization=False,
                                        sequence_parallel=source == "sequence_parallel")
                load_model(model, directory)
                model.eval()
                local = megatron_logits(model, ref["tokens"], gather_tp=False)
                if last:
                    full = gather_vocab_parallel_logits(local)
                    masked = mask_padded_vocab_logits(local, cfg.vocab_size, tp_rank=tp_rank, tp_size=tp)
                    loss = vocab_parallel_cross_entropy(masked.clone(), ref["labels"])
                    if reporter:
                        results[f"{name}/{source}/tp{tp}pp{pp}"] = dict(
                            logit_diff=float((full[..., :VOCAB] - ref["logits"]).abs().max()),
                            loss_diff=float((loss - ref["loss"]).abs().max()),
                            padded_logit_max=float(full[..., VOCAB:].abs().max()),
                            padded_width=full.shape[-1])
                if (tp, pp) == (2, 2) and source == "converted":
                    save_model(model, root / f"tp2pp2_{name}", cfg)
        parallel_state.destroy_model_parallel()
    if results:
        (root / f"results_rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def layout_results(workdir):
    run_distributed(_layouts_body, 4, str(workdir))
    results = {}
    for path in workdir.glob("results_rank*.json"):
        results.update(json.loads(path.read_text()))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma_mqa", "gemma_mha", "llama_gqa", "gpt2"])
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_converted_logits_and_loss_match_transformers(layout_results, name, tp, pp):
    result = layout_results[f"{name}/converted/tp{tp}pp{pp}"]
    print(name, tp, pp, result)
    assert result["logit_diff"] <= LOGIT_ATOL
    assert result["loss_diff"] <= LOGIT_ATOL
    assert result["padded_width"] == 1024 and result["padded_logit_max"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma_mqa", "gemma_mha", "llama_gqa", "gpt2"])
def test_sequence_parallel_tp2pp2_matches_transformers(layout_results, name):
    result = layout_results[f"{name}/sequence_parallel/tp2pp2"]
    assert result["logit_diff"] <= LOGIT_ATOL and result["loss_diff"] <= LOGIT_ATOL


@pytest.mark.slow
def test_checkpoint_loads_into_a_model_with_wider_vocab_padding(layout_results):
    result = layout_results["gemma_mqa/repadded_2048/tp2pp1"]
    assert result["padded_width"] == 2048 and result["padded_logit_max"] == 0.0
    assert result["logit_diff"] <= LOGIT_ATOL and result["loss_diff"] <= LOGIT_ATOL


def test_load_refuses_a_different_architecture():
    from megatron_csd.models import get_preset
    from megatron_csd.models.checkpoint import check_loadable

    saved = get_preset("tiny-llama")
    check_loadable(saved, saved.replace(padded_vocab_size=4096, hidden_dropout=0.1))
    with pytest.raises(ValueError, match="ffn_hidden_size: checkpoint 160 vs model 128"):
        check_loadable(saved, saved.replace(ffn_hidden_size=128))
    with pytest.raises(ValueError, match="vocab_size"):
        check_loadable(saved, saved.replace(vocab_size=301))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma_mqa", "llama_gqa", "gpt2"])
@pytest.mark.parametrize("tp,pp", RESHARD_LAYOUTS)
def test_tp2pp2_saved_checkpoint_loads_at_tp1_and_tp4(layout_results, name, tp, pp):
    resaved = layout_results[f"{name}/resaved_tp2pp2/tp{tp}pp{pp}"]
    converted = layout_results[f"{name}/converted/tp{tp}pp{pp}"]
    assert resaved["logit_diff"] <= LOGIT_ATOL
    assert resaved["logit_diff"] == converted["logit_diff"]  # identical weights, identical layout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma_mqa", "gemma_mha", "llama_gqa", "gpt2"])
def test_round_trip_through_tp2pp2_is_bitwise(workdir, layout_results, name, tmp_path):
    from safetensors.torch import load_file

    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    out = tmp_path / "hf"
    convert_megatron_to_hf(workdir / f"tp2pp2_{name}", out, tokenizer_dir=workdir / f"hf_{name}")
    original = load_file(workdir / f"hf_{name}" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    assert (out / "tokenizer.json").read_text() == "{}"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ref = torch.load(workdir / "refs.pt")[name]
    with torch.no_grad():
        assert torch.equal(reloaded(ref["tokens"]).logits, ref["logits"])


def _copy_hf(workdir, tmp_path, name="llama_gqa"):
    target = tmp_path / "hf"
    shutil.copytree(workdir / f"hf_{name}", target)
    return target


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


@pytest.mark.parametrize("case,match", [
    ("unsupported", "unsupported architecture model_type='bert'"),
    ("missing_tensor", "lacks 1 tensor.*mlp.up_proj"),
    ("unexpected_tensor", "does not use.*extra.weight"),
    ("shape_mismatch", "q_proj.weight.*shape"),
    ("tp_heads", "must divide num_attention_heads"),
    ("tp_groups", "must divide num_query_groups"),
    ("tp_groups_replicated", r"must be a multiple of num_query_groups \(3\).*sizes for this model: \[1, 3, 6, 12\]"),
    ("rope_scaling", "RoPE scaling"),
    ("no_weights", "no weights found"),
    ("no_config", "no config.json"),
])
def test_import_bad_inputs_are_clear_errors(workdir, tmp_path, case, match):
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    hf_dir = _copy_hf(workdir, tmp_path)
    tp = 1
    if case == "unsupported":
        _edit_config(hf_dir, model_type="bert")
    elif case == "missing_tensor":
        _edit_tensors(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "unexpected_tensor":
        _edit_tensors(hf_dir, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    elif case == "shape_mismatch":
        _edit_config(hf_dir, num_attention_heads=2, num_key_value_heads=2, head_dim=32)
        _edit_tensors(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 64)}))
    elif case == "tp_heads":
        tp = 3
    elif case == "tp_groups":
        _edit_config(hf_dir, num_attention_heads=6, num_key_value_heads=3, head_dim=16)
        tp = 2
    elif case == "tp_groups_replicated":  # 3 KV heads cannot be replicated evenly over 4 ranks
        _edit_config(hf_dir, num_attention_heads=12, num_key_value_heads=3, head_dim=16,
                     intermediate_size=192, vocab_size=3072)
        tp = 4
    elif case == "rope_scaling":
        _edit_config(hf_dir, rope_scaling={"rope_type": "linear", "factor": 2.0})
    elif case == "no_weights":
        (hf_dir / "model.safetensors").unlink()
    elif case == "no_config":
        (hf_dir / "config.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        convert_hf_to_megatron(hf_dir, out, tp=tp)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_import_refuses_non_empty_output_unless_forced(workdir, tmp_path):
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_csd.models.checkpoint import load_model_config

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty.*--force"):
        convert_hf_to_megatron(workdir / "hf_gpt2", out)
    assert (out / "keep.txt").exists()
    cfg = convert_hf_to_megatron(workdir / "hf_gpt2", out, force=True)
    assert (out / "keep.txt").read_text() == "user data" and load_model_config(out) == cfg


def test_import_failure_mid_write_leaves_no_checkpoint(workdir, tmp_path, monkeypatch):
    from megatron_csd.conversion import hf_reader
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    real_get, calls = hf_reader.HFCheckpointReader.get, []

    def failing_get(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(hf_reader.HFCheckpointReader, "get", failing_get)
    with pytest.raises(OSError, match="disk went away"):
        convert_hf_to_megatron(workdir / "hf_llama_gqa", tmp_path / "out")
    assert len(calls) == 5 and not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_import_reads_pytorch_bin_and_sharded_safetensors(workdir, tmp_path):
    from safetensors.torch import load_file, save_file

    from megatron_csd.conversion.dist_reader import read_regions, read_tensor_metadata
    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    tensors = load_file(workdir / "hf_gpt2" / "model.safetensors")
    bin_dir, sharded_dir = tmp_path / "bin", tmp_path / "sharded"
    for directory in (bin_dir, sharded_dir):
        directory.mkdir()
        shutil.copyfile(workdir / "hf_gpt2" / "config.json", directory / "config.json")
    torch.save(tensors, bin_dir / "pytorch_model.bin")
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[::2], names[1::2])):
        file_name = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded_dir / file_name))
        weight_map.update({n: file_name for n in part})
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reference_dir = workdir / "mg_gpt2" / "model"
    reference = read_tensor_metadata(reference_dir)

    def read_all(checkpoint):
        return read_regions(checkpoint, {key: ((0,) * len(shape), shape, dtype)
                                         for key, (shape, dtype) in reference.items()})

    expected = read_all(reference_dir)
    assert len(expected) > 10 and all(t.abs().max() > 0 for t in expected.values())
    for directory in (bin_dir, sharded_dir):
        convert_hf_to_megatron(directory, tmp_path / f"out_{directory.name}")
        converted = tmp_path / f"out_{directory.name}" / "model"
        assert read_tensor_metadata(converted) == reference
        for key, tensor in read_all(converted).items():
            assert torch.equal(tensor, expected[key]), (directory.name, key)


def test_export_bad_inputs_are_clear_errors(workdir, tmp_path):
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    with pytest.raises(ValueError, match="model_config.json is missing"):
        convert_megatron_to_hf(tmp_path, tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(workdir / "mg_gpt2", broken)
    (broken / "model" / "metadata.json").unlink()
    with pytest.raises(ValueError, match="no complete model checkpoint"):
        convert_megatron_to_hf(broken, tmp_path / "out")
    wrong = tmp_path / "wrong"
    shutil.copytree(workdir / "mg_gpt2", wrong)
    config = json.loads((wrong / "model_config.json").read_text())
    config["ffn_hidden_size"] = 128
    (wrong / "model_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_config.json is truncated"):  # the manifest sees the edit
        convert_megatron_to_hf(wrong, tmp_path / "out")
    with pytest.raises(ValueError, match="linear_fc1.*shape"):
        convert_megatron_to_hf(wrong, tmp_path / "out", verify=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_megatron_to_hf(workdir / "mg_gpt2", tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_export_tokenizer_dir_must_hold_a_tokenizer_and_its_side_files_are_copied(workdir, tmp_path):
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--tokenizer-dir .*missing.* is not a directory"):
        convert_megatron_to_hf(workdir / "mg_gpt2", out, tokenizer_dir=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")  # config alone is no tokenizer
    with pytest.raises(ValueError, match="holds no tokenizer: none of tokenizer.model, tokenizer.json"):
        convert_megatron_to_hf(workdir / "mg_gpt2", out, tokenizer_dir=empty)
    assert not out.exists()
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    side_files = {"tokenizer.json": '{"model": "bpe"}',
                  "tokenizer_config.json": '{"chat_template": "{{ messages }}"}',
                  "special_tokens_map.json": '{"eos_token": "<eos>"}',
                  "generation_config.json": '{"bos_token_id": 1, "eos_token_id": 2}'}
    for name, text in side_files.items():
        (tokenizer / name).write_text(text)
    convert_megatron_to_hf(workdir / "mg_gpt2", out, tokenizer_dir=tokenizer)
    for name, text in side_files.items():
        assert (out / name).read_text() == text, name
    assert not (out / "tokenizer.model").exists() and not (out / "hf_config.json").exists()


def test_converted_checkpoint_keeps_hf_config_and_export_restores_its_fields(workdir, tmp_path):
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    original = json.loads((workdir / "hf_llama_gqa" / "config.json").read_text())
    assert json.loads((workdir / "mg_llama_gqa" / "hf_config.json").read_text()) == original
    assert (workdir / "mg_llama_gqa" / "generation_config.json").is_file()
    exported = convert_megatron_to_hf(workdir / "mg_llama_gqa", tmp_path / "out")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert exported[key] == original[key], key
    assert (tmp_path / "out" / "generation_config.json").read_text() == \
        (workdir / "hf_llama_gqa" / "generation_config.json").read_text()


def test_exported_config_spells_rope_theta_for_transformers_4_and_5():
    from megatron_csd.conversion.hf_config import hf_config_to_model_config, model_config_to_hf_config

    config = _hf_configs()["llama_gqa"].to_dict()
    cfg = hf_config_to_model_config(config)
    assert cfg.rope_theta == 5000.0
    stale = dict(config, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    stale.pop("rope_theta", None)
    for original in (None, stale):
        out = model_config_to_hf_config(cfg.replace(rope_theta=5000.0), dtype="float32", original=original)
        assert out["rope_theta"] == 5000.0  # transformers 4.x reads this one
        assert out["rope_parameters"] == {"rope_type": "default", "rope_theta": 5000.0}  # 5.x
        reloaded = transformers.LlamaConfig.from_dict(out)
        assert reloaded.rope_parameters["rope_theta"] == 5000.0


@pytest.mark.parametrize("fields,match", [
    (dict(rope_theta=None), "field rope_theta must be a positive number, got None"),
    (dict(rope_theta="1e4"), "field rope_theta must be a positive number, got '1e4'"),
    (dict(rope_theta=0), "field rope_theta must be a positive number"),
    (dict(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": None}),
     "field rope_theta must be a positive number, got None"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": None}),
     "field rope_parameters.rope_theta must be a positive number, got None"),
])
def test_import_rejects_a_missing_or_bad_rope_theta(fields, match):
    from megatron_csd.conversion.hf_config import hf_config_to_model_config

    config = _hf_configs()["llama_gqa"].to_dict()
    config.pop("rope_theta", None)
    config.pop("rope_parameters", None)
    assert hf_config_to_model_config(config).rope_theta == 10000.0  # absent: the HF default
    with pytest.raises(ValueError, match=match):
        hf_config_to_model_config(dict(config, **fields))
    # A null top-level field next to a set rope_parameters value uses the latter.
    both = dict(config, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert hf_config_to_model_config(both).rope_theta == 500.0


def test_resolve_model_checkpoint_follows_latest_and_refuses_a_dangling_one(workdir, tmp_path):
    from megatron_csd.models.checkpoint import resolve_model_checkpoint

    assert resolve_model_checkpoint(workdir / "mg_gpt2") == workdir / "mg_gpt2"
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(ValueError, match="names 'iter_0000009', which is not a model checkpoint"):
        resolve_model_checkpoint(tmp_path)
    (tmp_path / "iter_0000009").symlink_to(workdir / "mg_gpt2")
    assert resolve_model_checkpoint(tmp_path) == tmp_path / "iter_0000009"


def test_cli_tools_check_conversion_and_report_errors(workdir):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    # A trainer-style save directory: `latest` names the iteration folder (as the exporter takes).
    save_dir = workdir / "save_dir"
    save_dir.mkdir()
    (save_dir / "iter_0000003").symlink_to(workdir / "mg_gemma_mqa")
    (save_dir / "latest").write_text("iter_0000003\n")
    check = subprocess.run([sys.executable, str(REPO / "tools/check_conversion.py"), "--hf-dir",
                            str(workdir / "hf_gemma_mqa"), "--megatron-dir", str(save_dir),
                            "--max-diff", "1e-5", "--max-kl", "1e-10"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout.strip().splitlines()[-2])
    assert report["max_abs_diff"] <= 1e-5 and report["mean_kl"] <= 1e-10
    bad = subprocess.run([sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf-dir",
                          str(workdir / "hf_gpt2"), "--out", str(workdir / "never"), "--tp", "3"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "error: tensor-parallel size 3 must divide" in bad.stderr
    assert "Traceback" not in bad.stderr and not (workdir / "never").exists()
