"""Evaluation of a Megatron model on instruction test sets: sampled answers over several seeds
scored with ROUGE-L, exact match, length and diversity (distinct-n, self-BLEU), plus the
teacher-forced response loss of the references; at any TP / PP / DP.

    python -m megatron_csd.evaluation --load CKPT --test-file dolly=dolly_test.jsonl --output-dir OUT

    from megatron_csd.evaluation import EvalSettings, TestFile, evaluate
    result = evaluate(model, [TestFile("dolly", path)], tokenizer, EvalSettings(), ctx, vocab_size=V)
"""
from megatron_csd.evaluation.diversity import distinct_n, self_bleu, sentence_bleu
from megatron_csd.evaluation.report import check_output_dir, format_table, write_results
from megatron_csd.evaluation.runner import EvaluationResult, FileResult, evaluate, request_seed
from megatron_csd.evaluation.settings import PAPER_SEEDS, EvalSettings, TestFile
from megatron_csd.evaluation.summary import METRIC_NAMES, average_metrics, file_metrics, mean_std
from megatron_csd.evaluation.text_metrics import (exact_match, mean_exact_match, mean_rouge_l,
                                                  normalize_answer, rouge_l)

__all__ = [
    "EvalSettings", "EvaluationResult", "FileResult", "METRIC_NAMES", "PAPER_SEEDS", "TestFile",
    "average_metrics", "check_output_dir", "distinct_n", "evaluate", "exact_match", "file_metrics",
    "format_table", "mean_exact_match", "mean_rouge_l", "mean_std", "normalize_answer",
    "request_seed", "rouge_l", "self_bleu", "sentence_bleu", "write_results",
]
