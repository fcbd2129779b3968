"""The trainer's console lines: one per logged iteration / validation, and the end-of-run summary.

Pure formatting of the metric records that also go to ``metrics.jsonl`` (no collectives).
"""
from __future__ import annotations


def valid_line(record: dict, objective: str) -> str:
    parts = [f"[valid] iter {record['iteration']:>5}", f"response CE {record['ce']:.4f}"]
    if "kd" in record:
        parts.append(f"distill ({objective}) {record['kd']:.4f}")
        parts.append(f"teacher CE {record['teacher_ce']:.4f}")
    return "  ".join(parts)


def train_line(record: dict, train_iters: int) -> str:
    parts = [f"iter {record['iteration']:>5}/{train_iters}",
             f"loss {record['loss']:.4f}", f"ce {record['ce']:.4f}"]
    if "kd" in record:
        parts.append(f"kd {record['kd']:.4f}")
    parts += [f"lr {record['lr']:.3e}", f"grad_norm {record['grad_norm']:.3f}",
              f"{record['tokens_per_s']:.0f} tok/s", f"{record['step_time_s'] * 1e3:.0f} ms"]
    if "teacher_forward_s" in record:
        parts.append(f"(teacher fwd {record['teacher_forward_s'] * 1e3:.0f} ms)")
    return "  ".join(parts)


def summary_lines(validation: list, *, mode: str, loss) -> list[str]:
    """Before -> after of the held-out metrics (nothing with fewer than two validations)."""
    if len(validation) < 2:
        return []
    first, last = validation[0], validation[-1]
    role = "sft model" if mode == "sft" else "student"  # sft trains e.g. a teacher
    lines = [f"[megatron_csd] held-out response CE ({role}): {first['ce']:.4f} "
             f"(iter {first['iteration']}) -> {last['ce']:.4f} (iter {last['iteration']})"]
    if "kd" in last:
        name = f"csd {loss.weights}" if loss.objective == "csd" else loss.objective
        lines.append(f"[megatron_csd] held-out distillation loss ({name}): {first['kd']:.4f} -> "
                     f"{last['kd']:.4f};  teacher's held-out response CE {last['teacher_ce']:.4f}")
    return lines
