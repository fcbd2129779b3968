#!/usr/bin/env bash
# The project's own comparison of objectives on the embedded toy setup (CPU, gloo):
#
#   bash examples/compare_objectives.sh
#   SEEDS="1 2 3 4 5" METHODS="fkl csd_SS" STUDENT_ITERS=200 bash examples/compare_objectives.sh
#
# 1. toy data + the tiny Gemma teacher's SFT: the embedded default's stages (sourced from
#    examples/distill_gemma.sh, EMBEDDED_* variables), re-used when they finished earlier with
#    the same settings (their .stage_complete marker), so the teacher is trained once;
# 2. for every method and training seed, a fresh random-init student (tiny-gemma: 2 layers,
#    hidden 64) distilled from that teacher (DP=NPROC), each in its own new output dir;
# 3. every student and the teacher evaluated with `python -m megatron_csd.evaluation` on the
#    first EVAL_PROMPTS held-out toy prompts (EVAL_SEEDS sampling seeds, temperature 1);
# 4. `python -m megatron_csd.evaluation.compare`: mean ± std over training seeds of exact match,
#    ROUGE-L, diversity and response loss -> comparison.md, comparison.json, comparison.png.
#
# Methods (METHODS, space-separated): sft (CE on the data, no teacher), fkl, rkl, csd_SS, csd_TS,
# csd_US (off-policy) and csd_SS_lambda0.5 (CSD SS with --student-data-ratio 0.5, GKD-style
# on-policy). Output: COMPARE_DIR, or COMPARE_DIR_run2, _run3, ... when it exists (a re-run
# never touches earlier results). The script prints `uptime` at start and end and the wall time.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Unpacked teacher SFT and students unless PACKING says otherwise: every method then sees the same
# samples per step (on-policy runs cannot pack) and the README's published comparison stays
# reproducible with the teacher it was measured with.
PACKING="${PACKING:-0}"
# The embedded default's helpers and variables (launch, pick_stage_dir, embedded_data_and_teacher).
source "${REPO_DIR}/examples/distill_gemma.sh"

COMPARE_DIR="${COMPARE_DIR:-runs/compare_objectives}"
METHODS="${METHODS:-sft fkl rkl csd_SS csd_TS csd_US csd_SS_lambda0.5}"
SEEDS="${SEEDS:-1 2 3}"                   # training seeds (the student's init and data order)
STUDENT_ITERS="${STUDENT_ITERS:-120}"     # iterations per student (global batch 32)
NPROC="${NPROC:-2}"                       # ranks per run (DP)
EVAL_PROMPTS="${EVAL_PROMPTS:-50}"        # first N held-out prompts
EVAL_SEEDS="${EVAL_SEEDS:-10 20 30}"      # sampling seeds per evaluation
EVAL_MAX_NEW_TOKENS="${EVAL_MAX_NEW_TOKENS:-32}"

method_flags() {  # the trainer flags of one method
  case "$1" in
    sft) echo "--mode sft" ;;
    fkl|rkl) echo "--mode distill --objective $1" ;;
    csd_SS|csd_TS|csd_US) echo "--mode distill --objective csd --csd-weights ${1#csd_}" ;;
    csd_SS_lambda0.5) echo "--mode distill --objective csd --csd-weights SS --student-data-ratio 0.5" ;;
    *) echo "compare_objectives.sh: unknown method '$1' in METHODS; choose from: sft fkl rkl" \
            "csd_SS csd_TS csd_US csd_SS_lambda0.5" >&2; return 2 ;;
  esac
}

evaluate() {  # evaluate LOAD OUTPUT_DIR
  local port
  port="$(free_port)"
  OMP_NUM_THREADS=1 "${PYTHON}" -m torch.distributed.run --nproc-per-node "${NPROC}" --master-port "${port}" \
    -m megatron_csd.evaluation --load "$1" --device cpu --quiet \
    --test-file "toy=${EMBEDDED_DATA}/valid.jsonl" --num-samples "${EVAL_PROMPTS}" \
    --seeds ${EVAL_SEEDS} --max-new-tokens "${EVAL_MAX_NEW_TOKENS}" --batch-size 16 \
    --output-dir "$2"
}

main() {
  local start=${SECONDS} out pick method seed flags run_dir
  for method in ${METHODS}; do method_flags "${method}" > /dev/null; done  # fail before any work
  [[ -n "${SEEDS// /}" ]] || { echo "compare_objectives.sh: SEEDS is empty" >&2; exit 2; }
  echo "== compare_objectives: start $(date -u +%FT%TZ); load: $(uptime)"
  pick="$(pick_stage_dir "${COMPARE_DIR}" "" none)"
  out="${pick#* }"
  announce_stage "comparison" new "${out}" "${COMPARE_DIR}"
  mkdir -p "${out}"

  embedded_data_and_teacher
  echo "== teacher: ${EMBEDDED_TEACHER}"
  echo "== teacher ready ($((SECONDS - start)) s so far); evaluating it"
  evaluate "${EMBEDDED_TEACHER}" "${out}/eval/teacher"

  for method in ${METHODS}; do
    read -r -a flags <<< "$(method_flags "${method}")"
    [[ "${flags[1]}" == distill ]] && flags+=(--teacher-checkpoint "${EMBEDDED_TEACHER}" --kd-ratio 1.0)
    for seed in ${SEEDS}; do
      run_dir="${out}/students/${method}/seed${seed}"
      echo "== ${method}, training seed ${seed}: ${run_dir} ($((SECONDS - start)) s so far)"
      # --no-packing: every method sees the same samples per step (packing would be on for the
      # off-policy methods and off for the on-policy one); earlier results stay comparable.
      OMP_NUM_THREADS=1 launch "${NPROC}" "${EMBEDDED_COMMON[@]}" "${flags[@]}" --no-packing \
        --student-preset tiny-gemma --micro-batch-size 16 --global-batch-size 32 \
        --train-iters "${STUDENT_ITERS}" --lr 3e-3 --min-lr 3e-4 \
        --lr-warmup-iters $((STUDENT_ITERS / 10)) --eval-interval 0 --eval-samples 32 --seed "${seed}" \
        --output-dir "${run_dir}"
      echo "== ${method}, training seed ${seed}: trained ($((SECONDS - start)) s so far); evaluating"
      evaluate "${run_dir}/checkpoints" "${out}/eval/${method}/seed${seed}"
    done
  done

  "${PYTHON}" -m megatron_csd.evaluation.compare --run-dir "${out}" --methods ${METHODS} --seeds ${SEEDS} \
    --setting "teacher=${EMBEDDED_TEACHER}" --setting "student_iters=${STUDENT_ITERS}" \
    --setting "nproc=${NPROC}" --setting "eval_prompts=${EVAL_PROMPTS}" \
    --setting "eval_seeds=${EVAL_SEEDS}" --setting "eval_max_new_tokens=${EVAL_MAX_NEW_TOKENS}"
  echo "== compare_objectives: finished in $((SECONDS - start)) s; load: $(uptime)"
  echo "== results: ${out}/comparison.md ${out}/comparison.json ${out}/comparison.png"
}

main "$@"
