#!/usr/bin/env bash
# Evaluate the embedded default's teacher and distilled student (bash examples/distill_gemma.sh
# first) on the toy held-out set: 5 seeds, temperature 1, ROUGE-L / EM / loss / diversity.
#
#   EMBEDDED_DIR=runs/embedded_default NUM_SAMPLES=100 NPROC=2 bash examples/evaluate_embedded.sh
#
# Writes EMBEDDED_DIR/eval_<model>_<timestamp>/ (results.json, generations_toy.jsonl) and prints
# the machine load before each run (timings on a busy machine are not comparable).
set -euo pipefail
EMBEDDED_DIR="${EMBEDDED_DIR:-runs/embedded_default}"
NUM_SAMPLES="${NUM_SAMPLES:-100}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-32}"
NPROC="${NPROC:-2}"
PYTHON="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stamp="$(date +%Y%m%d_%H%M%S)"
for model in teacher_sft distill; do
  load="${EMBEDDED_DIR}/${model}/checkpoints"
  [[ -d "${load}" ]] || { echo "evaluate_embedded.sh: ${load} missing; run examples/distill_gemma.sh first" >&2; exit 2; }
  echo "== ${model}: $(uptime)"
  start=${SECONDS}
  OMP_NUM_THREADS=1 "${PYTHON}" -m torch.distributed.run --nproc-per-node "${NPROC}" --master-port $((29500 + RANDOM % 2000)) \
    "${here}/tools/evaluate.py" --load "${load}" --device cpu \
    --test-file "toy=${EMBEDDED_DIR}/data/valid.jsonl" --num-samples "${NUM_SAMPLES}" \
    --max-new-tokens "${MAX_NEW_TOKENS}" --batch-size 16 \
    --output-dir "${EMBEDDED_DIR}/eval_${model}_${stamp}"
  echo "== ${model}: $((SECONDS - start)) s wall"
done
