#!/usr/bin/env bash
# Continue a tiny-llava run on one GPU: named variants side by side, each for a wall-clock budget
# (train_tiny_llava.py --minutes), each drawing its scenes and questions in WORKERS processes.
#
#   INIT=runs/p8/E4/model OUT=runs/tlgpu MINUTES=6.5 bash scripts/train_tiny_llava_gpu.sh
#
# All variants continue INIT with the settings of docs/world.md's E-series (ViT frozen, token drop,
# decomposed targets, a 90% caption prior), with 16 scenes x 4 questions a step:
#   G1: those settings alone;
#   G2: + --starts 1 (counting questions' first-token flags) and a 15% focus on "how many objects";
#   G3: G2 with twice the caption share;
#   H1: G3 with half the scenes drawn again until a co-occurrence partner is absent (--lone-mate 0.5);
#   H2: H1 with three quarters of them so drawn and every absent partner named (--caption-partner 1).
# Every finished run is packed as OUT/<variant>.tgz: its LM and projector in float16
# (scripts/llava_parts.py split; the frozen ViT is INIT's), curve.json and its log. Exits non-zero if
# any run failed. DEVICE=cpu runs the same on the CPU (a check of the script).
set -u
OUT=${OUT:-runs/tlgpu}
W=${WORK:-/tmp/tlgpu}
INIT=${INIT:?INIT: the model folder to continue}
MINUTES=${MINUTES:-6.5}
WORKERS=${WORKERS:-3}
VARIANTS=${VARIANTS:-G1 G2 G3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-4000}  # the provisional step count, until --minutes fits it
IMAGES=${IMAGES:-16}
SEED=${SEED:-9}  # phases 13 and 14 both ran with 9; a continuation draws new scenes with a new seed
set -- $VARIANTS
[ $# -ge 1 ] || { echo "VARIANTS: name at least one of G1, G2, G3, H1, H2" >&2; exit 2; }
for v in "$@"; do
    case $v in G1|G2|G3|H1|H2) ;; *) echo "unknown variant $v (G1, G2, G3, H1 or H2)" >&2; exit 2 ;; esac
done
export PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
mix=synth-vqa:4,synth-pope:1,synth-caption:2,synth-format:1
captions4=(--tasks synth-vqa:4,synth-pope:1,synth-caption:4,synth-format:1 --starts 1 --focus count_all:0.15)  # G3's
base=(--init "$INIT" --vision-steps 0 --device "$DEVICE" --workers "$WORKERS" --minutes "$MINUTES"
      --lm-steps "$STEPS" --eval-every 1000 --eval-n 300 --images "$IMAGES" --questions 4 --curriculum 0 --drop 0.5
      --readout-families colour,shape,size,position,at_cell,count,count_all --slots relation,count_all,count,at_cell
      --roles 1 --cells 2 --caption-partner 0.9 --lr 3e-4 --seed "$SEED" --threads 1)

run() {  # $1: variant name; the rest: its flags
    local name=$1; shift
    python3 scripts/train_tiny_llava.py --out "$W/$name" "${base[@]}" "$@" > "$W/$name.log" 2>&1 \
        && python3 scripts/llava_parts.py split "$W/$name/model" "$W/$name/parts" >> "$W/$name.log" 2>&1 \
        && tar -czf "$OUT/$name.tgz" -C "$W" "$name/parts" "$name/curve.json" "$name.log"
    local rc=$?
    echo "$name finished: $rc"
    return $rc
}

date
pids=()
for v in $VARIANTS; do
    case $v in
        G1) run G1 --tasks $mix & ;;
        G2) run G2 --tasks $mix --starts 1 --focus count_all:0.15 & ;;
        G3) run G3 "${captions4[@]}" & ;;
        H1) run H1 "${captions4[@]}" --lone-mate 0.5 & ;;
        H2) run H2 "${captions4[@]}" --lone-mate 0.75 --caption-partner 1 & ;;
    esac
    pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
date
for v in $VARIANTS; do echo "== $v"; grep -a "ms a step\|^eval\|stopped\|done in\|Error\|error" "$W/$v.log" | tail -3 | cut -c1-600; done
exit $fail
