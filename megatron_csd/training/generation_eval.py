"""Generation-based evaluation inside the trainer (``--eval-generate-*``).

Every ``eval_generate.interval`` iterations (when the iteration is a multiple of it) every rank
calls :func:`megatron_csd.evaluation.evaluate` on the student stage it trains, with the run's
tokenizer and template, on the first ``num_samples`` records of ``eval_generate.data``: one
sampled answer per record and seed (temperature 1, top-k 0, top-p 1, ``max_new_tokens``), the
teacher-forced loss of the references truncated to the training ``seq_length``. The logging
rank appends one record to metrics.jsonl (``split: "eval_generate"``, mirrored to TensorBoard
as ``eval_generate/<key>``)::

    {"iteration", "split", "num_prompts", "rougeL", "rougeL_std", "exact_match", "exact_match_std",
     "response_loss", "response_tokens", "gen_length", "gen_length_std", "distinct_1",
     "distinct_1_std", "distinct_2", "distinct_2_std", "self_bleu", "self_bleu_std", "eval_time_s"}

(means and population stds over the seeds; ``self_bleu`` is null with one seed) and writes the
answers to ``OUTPUT_DIR/eval_generate/generations_iter_NNNNNNN.jsonl`` (a new ``.N`` suffix when
that name exists, e.g. after a resume; nothing is overwritten). The CPU and CUDA RNG states are
saved and restored around the evaluation, so training continues exactly as without it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _template(config) -> str:
    from megatron_csd.data import read_metadata

    if config.data.template is not None:
        return config.data.template
    train = Path(config.data.train_path)
    if train.is_dir():
        return read_metadata(train).get("template", "dolly")
    return "dolly"


def _unique_path(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return candidate


def check_eval_generate(config) -> None:
    """ValueError for settings the hook cannot run with (checked when the trainer starts)."""
    cfg = config.eval_generate
    if not os.path.isfile(cfg.data):
        raise ValueError(f"eval_generate.data {cfg.data} is not a file (a held-out instruction JSONL)")
    from megatron_csd.evaluation import rouge_l, sentence_bleu

    rouge_l("a", "a"), sentence_bleu("a", ["a"])  # the scorers import now, not after N iterations
    if config.parallel.sequence_parallel:
        raise ValueError("--eval-generate-interval does not work with --sequence-parallel: the "
                         "generator decodes without sequence parallelism. Drop one of them, or "
                         "evaluate saved checkpoints with python -m megatron_csd.evaluation")


class GenerationEvalHook:
    def __init__(self, trainer):
        from megatron_csd.evaluation import EvalSettings, TestFile
        from megatron_csd.training.eval_generate_config import parse_seeds

        cfg = trainer.config.eval_generate
        self.trainer = trainer
        self.interval = cfg.interval
        self.generate_batch = None  # None: megatron_csd.generation (tests inject a stand-in)
        if not self.interval:
            return
        check_eval_generate(trainer.config)
        self.test_file = TestFile("eval_generate", cfg.data)
        self.settings = EvalSettings(seeds=parse_seeds(cfg.seeds), max_new_tokens=cfg.max_new_tokens,
                                     num_samples=cfg.num_samples, template=_template(trainer.config),
                                     max_seq_length=trainer.config.training.seq_length)
        self.out_dir = Path(trainer.config.logging.output_dir) / "eval_generate"

    def after_step(self, iteration: int) -> None:
        if self.interval and iteration % self.interval == 0:
            self.run(iteration)

    def run(self, iteration: int) -> dict:
        from megatron_csd.evaluation import evaluate
        from megatron_csd.evaluation.report import write_generations

        trainer = self.trainer
        start = time.perf_counter()
        cuda = [torch.cuda.current_device()] if trainer.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            result = evaluate(trainer.student, [self.test_file], trainer.data.tokenizer, self.settings,
                              trainer.ctx, vocab_size=trainer.plan.vocab_size,
                              generate_batch=self.generate_batch, show_progress=not trainer.config.logging.quiet)
        file_result = result.files[self.test_file.name]
        record = {"iteration": iteration, "split": "eval_generate", "num_prompts": file_result.num_prompts}
        for name, metric in file_result.metrics.items():
            record[name] = metric["mean"]
            if name == "response_loss":
                record["response_tokens"] = file_result.response_tokens
            else:
                record[f"{name}_std"] = metric["std"]
        record["eval_time_s"] = time.perf_counter() - start
        if trainer.ctx.is_logging_rank:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_generations(_unique_path(self.out_dir / f"generations_iter_{iteration:07d}.jsonl"),
                              file_result.generations)
        trainer.writer.log(record, console=_console(record))
        return record


def _console(record: dict) -> str:
    def value(name, fmt="{:.2f}"):
        v = record.get(name)
        return "-" if v is None else fmt.format(v)

    return (f"[eval-generate] iter {record['iteration']:>5}  ROUGE-L {value('rougeL')}"
            f"±{value('rougeL_std')}  EM {value('exact_match')}  response loss "
            f"{value('response_loss', '{:.4f}')}  gen len {value('gen_length', '{:.1f}')}  "
            f"distinct-2 {value('distinct_2')}  self-BLEU {value('self_bleu')}  "
            f"({record['eval_time_s']:.1f} s)")
