#!/usr/bin/env bash
# GPU smoke check of the trainer (one GPU): bf16 student + bf16 teacher, Megatron's distributed
# optimizer, CSD distillation with Gemma-2B-width layers (random init, fewer layers) on the toy
# data (kd_ratio 0.5: a random-init Gemma with tied, sqrt(hidden)-scaled embeddings predicts its
# own input token with a logit of about |e|^2 / std ~ 40, so teacher and student agree on a
# one-hot guess and the distillation term alone has ~0 gradient; CE moves them); checkpoint at iteration 10, then a fresh process resumes from it and the script compares
# iterations 11-20 of both runs; finally asks for an FP8 teacher to show the start-up check.
#
#   bash examples/gpu_check_distill.sh OUT_DIR
set -euo pipefail
OUT="${1:?usage: gpu_check_distill.sh OUT_DIR}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
WORK="${WORK:-/tmp/gpu_check}"
rm -rf "${WORK}" && mkdir -p "${WORK}" "${OUT}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "${OUT}/gpu.txt"
"${PYTHON}" -m megatron_csd.data.toy --out "${WORK}/data"
"${PYTHON}" "${REPO_DIR}/tools/prepare_data.py" --input "${WORK}/data/train.jsonl" \
  --valid-input "${WORK}/data/valid.jsonl" --tokenizer "${WORK}/data/tokenizer.model" \
  --out "${WORK}/data/prepared" --seq-length 80 --quiet

run() {  # run NAME args...
  local name="$1"; shift
  "${PYTHON}" -m torch.distributed.run --nproc-per-node 1 --master-port 29517 -m megatron_csd.training.cli \
    --device cuda --precision bf16 --use-distributed-optimizer true \
    --tokenizer "${WORK}/data/tokenizer.model" --train-data "${WORK}/data/prepared/train" \
    --valid-data "${WORK}/data/prepared/valid" --seq-length 80 --eval-samples 128 \
    --teacher-preset gemma-2b --teacher-override num_layers=6 \
    --student-preset gemma-2b --student-override num_layers=2 \
    --objective csd --csd-weights TS --kd-ratio 0.5 --micro-batch-size 16 --global-batch-size 32 \
    --lr "${LR:-1e-4}" --lr-warmup-iters 2 --train-iters 20 --log-interval 1 --save-interval 10 \
    --output-dir "${WORK}/${name}" "$@" 2>&1 | grep -v -i "warn" | tee "${OUT}/${name}.log"
}
run straight
if [[ "${SKIP_REPEAT:-0}" != 1 ]]; then  # same run again: GPU run-to-run noise baseline
  run repeat --save-interval 0 --save-final false
fi
run resumed --load "${WORK}/straight/checkpoints/iter_0000010"
"${PYTHON}" - "${WORK}" <<'EOF' | tee "${OUT}/resume_compare.txt"
import json, sys
work = sys.argv[1]
def train(name):
    return {r["iteration"]: r for r in map(json.loads, open(f"{work}/{name}/metrics.jsonl")) if r["split"] == "train"}
import os
a, b = train("straight"), train("resumed")
r = train("repeat") if os.path.exists(f"{work}/repeat/metrics.jsonl") else {}
print("iteration  straight  repeat(no save)  resumed-from-10")
for it in sorted(b):
    print(it, a[it]["loss"], r.get(it, {}).get("loss"), b[it]["loss"],
          "bitwise equal" if a[it]["loss"] == b[it]["loss"] else "DIFFERENT")
EOF
cp "${WORK}/straight/metrics.jsonl" "${OUT}/straight_metrics.jsonl"
if [[ "${SKIP_FP8:-0}" != 1 ]]; then
  set +e
  run fp8 --fp8-teacher hybrid --train-iters 1
  echo "fp8 run exit status: ${PIPESTATUS[0]}" | tee -a "${OUT}/fp8.log"
fi
