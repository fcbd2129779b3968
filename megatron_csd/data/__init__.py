"""Data: tokenizers, instruction JSONL -> prompt templates -> masked token samples, prepared
datasets, deterministic resumable data-parallel sampling, and the toy data of the embedded default.

    from megatron_csd.data import load_tokenizer, InstructionDataset, ResumableSampler, BatchIterator
"""
from megatron_csd.data.dataset import InstructionDataset, collate, read_metadata
from megatron_csd.data.packing import PackedDataset, PaddingReport, pack_bins
from megatron_csd.data.prepare import PrepareResult, prepare_dataset
from megatron_csd.data.records import (FieldMap, InstructionRecord, MalformedRecordError,
                                       read_records)
from megatron_csd.data.samples import (TokenizedSample, build_training_sample, encode_prompt,
                                       tokenize_records, truncate_sample)
from megatron_csd.data.sampler import (BatchIterator, ResumableSampler, eval_batches,
                                       num_eval_batches)
from megatron_csd.data.templates import TEMPLATE_NAMES, render
from megatron_csd.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BatchIterator", "FieldMap", "HFTokenizer", "InstructionDataset", "InstructionRecord",
    "MalformedRecordError", "PackedDataset", "PaddingReport", "PrepareResult", "ResumableSampler", "SentencePieceTokenizer",
    "TEMPLATE_NAMES", "TokenizedSample", "Tokenizer", "build_training_sample", "collate",
    "encode_prompt", "eval_batches", "load_tokenizer", "num_eval_batches", "pack_bins", "prepare_dataset",
    "read_metadata", "read_records", "render", "tokenize_records", "truncate_sample",
]
