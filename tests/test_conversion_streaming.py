"""Streaming conversion: a synthetic >= 1 GiB HF checkpoint converts with peak RSS below half
its size (the converter never holds the whole model), and the written tensors are right."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_csd.conversion.dist_reader import read_regions, read_tensor_metadata
from megatron_csd.conversion.mapping import qkv_hf_to_megatron

REPO = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN, FFN, HEADS, GROUPS, VOCAB = 48, 1024, 4096, 16, 4, 32000
HEAD_DIM = HIDDEN // HEADS


_BASE_ROWS = torch.randn(509, max(HIDDEN, FFN), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def _pattern(shape, salt: int) -> torch.Tensor:
    """Cheap bf16 contents with distinct rows per tensor (rows gathered from a small random
    block), so a layout mistake in the converter shows in the spot checks."""
    if len(shape) == 1:
        return _BASE_ROWS[salt % 509, :shape[0]].clone()
    rows = (torch.arange(shape[0]) * 7 + salt * 131) % 509
    return _BASE_ROWS[rows, :shape[1]].contiguous()


def _write_synthetic_llama(directory: Path) -> int:
    from safetensors.torch import save_file

    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=HIDDEN,
                  intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=GROUPS, vocab_size=VOCAB, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                  torch_dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,),
                       p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.k_proj.weight": (GROUPS * HEAD_DIM, HIDDEN),
                       p + "self_attn.v_proj.weight": (GROUPS * HEAD_DIM, HIDDEN),
                       p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, FFN)})
    names = list(shapes)
    num_files = 4
    weight_map, total = {}, 0
    for index in range(num_files):
        file_name = f"model-{index + 1:05d}-of-{num_files:05d}.safetensors"
        part = {n: _pattern(shapes[n], names.index(n)) for n in names[index::num_files]}
        save_file(part, str(directory / file_name))
        total += sum(t.nbytes for t in part.values())
        weight_map.update({n: file_name for n in part})
        del part
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for VmHWM")
def test_streaming_conversion_peak_rss_below_half_the_checkpoint(tmp_path):
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "megatron"
    hf_dir.mkdir()
    checkpoint_bytes = _write_synthetic_llama(hf_dir)
    assert checkpoint_bytes >= 1024 ** 3
    # Run the CLI in a fresh interpreter and read its own high-water mark (VmHWM) at the end.
    # getrusage/wait4 maxrss would also count the forked image of this (large) pytest process
    # from before exec; VmHWM belongs to the post-exec address space only.
    runner = ("import runpy, sys\n"
              "sys.argv = sys.argv[1:]\n"
              "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "except SystemExit as exit_:\n    code = exit_.code\n"
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
              "print('PEAK_KIB', hwm.split()[1])\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", runner, str(REPO / "tools/convert_hf_to_megatron.py"),
                             "--hf-dir", str(hf_dir), "--out", str(out_dir), "--tp", "4"],
                            env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    peak_rss = int(result.stdout.split("PEAK_KIB")[1].split()[0]) * 1024
    print(f"checkpoint {checkpoint_bytes / 2**30:.2f} GiB, converter peak RSS {peak_rss / 2**20:.0f} MiB")
    assert peak_rss < checkpoint_bytes / 2

    # Spot-check the written tensors against the HF sources (padding, QKV interleave, layers).
    stored = read_tensor_metadata(out_dir / "model")
    assert stored["embedding.word_embeddings.weight"] == ((32768, HIDDEN), torch.bfloat16)
    layer = LAYERS - 3
    got = read_regions(out_dir / "model", {
        "decoder.layers.self_attention.linear_qkv.weight":
            ((layer, 0, 0), (1, (HEADS + 2 * GROUPS) * HEAD_DIM, HIDDEN), torch.bfloat16),
        "output_layer.weight": ((VOCAB - 8, 0), (16, HIDDEN), torch.bfloat16)})
    from safetensors import safe_open

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def hf(name):
        with safe_open(str(hf_dir / index[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    p = f"model.layers.{layer}.self_attn."
    expected_qkv = qkv_hf_to_megatron(hf(p + "q_proj.weight"), hf(p + "k_proj.weight"),
                                      hf(p + "v_proj.weight"), heads=HEADS, groups=GROUPS)
    assert torch.equal(got["decoder.layers.self_attention.linear_qkv.weight"][0], expected_qkv)
    head = got["output_layer.weight"]
    assert torch.equal(head[:8], hf("lm_head.weight")[-8:]) and not head[8:].any()
