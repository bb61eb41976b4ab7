#!/usr/bin/env bash
# The whole pipeline, stage by stage, each stage a script that reads and writes files under
# runs/<dataset>/. Rerunning resumes: every stage skips or continues work that is done.
#
#   bash run_all.sh demo [--tables] [--smoke]   built-in synthetic world, CPU
#   bash run_all.sh market1501 --data-root DIR [--stage1-data DIR]   GPUs
#   bash run_all.sh dukemtmc   ...
#
# Without --tables: Table 1 rows (I) no augmentation and (VI) Diff-ID, both with every seed.
# With --tables: all of Table 1 ((I)-(VI), and on the demo world an ORACLE row of ground-truth
# renders) and Table 2 ((VI) with fewer generated images); the demo run then also rewrites the
# results in docs/results.md, the README's headline rows and docs/demo/. A later --tables run reuses
# what the plain run made.
#
# Options (or the environment variables in brackets):
#   --tables              every row of Tables 1 and 2 (longer; it prints the expected time first)
#   --data-root DIR       Market-1501 / DukeMTMC-reID folder [DATA_ROOT]
#   --pretrained ID|DIR   Stable Diffusion 1.5 diffusers folder or hub id [PRETRAINED]
#                         (default stable-diffusion-v1-5/stable-diffusion-v1-5; the older id
#                         runwayml/stable-diffusion-v1-5 was deleted from the hub in 2024)
#   --image-encoder ID|DIR  CLIP image encoder (CLIPVisionModelWithProjection; a repo whose
#                         image_encoder/ holds it is found too) [IMAGE_ENCODER]
#                         (default lambdalabs/sd-image-variations-diffusers, as the paper)
#   --smpl DIR            per-image SMPL params of the training images (<split>.npz); default:
#                         estimated here with 01b_estimate_smpl.py (ViTPose + fit) [SMPL_DIR]
#   --vitpose ID|DIR      ViTPose checkpoint for that estimation [VITPOSE]
#   --stage1-data DIR     the paper's stage 1: video frames <video_id>/<frame>.jpg (e.g. UBC
#                         Fashion); their SMPL is estimated here too, or given with
#                         --stage1-smpl DIR (<video_id>.npz) [STAGE1_DATA, STAGE1_SMPL]
#   --pose-videos DIR     the paper's target poses: dance videos <video_id>/<frame>.jpg (e.g.
#                         Everybody Dance Now); their SMPL is estimated here, and the 20 poses
#                         farthest from the training photos' and from each other are the targets
#                         of rows (III), (VI) and Table 2 [POSE_VIDEOS]; without it (or
#                         --pose-bank FILE, an AMASS-style .npz [POSE_BANK]) procedural poses
#                         stand in for them
#   --pose-choice farthest|random  the 20 video poses: farthest from the training poses and each
#                         other (default), or at random as the paper samples them [POSE_CHOICE]
#   --smpl-model FILE     SMPL body model (.npz, or .pkl via tools/convert_smpl_pkl.py); default
#                         the open body assets/open_body.npz [SMPL_MODEL]
#   --stage1-steps N, --gen-steps N   generator steps of stage 1 and 2 (paper: 30000 each)
#   --reid-steps N        Re-ID optimiser steps (paper: 20000)
#   --mixing camstyle|pool  how generated images join the Re-ID batches: camstyle (default, chosen
#                         on the demo: docs/reid.md) or pool (the paper's plain pooling) [MIXING]
#   --added stated|totals   (VI)'s generated-image count: the paper's stated 45,500 (Market) /
#                         49,000 (Duke), or the 14,000 its totals imply [ADDED]
#   --seeds "0 1 2"       Re-ID seeds per table row [SEEDS]
#   --device cpu|cuda     [DEVICE]
#   --no-size-check       real data: skip the official image-count check (subsets)
#   --dry-run             print every stage's command, in order, with every path filled in; run nothing
#   --smoke               tiny sizes: checks that every stage runs end to end (CI runs it)
#   RUNS_DIR=DIR          write runs/<dataset>/ under DIR instead of ./runs
#   REID_JOBS=N           Re-ID runs at a time (CPU demo: 2, one thread each; else 1)
set -euo pipefail
cd "$(dirname "$0")"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit ${1:-2}; }
[ $# -ge 1 ] || usage
DATASET=$1; shift
INVOCATION="run_all.sh $DATASET $*"  # names this run's rows in stage_times.csv (a folder may see several)
case "$DATASET" in demo|market1501|dukemtmc) ;; -h|--help) usage 0 ;; *) echo "error: unknown data set '$DATASET' (demo, market1501 or dukemtmc)" >&2; exit 2 ;; esac
SMOKE=0; TABLES=0; DRY=0; SIZECHECK=1
DATA_ROOT=${DATA_ROOT:-}; SMPL_DIR=${SMPL_DIR:-}
PRETRAINED=${PRETRAINED:-stable-diffusion-v1-5/stable-diffusion-v1-5}
IMAGE_ENCODER=${IMAGE_ENCODER:-lambdalabs/sd-image-variations-diffusers}
VITPOSE=${VITPOSE:-usyd-community/vitpose-base-simple}; STAGE1_DATA=${STAGE1_DATA:-}; STAGE1_SMPL=${STAGE1_SMPL:-}
SEEDS=${SEEDS:-}; DEVICE=${DEVICE:-}; POSE_VIDEOS=${POSE_VIDEOS:-}; POSE_BANK=${POSE_BANK:-}
SMPL_MODEL=${SMPL_MODEL:-}; MIXING=${MIXING:-camstyle}; ADDED=${ADDED:-stated}; POSE_CHOICE=${POSE_CHOICE:-farthest}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --tables) TABLES=1 ;;
    --dry-run) DRY=1 ;;
    --no-size-check) SIZECHECK=0 ;;
    --data-root) DATA_ROOT=$2; shift ;;
    --pretrained) PRETRAINED=$2; shift ;;
    --image-encoder) IMAGE_ENCODER=$2; shift ;;
    --smpl) SMPL_DIR=$2; shift ;;
    --vitpose) VITPOSE=$2; shift ;;
    --stage1-data) STAGE1_DATA=$2; shift ;;
    --stage1-smpl) STAGE1_SMPL=$2; shift ;;
    --seeds) SEEDS=$2; shift ;;
    --pose-videos) POSE_VIDEOS=$2; shift ;;
    --pose-bank) POSE_BANK=$2; shift ;;
    --smpl-model) SMPL_MODEL=$2; shift ;;
    --stage1-steps) STAGE1_STEPS=$2; shift ;;
    --gen-steps) GEN_STEPS=$2; shift ;;
    --reid-steps) REID_STEPS=$2; shift ;;
    --mixing) MIXING=$2; shift ;;
    --added) ADDED=$2; shift ;;
    --pose-choice) POSE_CHOICE=$2; shift ;;
    --device) DEVICE=$2; shift ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown option '$1' (see bash run_all.sh --help)" >&2; exit 2 ;;
  esac
  shift
done

video_ids() {  # video_ids DIR: the <video_id>/ subfolders of DIR that hold .jpg/.png frames
  local d
  for d in "$1"/*/; do [ -d "$d" ] && ls "$d" | grep -qiE '\.(jpg|jpeg|png)$' && printf ' %s' "$(basename "$d")"; done
  true
}
# real data sets: check every input before spending hours on the first stage
VIDEOS=""
if [ "$DATASET" != demo ]; then
  missing=0
  need() { if [ -z "$2" ] || [ ! -e "$2" ]; then echo "error: $1 '${2:-<not given>}' not found: $3" >&2; missing=1; fi; }
  need "data set (--data-root)" "$DATA_ROOT" "download $DATASET (research use only) and pass the folder holding bounding_box_train/"
  [ -z "$SMPL_DIR" ] || need "SMPL params (--smpl)" "$SMPL_DIR" "leave --smpl out to estimate them here, or pass the --out folder of 01b_estimate_smpl.py"
  if [ -n "$STAGE1_DATA" ]; then
    need "stage-1 videos (--stage1-data)" "$STAGE1_DATA" "pass a folder of <video_id>/<frame>.jpg"
    if [ -d "$STAGE1_DATA" ]; then
      VIDEOS=$(video_ids "$STAGE1_DATA")
      [ -n "$VIDEOS" ] || { echo "error: stage-1 videos (--stage1-data) '$STAGE1_DATA' has no <video_id>/ folders with .jpg/.png frames" >&2; missing=1; }
    fi
    if [ -n "$STAGE1_SMPL" ]; then
      for v in $VIDEOS; do
        [ -f "$STAGE1_SMPL/$v.npz" ] || { echo "error: stage-1 SMPL params '$STAGE1_SMPL/$v.npz' not found: leave --stage1-smpl out to estimate them here" >&2; missing=1; break; }
      done
    fi
  fi
  case "$MIXING" in camstyle|pool) ;; *) echo "error: --mixing '$MIXING': use camstyle or pool" >&2; missing=1 ;; esac
  case "$ADDED" in stated|totals) ;; *) echo "error: --added '$ADDED': use stated or totals" >&2; missing=1 ;; esac
  case "$POSE_CHOICE" in farthest|random) ;; *) echo "error: --pose-choice '$POSE_CHOICE': use farthest or random" >&2; missing=1 ;; esac
  [ -z "$POSE_BANK" ] || need "pose bank (--pose-bank)" "$POSE_BANK" "pass an AMASS-style .npz (key poses, N x 72)"
  [ -z "$SMPL_MODEL" ] || need "SMPL model (--smpl-model)" "$SMPL_MODEL" "pass the .npz (tools/convert_smpl_pkl.py converts the official .pkl)"
  PVIDS=""
  if [ -n "$POSE_VIDEOS" ]; then
    need "dance videos (--pose-videos)" "$POSE_VIDEOS" "pass a folder of <video_id>/<frame>.jpg"
    if [ -d "$POSE_VIDEOS" ]; then
      PVIDS=$(video_ids "$POSE_VIDEOS")
      [ -n "$PVIDS" ] || { echo "error: dance videos (--pose-videos) '$POSE_VIDEOS' has no <video_id>/ folders with .jpg/.png frames" >&2; missing=1; }
    fi
  fi
  if [ $missing = 1 ] && [ $DRY = 0 ]; then exit 2; fi
  [ $missing = 0 ] || echo "(dry run: the commands below use the paths as given)" >&2
  [ -z "$STAGE1_DATA" ] || [ -n "$VIDEOS" ] || VIDEOS="VIDEO_ID..."  # dry run before the videos are there
  [ -z "$POSE_VIDEOS" ] || [ -n "$PVIDS" ] || PVIDS="VIDEO_ID..."
fi

if [ $DRY = 0 ]; then
  source ./setup.sh
  set -euo pipefail
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$DATASET" = demo ] && echo 1 || echo 0)}

RUN=${RUNS_DIR:-runs}/$DATASET$([ $SMOKE = 1 ] && echo -smoke || true)   # RUNS_DIR: put runs/ elsewhere
TIMES=$RUN/results/stage_times.csv
if [ $DRY = 0 ]; then
  mkdir -p "$RUN/results"
  [ -f "$TIMES" ] || echo "stage,seconds,run" > "$TIMES"
  INVOCATION="${INVOCATION% } ($(date '+%Y-%m-%d %H:%M'))"; INVOCATION=${INVOCATION//,/ }
else
  echo "# the stage commands of 'bash run_all.sh $DATASET', in order (run them in the repository root, in its venv:"
  echo "# source setup.sh; HF_HUB_OFFLINE=$HF_HUB_OFFLINE)"
fi
record_time() { echo "$1,$2,$INVOCATION" >> "$TIMES"; }
estimate_videos() {  # estimate_videos WHAT DIR "IDS" OUT: ViTPose keypoints + SMPL fit of every frame (resumable)
  DONE_IF=$4/keypoints.done:$2 stage "$1 smpl keypoints" \
    01b_estimate_smpl.py keypoints --data "$2" --splits $3 --out "$4" --model "$VITPOSE"
  [ $DRY = 1 ] || touch "$4/keypoints.done"
  DONE_IF=$4/fit.done:$4/keypoints.done stage "$1 smpl fit" \
    01b_estimate_smpl.py fit --out "$4" --splits $3 "${FIT[@]}" "${BODY[@]}"
  [ $DRY = 1 ] || touch "$4/fit.done"
}  # record_time NAME SECONDS: one line of $TIMES
stage() {  # [DONE_IF=OUT:IN] stage NAME SCRIPT ARGS...: run a stage script (unless OUT is newer than IN), time it
  local name=$1 script=$2; shift 2
  if [ $DRY = 1 ]; then printf 'python %s' "$script"; printf ' %q' "$@"; echo; return; fi
  if [ ! -f "$script" ]; then echo "error: stage '$name': '$script' is missing: restore it from git" >&2; exit 2; fi
  if [ -n "${DONE_IF:-}" ] && [ "${DONE_IF%%:*}" -nt "${DONE_IF#*:}" ]; then echo "== $name: done (${DONE_IF%%:*})"; return; fi
  printf '== %s: python %s' "$name" "$script"; printf ' %q' "$@"; echo  # (the --dry-run line, exactly)
  local t0=$SECONDS
  python "$script" "$@"
  record_time "$name" $((SECONDS - t0))
  echo "== $name: done in $((SECONDS - t0)) s"
}

if [ "$DATASET" != demo ]; then  # every weight the run will load can be had: one line each if not, before any stage
  WEIGHTS=(sd15="$PRETRAINED" image_encoder="$IMAGE_ENCODER")
  { [ -n "$SMPL_DIR" ] && { [ -z "$STAGE1_DATA" ] || [ -n "$STAGE1_SMPL" ]; } && [ -z "$POSE_VIDEOS" ]; } || WEIGHTS+=(vitpose="$VITPOSE")
  [ $SMOKE = 1 ] || WEIGHTS+=(resnet50="${RESNET_WEIGHTS:-imagenet}")
  if [ $DRY = 1 ]; then printf 'python tools/check_weights.py'; printf ' %q' "${WEIGHTS[@]}"; echo
  else python tools/check_weights.py "${WEIGHTS[@]}" || exit 2; fi
fi

# Table 1 rows: which poses and viewpoints each augmentation variant draws its targets from
#   ii: in-distribution poses + train viewpoints    iii: out-of-distribution poses, train viewpoints
#   iv: in-distribution poses + uniform viewpoints  vi: both (Diff-ID)
#   v: (VI)'s targets from a generator whose U-Nets start from random weights
# In distribution: on the demo world its train cameras and walking/standing poses; on real data the
# training photos' own estimated poses and viewpoints. Out of distribution: the dance videos' poses
# (real data), the demo's procedural kinds. Uniform: elevation U[0,30], azimuth U[0,360).
target_args() {  # target_args ROW: sets TARGET to the pose and viewpoint flags of 01 targets for that row
  case $1 in ii|iv) TARGET=("${ID_POSES[@]}") ;; *) TARGET=("${OOD_POSES[@]}") ;; esac
  case $1 in ii|iii) TARGET+=("${TRAIN_VIEWS[@]}") ;; *) TARGET+=(--views uniform) ;; esac
}
ID_POSES=(--poses id); OOD_POSES=(--poses ood); TRAIN_VIEWS=(--views train)
VARIANTS=$([ $TABLES = 1 ] && echo "ii iii iv vi" || echo vi)   # what gets generated
# the demo's "pre-trained diffusion": the generator demo/pretrain.py builds from a corpus of other people
DEMO_GENERATOR=${DEMO_GENERATOR:-assets/demo_generator}
if [ "$DATASET" = demo ] && [ $DRY = 0 ] && [ ! -f "$DEMO_GENERATOR/args.json" ]; then
  echo "error: the demo's pretrained generator '$DEMO_GENERATOR' is missing: rebuild it with 'python demo/pretrain.py --out $DEMO_GENERATOR' (about 80 minutes on 2 cores) or restore assets/ from git" >&2; exit 2
fi

if [ "$DATASET" = demo ]; then
  SIZE=64x128
  if [ $SMOKE = 1 ]; then
    WORLD=(--smoke); TARGETS=(--num-poses 4 --views-per-pose 2)
    GEN=(--init "$DEMO_GENERATOR" --steps 20 --batch-size 2 --sample-every 0 --save-every 20 --cache-encodings)
    SCRATCH=(--vae-steps 30); GEN_V=(--steps 20 --sample-every 0 --save-every 20 --cache-encodings)
    GENERATE=(--refs-per-pid 1 --targets-per-ref 1 --ddim-steps 4); FIGURES=(--tsne-max 100); SWEEP=""
    REID=(--arch resnet18 --backbone-weights none --width-mult 0.25 --bnneck --lr 1e-3 --lr-classifier 1e-3 --size 32x64
          --P 8 --K 4 --steps 20 --lr-steps 15 --extra-per-id 1 --extra-label-smoothing 0.1 --extra-weight 0.25 --preload --workers 0)
    SEEDS=${SEEDS:-0}
  else
    WORLD=(); TARGETS=(--num-poses 20 --views-per-pose 5)
    # generator: the shipped pretrained one (demo/pretrain.py) fine-tuned on the train split, batch 16,
    # EMA, min-SNR like its pretraining, 4,000 steps (the identity score keeps rising with the steps,
    # and from 4,000 row (VI) gains on the shifted split: docs/generator.md); (V) with
    # --tables: the same architecture from scratch on the train split alone, the settings of the
    # measured CPU learning run (docs/generator.md). Re-ID (docs/reid.md):
    # a ResNet18 with 1/4 of the channels (8x the iterations per minute), from scratch at 64x32, 2,400
    # iterations with lr x0.1 after 1,800 (what fits the time budget with 3 seeds; the curves still rise a
    # little there); lr 1e-3 (the paper's 1e-5 is for fine-tuning ImageNet weights) and a BNNeck: without
    # it the batch-hard triplet collapsed every feature to one point. Generated images join
    # CamStyle-style: (I)'s real P x K batch plus one per identity, their cross-entropy at 1/4 weight
    # (at full weight they cost same-camera accuracy).
    GEN=(--init "$DEMO_GENERATOR" --lr 2e-4 --batch-size 16 --steps 4000 --ema 0.995 --min-snr-gamma 5 --sample-every 500
         --cache-encodings)
    SCRATCH=(); GEN_V=(--lr 5e-4 --steps 4800 --sample-every 800 --cache-encodings)
    GENERATE=(--refs-per-pid 1 --targets-per-ref 10); FIGURES=(); SWEEP="300 600"
    REID=(--arch resnet18 --backbone-weights none --width-mult 0.25 --bnneck --lr 1e-3 --lr-classifier 1e-3 --size 32x64
          --P 16 --K 4 --steps 2400 --lr-steps 1800 --extra-per-id 1 --extra-label-smoothing 0.1 --extra-weight 0.25 --preload --workers 0)
    SEEDS=${SEEDS:-0 1 2}
    # measured stage times (docs/setup.md): the plain run ~41 min on an idle 2-core machine, --tables ~70 min more
    [ $DRY = 1 ] || echo "expected time: about $([ $TABLES = 1 ] && echo 110 || echo 40) minutes on a 2-core CPU (rerunning resumes)"
  fi
  DATA_ROOT=$RUN/world
  SPLITS="same:$DATA_ROOT shifted:$DATA_ROOT/shifted"
  NOCHECK=(--no-size-check)
  stage world demo/world.py --out "$DATA_ROOT" "${WORLD[@]}"
  stage conditions 01_render_smpl.py conditions --data "$DATA_ROOT" --out "$RUN/conditions"
else
  # the paper's settings: 192x384 generator (stage 1 at 768x768), 20 target poses x 4 viewpoints
  # (65-70 per reference), ResNet50 from ImageNet, P=32 K=8, 20k iterations
  SIZE=192x384; SIZE1=768x768
  AMP=$([ "${DEVICE:-cuda}" = cpu ] && true || echo --amp)
  TARGETS=(--num-poses 20 --views-per-pose 4)
  FIT=(); STAGE1=(--steps ${STAGE1_STEPS:-30000} --batch-size 2)
  GEN=(--steps ${GEN_STEPS:-30000} --skip-missing-conditions $AMP)
  # (VI) draws its images from an 80k pool like the paper's; Table 2 sweeps nested subsets of it.
  # The paper states 45,500 (Market) / 49,000 (Duke) added images, but its totals imply 14,000.
  ADD=$([ "$ADDED" = totals ] && echo 14000 || { [ "$DATASET" = market1501 ] && echo 45500 || echo 49000; })
  GENERATE=(--refs-per-pid 5-7 --targets-per-ref 70 $AMP --num-images $ADD)
  GENERATE_VI=(--refs-per-pid 5-7 --targets-per-ref 70 $AMP --num-images 80000)
  # generated images join the batches as the demo's measurements chose (docs/reid.md): CamStyle-style,
  # the real P x K batch plus one per identity at a quarter of the cross-entropy; or pooled (the paper)
  MIX=$([ "$MIXING" = camstyle ] && echo "--extra-per-id 1 --extra-label-smoothing 0.1 --extra-weight 0.25" || true)
  REID=(--backbone-weights "${RESNET_WEIGHTS:-imagenet}" --steps ${REID_STEPS:-20000} $MIX $AMP)
  SWEEP="3500 7000 14000 21000 28000 35000 42000 56000"
  if [ $SMOKE = 1 ]; then  # tiny sizes: the tests run the real-data flow with tiny weights
    SIZE=64x128; SIZE1=64x64; TARGETS=(--num-poses 2 --views-per-pose 1)
    FIT=(--steps 8 --inits 2 --batch-size 64 --min-score 0); STAGE1=(--steps 2 --batch-size 2 --sample-every 0 --save-every 2)
    GEN=(--steps 2 --batch-size 2 --sample-every 0 --save-every 2 --skip-missing-conditions)
    ADD=""; GENERATE=(--refs-per-pid 1 --targets-per-ref 1 --ddim-steps 2); GENERATE_VI=(--refs-per-pid 1 --targets-per-ref 2 --ddim-steps 2)
    REID=(--backbone-weights none --arch resnet18 --size 32x64 --P 4 --K 2 --steps 2 --workers 0 $MIX); SWEEP="2"
  fi
  GEN_V=("${GEN[@]}")
  SEEDS=${SEEDS:-0}
  if [ $SMOKE = 0 ]; then  # what the run will cost before a GPU hour is spent (figures and method: docs/forecast.md)
    frames() { if [ -d "$1" ]; then find "$1" -mindepth 2 -maxdepth 2 -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | wc -l; else echo 0; fi; }
    FORECAST=(tools/forecast.py --dataset $DATASET --seeds $(echo $SEEDS | wc -w) --added $ADDED
              --stage1-steps ${STAGE1_STEPS:-30000} --gen-steps ${GEN_STEPS:-30000} --reid-steps ${REID_STEPS:-20000}
              --stage1-frames $(frames "$STAGE1_DATA") --pose-video-frames $(frames "$POSE_VIDEOS") $([ $TABLES = 1 ] && echo --tables || true))
    if [ $DRY = 1 ]; then python3 "${FORECAST[@]}" | sed 's/^/# /' || true; else python "${FORECAST[@]}" || true; fi
  fi
  SPLITS="same:$DATA_ROOT"
  NOCHECK=$([ $SIZECHECK = 1 ] && echo "--dataset $DATASET" || echo --no-size-check); NOCHECK=($NOCHECK)
  BODY=(${SMPL_MODEL:+--smpl-model "$SMPL_MODEL"})
  if [ -z "$SMPL_DIR" ]; then  # SMPL of the training photos: ViTPose keypoints, then the SMPLify-style fit
    SMPL_DIR=$RUN/smpl
    DONE_IF=$SMPL_DIR/bounding_box_train.keypoints.npz:$DATA_ROOT/bounding_box_train stage "smpl keypoints" \
      01b_estimate_smpl.py keypoints --data "$DATA_ROOT" --out "$SMPL_DIR" --model "$VITPOSE"
    DONE_IF=$SMPL_DIR/bounding_box_train.npz:$SMPL_DIR/bounding_box_train.keypoints.npz stage "smpl fit" \
      01b_estimate_smpl.py fit --out "$SMPL_DIR" "${FIT[@]}" "${BODY[@]}"
  fi
  stage conditions 01_render_smpl.py "${BODY[@]}" conditions --data "$DATA_ROOT" --smpl "$SMPL_DIR" --out "$RUN/conditions" --size $SIZE
  # the rows' poses and viewpoints (above): the training photos' own, and the dance videos'
  TRAIN_SMPL=$SMPL_DIR/bounding_box_train.npz
  DONE_IF=$RUN/poses/train.npz:$TRAIN_SMPL stage "pose bank (train)" 01_render_smpl.py bank --smpl "$TRAIN_SMPL" \
    --out "$RUN/poses/train.npz"
  ID_POSES=(--pose-bank "$RUN/poses/train.npz"); TRAIN_VIEWS=(--views-from "$TRAIN_SMPL")
  if [ -n "$POSE_VIDEOS" ]; then
    PV_SMPL=$RUN/pose_videos/smpl
    estimate_videos "dance-video" "$POSE_VIDEOS" "$PVIDS" "$PV_SMPL"
    DONE_IF=$RUN/poses/videos.npz:$PV_SMPL/fit.done stage "pose bank (dance videos)" 01_render_smpl.py bank \
      --smpl "$PV_SMPL" --choose $([ "$POSE_CHOICE" = farthest ] && echo 20 || echo 0) --away-from "$TRAIN_SMPL" \
      --out "$RUN/poses/videos.npz"
    OOD_POSES=(--pose-bank "$RUN/poses/videos.npz")
  elif [ -n "$POSE_BANK" ]; then
    OOD_POSES=(--pose-bank "$POSE_BANK")
  else
    [ $DRY = 1 ] || echo "note: no --pose-videos: procedural poses (body.py) stand in for the paper's dance-video poses"
  fi
  if [ -n "$STAGE1_DATA" ]; then  # the paper's stage 1: SD-1.5 -> video frames (pose transfer within a video)
    if [ -z "$STAGE1_SMPL" ]; then
      STAGE1_SMPL=$RUN/stage1/smpl
      estimate_videos "stage-1" "$STAGE1_DATA" "$VIDEOS" "$STAGE1_SMPL"
    fi
    stage "stage-1 conditions" 01_render_smpl.py "${BODY[@]}" conditions --data "$STAGE1_DATA" --smpl "$STAGE1_SMPL" --splits $VIDEOS \
      --out "$RUN/stage1/conditions" --size $SIZE1
    stage "generator stage 1" 02_train_generator.py --stage 1 --data "$STAGE1_DATA" --conditions "$RUN/stage1/conditions" \
      --out "$RUN/generator_stage1" --pretrained "$PRETRAINED" --image-encoder "$IMAGE_ENCODER" --size $SIZE1 \
      "${STAGE1[@]}" --skip-missing-conditions $AMP ${DEVICE:+--device $DEVICE}
    GEN=(--init "$RUN/generator_stage1" "${GEN[@]}")
  else
    [ $DRY = 1 ] || echo "note: no --stage1-data: the generator starts from '$PRETRAINED' directly, skipping the paper's stage 1 (training on fashion videos first)"
    GEN=(--pretrained "$PRETRAINED" --image-encoder "$IMAGE_ENCODER" "${GEN[@]}")
  fi
  GEN_V=(--pretrained "$PRETRAINED" --image-encoder "$IMAGE_ENCODER" --random-unets "${GEN_V[@]}")
fi

for v in $VARIANTS; do
  target_args $v
  stage "targets $v" 01_render_smpl.py ${BODY[@]+"${BODY[@]}"} targets --out "$RUN/targets/$v" "${TARGET[@]}" \
    --size $SIZE "${TARGETS[@]}"
done
stage generator 02_train_generator.py --data "$DATA_ROOT" --conditions "$RUN/conditions" --out "$RUN/generator" \
  --size $SIZE "${GEN[@]}" ${DEVICE:+--device $DEVICE}
if [ $TABLES = 1 ]; then  # (V): the same architecture, randomly initialised
  if [ "$DATASET" = demo ]; then  # the demo's tiny networks, its small VAE trained on the train split
    DONE_IF=$RUN/scratch_v/args.json:$DATA_ROOT/identities.json stage "random generator (V)" demo/scratch_generator.py \
      --data "$DATA_ROOT" --out "$RUN/scratch_v" --size $SIZE "${SCRATCH[@]}" ${DEVICE:+--device $DEVICE}
    GEN_V=(--init "$RUN/scratch_v" "${GEN_V[@]}")
  fi
  stage "generator (V)" 02_train_generator.py --data "$DATA_ROOT" --conditions "$RUN/conditions" \
    --out "$RUN/generator_v" --size $SIZE "${GEN_V[@]}" ${DEVICE:+--device $DEVICE}
  VARIANTS="ii iii iv v vi"
fi
for v in $VARIANTS; do
  gen=("${GENERATE[@]}"); [ $v = vi ] && [ -n "${GENERATE_VI+x}" ] && gen=("${GENERATE_VI[@]}")
  g=$RUN/generator; t=$v; [ $v = v ] && { g=$RUN/generator_v; t=vi; }
  stage "generate $v" 03_generate.py --generator "$g" --data "$DATA_ROOT" --targets "$RUN/targets/$t" \
    --out "$RUN/augmented/$v" "${gen[@]}" ${DEVICE:+--device $DEVICE}
done
if [ "$DATASET" = demo ]; then
  # ORACLE row: the same jobs as (VI), rendered as ground truth; and the generator's fidelity
  stage oracle demo/oracle.py --manifest "$RUN/augmented/vi/manifest.csv" --targets "$RUN/targets/vi" \
    --world "$DATA_ROOT" --out "$RUN/augmented/oracle"
  DONE_IF=$RUN/results/fidelity.json:$RUN/augmented/oracle/manifest.csv stage fidelity demo/fidelity.py --generated "$RUN/augmented/vi" --oracle "$RUN/augmented/oracle" \
    --out "$RUN/results/fidelity.json" --sheet "$RUN/results/figures/generated_vs_oracle.png" \
    --data "$DATA_ROOT" --targets "$RUN/targets/vi" --generator "$RUN/generator"
  DONE_IF=$RUN/results/figures/fig3_tsne_poses.png:$DATA_ROOT/identities.json stage figures tools/figures.py --data "$DATA_ROOT" --targets "$RUN/targets/vi" --out "$RUN/results/figures" "${FIGURES[@]}"
  VARIANTS="$VARIANTS oracle"
fi

# Re-ID: one model per row and seed, evaluated on every test split; vi_nN = Table 2: (VI) with N
# generated images (nested subsets of one pool, 04 --extra-count)
ROWS=$([ $TABLES = 1 ] && echo "base $VARIANTS $(for n in $SWEEP; do echo vi_n$n; done)" || echo "base vi")
reid() {  # reid ROW SEED: train one model, evaluate it on every split
  local v=$1 seed=$2 extra=() sp name
  [ $v = base ] || extra=(--extra-train "$RUN/augmented/${v%_n*}/bounding_box_train")
  case $v in vi_n*) extra+=(--extra-count ${v#vi_n}) ;; vi) [ -n "${ADD:-}" ] && extra+=(--extra-count $ADD) ;; esac
  stage "reid $v" 04_train_reid.py --data "$DATA_ROOT" --out "$RUN/reid/${v}_s$seed" --seed $seed \
    "${extra[@]}" "${REID[@]}" "${NOCHECK[@]}" ${DEVICE:+--device $DEVICE} ${THREADS[@]+"${THREADS[@]}"}
  for sp in $SPLITS; do
    name=${v}_s${seed}_${sp%%:*}
    DONE_IF=$RUN/results/$name.json:$RUN/reid/${v}_s$seed/model.pt stage "evaluate" 05_evaluate.py --model "$RUN/reid/${v}_s$seed/model.pt" --data "$DATA_ROOT" \
      --test-root "${sp#*:}" --name "$name" --variant $v --seed $seed --split "${sp%%:*}" \
      --results "$RUN/results" "${NOCHECK[@]}" ${DEVICE:+--device $DEVICE}
  done
}
# On the CPU demo the runs go two at a time with one thread each: on 2 cores that trains ~2x as many
# iterations per minute as one two-thread run (docs/reid.md). Each run's output goes to its log;
# stage_times.csv gets the wall time of the whole pool (per-run times: reid_run_times.csv).
JOBS=${REID_JOBS:-$([ "$DATASET" = demo ] && [ "${DEVICE:-cpu}" = cpu ] && echo 2 || echo 1)}
[ "$JOBS" = 1 ] || THREADS=(--threads 1)
[ "$JOBS" = 1 ] || [ $DRY = 0 ] || echo "# (the Re-ID runs below go $JOBS at a time)"
if [ "$JOBS" -gt 1 ] && [ $DRY = 0 ]; then
  t0=$SECONDS; FAILED=$RUN/reid/failed
  mkdir -p "$RUN/reid"; rm -f "$FAILED"
  for v in $ROWS; do
    for seed in $SEEDS; do
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
      log=$RUN/reid/${v}_s$seed.log; echo "== reid $v seed $seed: running (log: $log)"
      ( TIMES=$RUN/results/reid_run_times.csv  # (no || here: it would switch off set -e inside reid)
        trap '[ $? = 0 ] || { echo "reid $v seed $seed" >> "$FAILED"; echo "error: reid $v seed $seed failed: see $log" >&2; }' EXIT
        reid $v $seed > "$log" 2>&1 ) &
    done
  done
  wait
  [ ! -f "$FAILED" ] || { echo "error: $(wc -l < "$FAILED") Re-ID run(s) failed (listed in $FAILED); rerun to resume" >&2; exit 1; }
  record_time "reid + evaluate ($JOBS at a time)" $((SECONDS - t0))
else
  for v in $ROWS; do for seed in $SEEDS; do reid $v $seed; done; done
fi
# does the generator keep identity? the row-(I) model's nearest identity centroid of each generated image
first=${SEEDS%% *}
DONE_IF=$RUN/results/identity.json:$RUN/reid/base_s$first/model.pt stage identity tools/identity_score.py \
  --model "$RUN/reid/base_s$first/model.pt" --data "$DATA_ROOT" --generated "$RUN/augmented/vi" \
  $([ "$DATASET" = demo ] && echo --oracle "$RUN/augmented/oracle") --out "$RUN/results/identity.json" ${DEVICE:+--device $DEVICE}
if [ "$DATASET" = demo ] && [ $TABLES = 1 ]; then  # the same two checks for row (V)'s generator (same jobs as (VI))
  DONE_IF=$RUN/results/fidelity_v.json:$RUN/augmented/v/manifest.csv stage "fidelity (V)" demo/fidelity.py \
    --generated "$RUN/augmented/v" --oracle "$RUN/augmented/oracle" --out "$RUN/results/fidelity_v.json"
  DONE_IF=$RUN/results/identity_v.json:$RUN/augmented/v/manifest.csv stage "identity (V)" tools/identity_score.py \
    --model "$RUN/reid/base_s$first/model.pt" --data "$DATA_ROOT" --generated "$RUN/augmented/v" \
    --out "$RUN/results/identity_v.json" ${DEVICE:+--device $DEVICE}  # (the oracle's score is identity.json's)
fi
SUMMARY=(tools/summarize.py "$RUN/results")
# docs/results.md and the README's headline show the last full demo run, and the figures it references
README=$([ "$DATASET" = demo ] && [ $SMOKE = 0 ] && [ $TABLES = 1 ] && echo 1 || echo 0)
[ $README = 0 ] || SUMMARY+=(--docs docs/results.md --readme README.md)
if [ $DRY = 1 ]; then printf 'python'; printf ' %q' "${SUMMARY[@]}"; echo; exit 0; fi
python "${SUMMARY[@]}"
[ $README = 0 ] || { mkdir -p docs/demo && cp "$RUN"/results/figures/*.png docs/demo/ && echo "copied the figures to docs/demo/"; }
echo "done: $RUN/results/summary.md (stage times in $TIMES)"
