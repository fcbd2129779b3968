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
# on 2 CPU cores in about 3 minutes:
#   1. toy instruction data + a sentencepiece tokenizer (megatron_csd.data.toy), prepared once;
#   2. SFT of a tiny Gemma-architecture teacher (4 layers, hidden 128) on it (2 ranks, DP=2);
#   3. CSD distillation (TS weights, the paper's Gemma setting) of that teacher into a smaller
#      random-init Gemma student (2 layers, hidden 64) at TP=2 on gloo, printing the student's held-out response CE and
#      distillation loss before and after, and where the checkpoint and metrics went.
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
EMBEDDED_DIR="${EMBEDDED_DIR:-runs/embedded_default}"  # made (and re-made) by the script only
EMBEDDED_TEACHER_ITERS="${EMBEDDED_TEACHER_ITERS:-200}"
EMBEDDED_STUDENT_ITERS="${EMBEDDED_STUDENT_ITERS:-160}"
EMBEDDED_NUM_TRAIN="${EMBEDDED_NUM_TRAIN:-4000}"
EMBEDDED_EVAL_SAMPLES="${EMBEDDED_EVAL_SAMPLES:-200}"

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

prepare_embedded_dir() {  # a fresh, empty work dir; deletes only a dir this script made earlier
  local work="$1"
  if [[ -e "${work}" ]]; then
    if [[ -f "${work}/${EMBEDDED_MARKER}" ]]; then
      rm -rf "${work}"
    elif [[ -d "${work}" && -z "$(ls -A "${work}")" ]]; then
      rmdir "${work}"
    else
      echo "distill_gemma.sh: EMBEDDED_DIR=${work} exists and was not made by this script" \
           "(no ${EMBEDDED_MARKER} in it); not deleting it. Remove it or choose another EMBEDDED_DIR." >&2
      exit 2
    fi
  fi
  mkdir -p "${work}"
  : > "${work}/${EMBEDDED_MARKER}"
}

embedded_default() {
  local work="${EMBEDDED_DIR}" start=${SECONDS}
  echo "== megatron_csd embedded default: toy data -> SFT teacher -> CSD distillation at TP=2 (CPU, gloo)"
  echo "== working directory: ${work}"
  prepare_embedded_dir "${work}"
  "${PYTHON}" -m megatron_csd.data.toy --out "${work}/data" --num-train "${EMBEDDED_NUM_TRAIN}" --num-valid 400
  "${PYTHON}" "${REPO_DIR}/tools/prepare_data.py" --input "${work}/data/train.jsonl" \
    --valid-input "${work}/data/valid.jsonl" --tokenizer "${work}/data/tokenizer.model" \
    --out "${work}/data/prepared" --seq-length 80 --template dolly --quiet
  local common=(--device cpu --precision fp32 --tokenizer "${work}/data/tokenizer.model"
    --train-data "${work}/data/prepared/train" --valid-data "${work}/data/prepared/valid"
    --seq-length 80 --eval-samples "${EMBEDDED_EVAL_SAMPLES}" --log-interval 20 --clip-grad 1.0
    --weight-decay 0.01 --lr-decay-style cosine --seed 1234)

  echo "== step 1/2: SFT of the tiny Gemma teacher (4 layers, hidden 128), DP=2"
  launch 2 "${common[@]}" --mode sft --student-preset tiny-gemma \
    --student-override num_layers=4 --student-override hidden_size=128 \
    --student-override ffn_hidden_size=512 --student-override num_attention_heads=4 \
    --student-override kv_channels=32 --student-override num_query_groups=1 \
    --micro-batch-size 16 --global-batch-size 32 --train-iters "${EMBEDDED_TEACHER_ITERS}" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $((EMBEDDED_TEACHER_ITERS / 10)) --eval-interval 0 \
    --output-dir "${work}/teacher_sft"
  local teacher
  teacher="${work}/teacher_sft/checkpoints/$(cat "${work}/teacher_sft/checkpoints/latest")"

  echo "== step 2/2: CSD (TS weights) distillation into a smaller Gemma student (2 layers, hidden 64), TP=2"
  launch 2 "${common[@]}" --mode distill --teacher-checkpoint "${teacher}" \
    --student-preset tiny-gemma --tensor-model-parallel-size 2 \
    --objective csd --csd-weights TS --kd-ratio 1.0 \
    --micro-batch-size 16 --global-batch-size 32 --train-iters "${EMBEDDED_STUDENT_ITERS}" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $((EMBEDDED_STUDENT_ITERS / 10)) --eval-interval 40 \
    --output-dir "${work}/distill" "$@"
  echo "== embedded default finished in $((SECONDS - start)) s; teacher: ${teacher}"
}

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
