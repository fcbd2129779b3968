#!/usr/bin/env bash
# Distil a Gemma teacher into a Gemma student with megatron_csd (a torchrun wrapper; the launcher
# is `${PYTHON} -m torch.distributed.run`, so PYTHON=/path/to/venv/bin/python picks the interpreter).
#
#   bash examples/distill_gemma.sh                      # no GPU, no TEACHER: the embedded default
#   TEACHER=ckpt/gemma-7b-it STUDENT=ckpt/gemma-2b-it TRAIN_DATA=dolly/train.jsonl \
#   VALID_DATA=dolly/valid.jsonl TP=4 bash examples/distill_gemma.sh [--extra-trainer-flags ...]
#
# Every knob is an environment variable (defaults below); arguments after the script are passed
# to `python -m megatron_csd.training.cli` verbatim and win over the variables (see
# `python -m megatron_csd.training.cli --help` for all flags).
#
# The embedded default (no TEACHER on a machine without CUDA) is a complete, real distillation
# on 2 CPU cores (a few minutes; the measured time, with the machine and its load, is in the
# README's "The embedded default" section):
#   1. toy instruction data + a sentencepiece tokenizer (megatron_csd.data.toy), prepared once;
#   2. SFT of a tiny Gemma-architecture teacher (4 layers, hidden 128) on it (2 ranks, DP=2);
#   3. CSD distillation (TS weights, the paper's Gemma setting) of that teacher into a smaller
#      random-init Gemma student (2 layers, hidden 64) at TP=2 on gloo, printing the student's held-out response CE and
#      distillation loss before and after, and where the checkpoint and metrics went.
# Running it again re-uses the data and teacher stages that finished with the same settings
# (each stage's dir holds a .stage_complete marker with them) and distils into a new student
# dir (distill_run2, ...); it never deletes anything.
#
# The variables below are this script's defaults, meant for a real (GPU) run; they are passed to
# the trainer explicitly, so they win over the trainer's own `--help` defaults where those differ.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"

# ---- cluster / launcher --------------------------------------------------------------------
NNODES="${NNODES:-1}"                    # number of nodes
NODE_RANK="${NODE_RANK:-0}"              # this node's rank, 0..NNODES-1
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"  # rendezvous host (node 0)
MASTER_PORT="${MASTER_PORT:-}"           # rendezvous port (default: 29500, or a free one locally)
NPROC_PER_NODE="${NPROC_PER_NODE:-}"     # ranks per node (default: GPUs per node, or TP*PP on CPU)

# ---- models and data -----------------------------------------------------------------------
TEACHER="${TEACHER:-}"                   # teacher model-only checkpoint (tools/convert_hf_to_megatron.py)
STUDENT="${STUDENT:-}"                   # student checkpoint to start from ...
STUDENT_PRESET="${STUDENT_PRESET:-}"     # ... or a preset to initialise randomly (e.g. gemma-2b)
MODE="${MODE:-distill}"                  # distill | sft (sft: no TEACHER, CE on responses)
TRAIN_DATA="${TRAIN_DATA:-}"             # instruction JSONL (Dolly fields) or a prepared split dir
VALID_DATA="${VALID_DATA:-}"             # held-out JSONL or prepared split dir (optional)
TOKENIZER="${TOKENIZER:-${TEACHER}}"     # tokenizer.model / tokenizer.json or a dir holding one
TEMPLATE="${TEMPLATE:-}"                 # prompt template for raw JSONL: dolly | gemma-chat

# ---- parallelism and precision -------------------------------------------------------------
TP="${TP:-1}"                            # --tensor-model-parallel-size
PP="${PP:-1}"                            # --pipeline-model-parallel-size (DP = world / (TP*PP))
SP="${SP:-0}"                            # 1: sequence parallelism (TP > 1)
PRECISION="${PRECISION:-auto}"           # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
FP8_TEACHER="${FP8_TEACHER:-}"           # hybrid | e4m3: teacher layers in FP8 (GPU + transformer-engine)
DEVICE="${DEVICE:-auto}"                 # auto | cuda | cpu

# ---- objective -----------------------------------------------------------------------------
OBJECTIVE="${OBJECTIVE:-csd}"            # csd | fkl | rkl | jsd | tvd | skl | srkl | dld
CSD_WEIGHTS="${CSD_WEIGHTS:-SS}"         # SS TS ST US SU UU TT UT TU MM (csd only)
TEMPERATURE="${TEMPERATURE:-1.0}"
KD_RATIO="${KD_RATIO:-1.0}"              # loss = KD_RATIO * distill + (1 - KD_RATIO) * CE

# ---- optimisation --------------------------------------------------------------------------
MICRO_BATCH="${MICRO_BATCH:-1}"
GLOBAL_BATCH="${GLOBAL_BATCH:-8}"
SEQ_LENGTH="${SEQ_LENGTH:-512}"
PACKING="${PACKING:-auto}"               # auto: pack where supported (local layer spec, no on-policy) | 1: --packing | 0: --no-packing
TRAIN_ITERS="${TRAIN_ITERS:-1000}"
LR="${LR:-1e-5}"
MIN_LR="${MIN_LR:-0}"
LR_DECAY_STYLE="${LR_DECAY_STYLE:-cosine}"
WARMUP_ITERS="${WARMUP_ITERS:-0}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.01}"
CLIP_GRAD="${CLIP_GRAD:-1.0}"
SEED="${SEED:-1234}"

# ---- evaluation, checkpoints, logs ---------------------------------------------------------
EVAL_INTERVAL="${EVAL_INTERVAL:-100}"
EVAL_SAMPLES="${EVAL_SAMPLES:-0}"        # 0 = the whole validation set
SAVE_INTERVAL="${SAVE_INTERVAL:-500}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/distill_gemma}"
SAVE="${SAVE:-}"                         # default OUTPUT_DIR/checkpoints
LOAD="${LOAD:-}"                         # resume from a save dir (its `latest`) or an iter_* dir
LOG_INTERVAL="${LOG_INTERVAL:-10}"
TENSORBOARD="${TENSORBOARD:-0}"

# ---- embedded default (no TEACHER, no GPU) -------------------------------------------------
EMBEDDED_DIR="${EMBEDDED_DIR:-runs/embedded_default}"  # made by the script; re-runs add to it, never delete
EMBEDDED_TEACHER_ITERS="${EMBEDDED_TEACHER_ITERS:-200}"
EMBEDDED_STUDENT_ITERS="${EMBEDDED_STUDENT_ITERS:-160}"
EMBEDDED_NUM_TRAIN="${EMBEDDED_NUM_TRAIN:-4000}"
EMBEDDED_EVAL_SAMPLES="${EMBEDDED_EVAL_SAMPLES:-200}"

packing_flags() {  # the trainer flag for PACKING (auto: none, the trainer's default)
  case "${PACKING}" in
    auto) ;;
    1|true|on) echo "--packing" ;;
    0|false|off) echo "--no-packing" ;;
    *) echo "distill_gemma.sh: PACKING=${PACKING} is not auto, 1 or 0" >&2; return 2 ;;
  esac
}

has_cuda() { "${PYTHON}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
free_port() { "${PYTHON}" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

launch() {  # launch NPROC trainer-args...
  local nproc="$1"; shift
  local port="${MASTER_PORT}"
  if [[ -z "${port}" ]]; then
    if [[ "${NNODES}" == 1 ]]; then port="$(free_port)"; else port=29500; fi
  fi
  "${PYTHON}" -m torch.distributed.run --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --master-addr "${MASTER_ADDR}" \
    --master-port "${port}" --nproc-per-node "${nproc}" -m megatron_csd.training.cli "$@"
}

EMBEDDED_MARKER=".megatron_csd_embedded_default"
STAGE_MARKER=".stage_complete"  # written last in a stage's dir: the settings it finished with

prepare_embedded_dir() {  # new, empty, or made by this script earlier; nothing in it is deleted
  local work="$1"
  if [[ -e "${work}" && ! -f "${work}/${EMBEDDED_MARKER}" ]] \
     && [[ ! -d "${work}" || -n "$(ls -A "${work}")" ]]; then
    echo "distill_gemma.sh: EMBEDDED_DIR=${work} exists and was not made by this script" \
         "(no ${EMBEDDED_MARKER} in it); not using it. Choose another EMBEDDED_DIR." >&2
    exit 2
  fi
  mkdir -p "${work}"
  touch "${work}/${EMBEDDED_MARKER}"
}

data_outputs_ok() {
  local d="$1"
  [[ -f "${d}/tokenizer.model" && -f "${d}/train.jsonl" && -f "${d}/valid.jsonl" \
     && -f "${d}/prepared/prepare.json" && -d "${d}/prepared/train" && -d "${d}/prepared/valid" ]]
}
teacher_outputs_ok() {
  local d="$1"
  [[ -f "${d}/checkpoints/latest" ]] && [[ -f "${d}/checkpoints/$(cat "${d}/checkpoints/latest")/model_config.json" ]]
}

# pick_stage_dir BASE FINGERPRINT CHECK: prints "reuse DIR" for the first of BASE, BASE_run2, ...
# that finished with exactly FINGERPRINT and whose outputs pass CHECK, else "new DIR" for the
# first that does not exist. CHECK "none": never re-use. Existing dirs are never touched.
pick_stage_dir() {
  local base="$1" fingerprint="$2" check="$3" dir n
  for ((n = 1; n < 1000; n++)); do
    dir="${base}"
    (( n > 1 )) && dir="${base}_run${n}"
    if [[ ! -e "${dir}" ]]; then echo "new ${dir}"; return 0; fi
    if [[ "${check}" != none && -f "${dir}/${STAGE_MARKER}" ]] \
       && [[ "$(cat "${dir}/${STAGE_MARKER}")" == "${fingerprint}" ]] && "${check}" "${dir}"; then
      echo "reuse ${dir}"; return 0
    fi
  done
  echo "distill_gemma.sh: no free directory name after ${base}_run999" >&2
  exit 2
}

announce_stage() {  # announce_stage WHAT "reuse|new" DIR BASE
  if [[ "$2" == reuse ]]; then
    echo "== $1: re-using ${3} (finished earlier with the same settings)"
  elif [[ "$3" != "$4" ]]; then
    echo "== $1: writing ${3} (new directory; ${4} and the other earlier runs are kept as they are)"
  else
    echo "== $1: writing ${3}"
  fi
}

# embedded_data_and_teacher: the embedded default's first two stages (toy data, teacher SFT) in
# EMBEDDED_DIR, each re-used when it finished earlier with the same settings. Sets the globals
# EMBEDDED_DATA (data dir), EMBEDDED_TEACHER (the teacher's iter_* dir) and EMBEDDED_COMMON (the
# trainer flags every stage shares). examples/compare_objectives.sh sources this file for it.
embedded_data_and_teacher() {
  local work="${EMBEDDED_DIR}" code pick how data teacher_dir packing
  packing="$(packing_flags)"  # for every training stage, in its fingerprint (auto: no flag)
  echo "== working directory: ${work} (completed stages with the same settings are re-used; nothing is deleted)"
  prepare_embedded_dir "${work}"
  # The code a stage ran with: the commit plus a checksum of uncommitted changes to the package.
  code="$(git -C "${REPO_DIR}" rev-parse HEAD 2>/dev/null || echo unknown)"
  code="${code} + local changes $(git -C "${REPO_DIR}" diff HEAD -- megatron_csd tools 2>/dev/null | cksum | cut -d' ' -f1)"

  local data_fp="data: code ${code}; toy --num-train ${EMBEDDED_NUM_TRAIN} --num-valid 400; prepare --seq-length 80 --template dolly"
  pick="$(pick_stage_dir "${work}/data" "${data_fp}" data_outputs_ok)"
  how="${pick%% *}" data="${pick#* }"
  announce_stage "data" "${how}" "${data}" "${work}/data"
  if [[ "${how}" == new ]]; then
    "${PYTHON}" -m megatron_csd.data.toy --out "${data}" --num-train "${EMBEDDED_NUM_TRAIN}" --num-valid 400
    "${PYTHON}" "${REPO_DIR}/tools/prepare_data.py" --input "${data}/train.jsonl" \
      --valid-input "${data}/valid.jsonl" --tokenizer "${data}/tokenizer.model" \
      --out "${data}/prepared" --seq-length 80 --template dolly --quiet
    printf '%s\n' "${data_fp}" > "${data}/${STAGE_MARKER}"
  fi
  local common=(--device cpu --precision fp32 --tokenizer "${data}/tokenizer.model" ${packing}
    --train-data "${data}/prepared/train" --valid-data "${data}/prepared/valid"
    --seq-length 80 --eval-samples "${EMBEDDED_EVAL_SAMPLES}" --log-interval 20 --clip-grad 1.0
    --weight-decay 0.01 --lr-decay-style cosine --seed 1234)

  local teacher_args=("${common[@]}" --mode sft --student-preset tiny-gemma
    --student-override num_layers=4 --student-override hidden_size=128
    --student-override ffn_hidden_size=512 --student-override num_attention_heads=4
    --student-override kv_channels=32 --student-override num_query_groups=1
    --micro-batch-size 16 --global-batch-size 32 --train-iters "${EMBEDDED_TEACHER_ITERS}"
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $((EMBEDDED_TEACHER_ITERS / 10)) --eval-interval 0)
  echo "== step 1/2: SFT of the tiny Gemma teacher (4 layers, hidden 128), DP=2"
  pick="$(pick_stage_dir "${work}/teacher_sft" "teacher: code ${code}; ${teacher_args[*]}" teacher_outputs_ok)"
  how="${pick%% *}" teacher_dir="${pick#* }"
  announce_stage "teacher" "${how}" "${teacher_dir}" "${work}/teacher_sft"
  if [[ "${how}" == new ]]; then
    launch 2 "${teacher_args[@]}" --output-dir "${teacher_dir}"
    printf '%s\n' "teacher: code ${code}; ${teacher_args[*]}" > "${teacher_dir}/${STAGE_MARKER}"
  fi
  EMBEDDED_DATA="${data}"
  EMBEDDED_TEACHER="${teacher_dir}/checkpoints/$(cat "${teacher_dir}/checkpoints/latest")"
  EMBEDDED_COMMON=("${common[@]}")
}

embedded_default() {
  local work="${EMBEDDED_DIR}" start=${SECONDS} pick student_dir
  echo "== megatron_csd embedded default: toy data -> SFT teacher -> CSD distillation at TP=2 (CPU, gloo)"
  embedded_data_and_teacher
  local teacher="${EMBEDDED_TEACHER}" common=("${EMBEDDED_COMMON[@]}")

  echo "== step 2/2: CSD (TS weights) distillation into a smaller Gemma student (2 layers, hidden 64), TP=2"
  pick="$(pick_stage_dir "${work}/distill" "" none)"
  student_dir="${pick#* }"
  announce_stage "student" new "${student_dir}" "${work}/distill"
  launch 2 "${common[@]}" --mode distill --teacher-checkpoint "${teacher}" \
    --student-preset tiny-gemma --tensor-model-parallel-size 2 \
    --objective csd --csd-weights TS --kd-ratio 1.0 \
    --micro-batch-size 16 --global-batch-size 32 --train-iters "${EMBEDDED_STUDENT_ITERS}" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $((EMBEDDED_STUDENT_ITERS / 10)) --eval-interval 40 \
    --output-dir "${student_dir}" "$@"
  echo "== embedded default finished in $((SECONDS - start)) s; teacher: ${teacher}; student run: ${student_dir}"
}

# Sourced (examples/compare_objectives.sh): the functions and defaults above only, no run.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

if [[ -z "${TEACHER}" && "${MODE}" == "distill" ]]; then
  if [[ $# -eq 0 ]] && ! has_cuda; then
    embedded_default
    exit 0
  fi
  echo "distill_gemma.sh: set TEACHER=<teacher checkpoint dir> (and STUDENT or STUDENT_PRESET, TRAIN_DATA);" >&2
  echo "  without TEACHER, no arguments and no GPU the script runs its embedded CPU default." >&2
  exit 2
fi

if [[ -z "${NPROC_PER_NODE}" ]]; then
  if has_cuda; then
    NPROC_PER_NODE="$("${PYTHON}" -c "import torch; print(torch.cuda.device_count())")"
  else
    NPROC_PER_NODE=$((TP * PP))
  fi
fi

args=(--mode "${MODE}" --device "${DEVICE}" --precision "${PRECISION}"
  --tensor-model-parallel-size "${TP}" --pipeline-model-parallel-size "${PP}"
  --objective "${OBJECTIVE}" --csd-weights "${CSD_WEIGHTS}" --temperature "${TEMPERATURE}"
  --kd-ratio "${KD_RATIO}" --micro-batch-size "${MICRO_BATCH}" --global-batch-size "${GLOBAL_BATCH}"
  --seq-length "${SEQ_LENGTH}" --train-iters "${TRAIN_ITERS}" --lr "${LR}" --min-lr "${MIN_LR}"
  --lr-decay-style "${LR_DECAY_STYLE}" --lr-warmup-iters "${WARMUP_ITERS}"
  --weight-decay "${WEIGHT_DECAY}" --clip-grad "${CLIP_GRAD}" --seed "${SEED}"
  --eval-interval "${EVAL_INTERVAL}" --eval-samples "${EVAL_SAMPLES}"
  --save-interval "${SAVE_INTERVAL}" --output-dir "${OUTPUT_DIR}" --log-interval "${LOG_INTERVAL}")
[[ "${SP}" == 1 ]] && args+=(--sequence-parallel)
packing="$(packing_flags)" || exit 2
[[ -n "${packing}" ]] && args+=("${packing}")
[[ "${TENSORBOARD}" == 1 ]] && args+=(--tensorboard)
[[ -n "${TEACHER}" ]] && args+=(--teacher-checkpoint "${TEACHER}")
[[ -n "${STUDENT}" ]] && args+=(--student-checkpoint "${STUDENT}")
[[ -n "${STUDENT_PRESET}" ]] && args+=(--student-preset "${STUDENT_PRESET}")
[[ -n "${TRAIN_DATA}" ]] && args+=(--train-data "${TRAIN_DATA}")
[[ -n "${VALID_DATA}" ]] && args+=(--valid-data "${VALID_DATA}")
[[ -n "${TOKENIZER}" ]] && args+=(--tokenizer "${TOKENIZER}")
[[ -n "${TEMPLATE}" ]] && args+=(--prompt-template "${TEMPLATE}")
[[ -n "${FP8_TEACHER}" ]] && args+=(--fp8-teacher "${FP8_TEACHER}")
[[ -n "${SAVE}" ]] && args+=(--save "${SAVE}")
[[ -n "${LOAD}" ]] && args+=(--load "${LOAD}")

launch "${NPROC_PER_NODE}" "${args[@]}" "$@"
