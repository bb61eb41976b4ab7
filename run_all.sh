#!/usr/bin/env bash
# The whole pipeline, stage by stage, each stage a script that reads and writes files under
# runs/<dataset>/. Rerunning resumes: every stage skips or continues work that is done.
#
#   bash run_all.sh demo [--smoke]         built-in synthetic world, CPU (smoke: minutes, for CI)
#   bash run_all.sh market1501 --data-root DIR --pretrained SD15 --image-encoder CLIP --smpl DIR
#   bash run_all.sh dukemtmc   ...
#
# Options (or the environment variables in brackets):
#   --data-root DIR       Market-1501 / DukeMTMC-reID folder [DATA_ROOT]
#   --pretrained ID|DIR   Stable Diffusion 1.5 diffusers folder or hub id [PRETRAINED]
#   --image-encoder ID|DIR  CLIP image encoder (CLIPVisionModelWithProjection) [IMAGE_ENCODER]
#   --smpl DIR            per-image SMPL params of the training images (smpl/<split>.npz) [SMPL_DIR]
#   --seeds "0 1 2"       Re-ID seeds per table row [SEEDS]
#   --device cpu|cuda     [DEVICE]
#   --smoke               tiny sizes: checks that every stage runs end to end
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
DATASET=$1; shift
case "$DATASET" in demo|market1501|dukemtmc) ;; -h|--help) usage ;; *) echo "error: unknown data set '$DATASET' (demo, market1501 or dukemtmc)" >&2; exit 2 ;; esac
SMOKE=0
DATA_ROOT=${DATA_ROOT:-}; PRETRAINED=${PRETRAINED:-}; IMAGE_ENCODER=${IMAGE_ENCODER:-}; SMPL_DIR=${SMPL_DIR:-}
SEEDS=${SEEDS:-}; DEVICE=${DEVICE:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --data-root) DATA_ROOT=$2; shift ;;
    --pretrained) PRETRAINED=$2; shift ;;
    --image-encoder) IMAGE_ENCODER=$2; shift ;;
    --smpl) SMPL_DIR=$2; shift ;;
    --seeds) SEEDS=$2; shift ;;
    --device) DEVICE=$2; shift ;;
    -h|--help) usage ;;
    *) echo "error: unknown option '$1' (see bash run_all.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

# real data sets: check every input before spending hours on the first stage
if [ "$DATASET" != demo ]; then
  missing=0
  need() { if [ -z "$2" ] || [ ! -e "$2" ]; then echo "error: $1 '${2:-<not given>}' not found: $3" >&2; missing=1; fi; }
  need "data set (--data-root)" "$DATA_ROOT" "download $DATASET (research use only) and pass the folder holding bounding_box_train/"
  need "SMPL params (--smpl)" "$SMPL_DIR" "estimate them for the training images (issue: SMPL for real photos) or pass a folder of smpl/<split>.npz files"
  for v in PRETRAINED IMAGE_ENCODER; do
    if [ -z "${!v}" ]; then echo "error: --$(echo $v | tr A-Z_ a-z-) not given: a diffusers folder or hub id (SD-1.5: runwayml/stable-diffusion-v1-5; image encoder: lambdalabs/sd-image-variations-diffusers)" >&2; missing=1; fi
  done
  [ $missing = 0 ] || exit 2
fi

source ./setup.sh
set -euo pipefail
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$DATASET" = demo ] && echo 1 || echo 0)}

RUN=runs/$DATASET$([ $SMOKE = 1 ] && echo -smoke || true)
mkdir -p "$RUN/results"
TIMES=$RUN/results/stage_times.csv
[ -f "$TIMES" ] || echo "stage,seconds" > "$TIMES"
stage() {  # stage NAME SCRIPT ARGS...: run a stage script, time it, stop with its exit status
  local name=$1 script=$2; shift 2
  if [ ! -f "$script" ]; then echo "== $name: $script is not built yet; stopping here"; exit 0; fi
  echo "== $name: python $script $*"
  local t0=$SECONDS
  python "$script" "$@"
  echo "$name,$((SECONDS - t0))" >> "$TIMES"
}

if [ "$DATASET" = demo ]; then
  if [ $SMOKE = 1 ]; then
    WORLD_ARGS=(--smoke); GEN_STEPS=20; REID=(--arch resnet18 --height 64 --width 32 --P 8 --K 4 --iters 20)
    SEEDS=${SEEDS:-0}
  else
    WORLD_ARGS=(); GEN_STEPS=3000; REID=(--arch resnet18 --height 128 --width 64 --P 16 --K 4 --iters 1500)
    SEEDS=${SEEDS:-0 1 2}
  fi
  DATA_ROOT=$RUN/world
  stage world 01_render_smpl.py world --out "$DATA_ROOT" "${WORLD_ARGS[@]}"
  stage conditions 01_render_smpl.py conditions --data "$DATA_ROOT" --out "$RUN/conditions"
fi

# Re-ID baseline (I) and evaluation: the rows of Table 1 that need no generator
for seed in ${SEEDS:-0}; do
  stage "reid base seed $seed" 04_train_reid.py --data-root "$DATA_ROOT" --out "$RUN/reid/base_s$seed" --seed "$seed" \
    ${REID[@]+"${REID[@]}"} $([ "$DATASET" = demo ] && echo --no-size-check || true) ${DEVICE:+--device $DEVICE}
  stage "evaluate base seed $seed" 05_evaluate.py --model "$RUN/reid/base_s$seed/model.pt" --data-root "$DATA_ROOT" \
    --name "base_s${seed}_same" --results "$RUN/results" $([ "$DATASET" = demo ] && echo --no-size-check || true)
done
echo "done: results in $RUN/results/results.md, stage times in $TIMES"
