"""Packaging for megatron_csd: Concrete Score Distillation on Megatron-Core."""
from setuptools import find_packages, setup

setup(
    name="megatron_csd",
    version="0.1.0",
    description="Tensor-parallel LLM distillation (Concrete Score Distillation and baselines) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_csd", "megatron_csd.*"]),
    # Install torch first (README Quickstart): on a CPU-only machine from PyTorch's CPU index
    # (`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`), since the
    # public PyPI torch is a CUDA build on x86-64 Linux; on GPUs a CUDA build (e.g. the NGC
    # PyTorch container's). Any torch >= 2.4 satisfies this range.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "sentencepiece",
        "safetensors",
        "pyyaml",
        "psutil",  # dist_checkpointing's filesystem writer needs it
        "numpy",
        "rouge-score",  # megatron_csd.evaluation: ROUGE-L as MiniLLM / DistiLLM report it
        "sacrebleu",    # megatron_csd.evaluation: self-BLEU
        "matplotlib",   # megatron_csd.evaluation.compare_plot: the comparison's PNG
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.40", "tokenizers"],
        # tools/check_conversion.py and loading exported folders (model and tokenizer.json).
        "hf": ["transformers>=4.40", "tokenizers"],
        # Transformer Engine is GPU-only; never install it on a CPU machine (see README).
        "gpu": ["transformer-engine[pytorch]"],
        "tensorboard": ["tensorboard"],
    },
    package_data={"megatron_csd": ["py.typed"]},
)
