#!/usr/bin/env bash
# Train FlexTok variants side by side on one GPU, each in the two phases of docs/tokenizers.md (a
# deterministic phase at flow time 1, then the rectified flow at 30% flow time 1), on the shipped
# auto-encoder's latents of DATA training scenes rendered once and shared.
#
#   OUT=runs/ftgpu bash scripts/train_flextok_gpu.sh
#
# Each phase runs for a wall-clock budget (P1, P2 minutes): train_flextok.py --minutes sets its step
# count from the measured pace and writes it to curve.json (see its --help for how closely --steps repeats it).
# Every finished phase is packed at once as OUT/<variant>-<phase>.tgz (float16 weights, curve, log).
# Variants: A = the shipped architecture (patch 4, 16 registers, 3 + 3 layers); B = patch 2;
# C = patch 2, 32 registers, 4 + 4 layers. DET_INIT=<saved FlexTok folder> continues that tokenizer's
# deterministic phase instead of starting one (its architecture and auto-encoder kept; DET_LR, default 1e-3;
# one variant only, since the loaded architecture replaces the variant's). Exits non-zero if any phase failed.
set -u
OUT=${OUT:-runs/ftgpu}
W=${WORK:-/tmp/ftgpu}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-400000}
BATCH=${BATCH:-256}
P1=${P1:-4}
P2=${P2:-2.5}
WORKERS=${WORKERS:-14}
VARIANTS=${VARIANTS:-A B C}
DET_INIT=${DET_INIT:-}
DET_LR=${DET_LR:-1e-3}
AE=${DET_INIT:-mmtoken/checkpoints/tiny-flextok}  # the auto-encoder whose latents are cached
set -- $VARIANTS
[ $# -ge 1 ] || { echo "VARIANTS: name at least one of A, B, C" >&2; exit 2; }
for v in "$@"; do
    case $v in A|B|C) ;; *) echo "unknown variant $v (A, B or C)" >&2; exit 2 ;; esac
done
if [ -n "$DET_INIT" ] && [ $# -ne 1 ]; then
    echo "DET_INIT continues one tokenizer: name one variant (VARIANTS=A)" >&2; exit 2
fi
export PYTHONUNBUFFERED=1
mkdir -p "$W" "$OUT"
T=scripts/train_flextok.py
common=(--latent-cache "$W/latents_${AE//\//_}_$DATA.safetensors" --data "$DATA" --device "$DEVICE" --batch "$BATCH" --steps 10000000 --eval-every 2000)

pack() {  # $1: a finished run folder under $W
    python3 -c "import sys, torch; sys.path.insert(0, '.'); from mmtoken.tokenizers import FlexTok
FlexTok.from_pretrained('$W/$1/tokenizer').save_pretrained('$W/$1/tokenizer16', extra={'trained_by': 'scripts/train_flextok_gpu.sh'}, dtype=torch.float16)" \
        && tar -czf "$OUT/$1.tgz" -C "$W" "$1/tokenizer16" "$1/curve.json" "$1.log"
}

run() {  # $1: variant name; the rest: architecture flags
    local name=$1; shift
    local start=(--ae-from "$AE")
    [ -n "$DET_INIT" ] && start=(--init "$DET_INIT")
    python3 $T --out "$W/$name-det" "${start[@]}" "${common[@]}" --minutes "$P1" --lr "$DET_LR" "$@" > "$W/$name-det.log" 2>&1 \
        && pack "$name-det" \
        && python3 $T --out "$W/$name-flow" --init "$W/$name-det/tokenizer" "${common[@]}" --minutes "$P2" \
            --p-pure-noise 0.3 --lr 3e-4 --eval-steps 10 > "$W/$name-flow.log" 2>&1 \
        && pack "$name-flow"
    local rc=$?
    echo "$name finished: $rc"
    return $rc
}

date
# the shared latent cache (one step of a throwaway run writes it)
python3 $T --out "$W/cache" --ae-from "$AE" "${common[@]}" --steps 1 --eval-n 8 --workers "$WORKERS" > "$W/cache.log" 2>&1 \
    || { cat "$W/cache.log"; exit 1; }
grep -a "auto-encoder\|cached" "$W/cache.log"
date
pids=()
for v in $VARIANTS; do
    case $v in
        A) run A --patch 4 & ;;
        B) run B --patch 2 & ;;
        C) run C --patch 2 --registers 32 --layers 4 & ;;
    esac
    pids+=($!)
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
date
for f in "$W"/*-*.log; do echo "== $f"; grep -a "ms a step\|^eval\|done in\|Error\|error" "$f" | tail -4 | cut -c1-400; done
exit $fail
