#!/bin/bash
# An ablation screen for the reproduction (docs/reproduction/notes.md): the protocol's ADN command, seed 0
# unless --seed is given, with extra `adn train` flags on top; one thread, so that two screens (or a
# screen and `adn reproduce --jobs 1`) share the 2 cores without oversubscribing them. Resumes a screen
# that was stopped part-way. When it finishes, its log.jsonl is copied to
# results/reproduction/experiments/screen-NAME.jsonl (commit that file: runs/ is not kept).
#
#   scripts/screen.sh adn-base-ce0.5 --base-ce 0.5
#   scripts/screen.sh adn-pooled-s1 --feature-kd pooled --seed 1
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: scripts/screen.sh NAME [adn train flags ...]" >&2
    exit 2
fi
name=$1; shift
out=runs/screen/$name
mkdir -p "$out" runs/logs results/reproduction/experiments
resume=()
[ -f "$out/checkpoint.pt" ] && resume=(--resume "$out/checkpoint.pt")
# the protocol's command (adn reproduce, arm adn); later flags override earlier ones (--seed, --lr, ...)
OMP_NUM_THREADS=1 .venv/bin/adn train --model resnet20 --width 8 --data fashion-mnist --epochs 30 -b 128 \
    --lr 0.1 --lr-scheduler multisteplr --lr-steps 15 23 --wd 0.0005 --val-from-train 5000 --seed 0 \
    --no-progress --method adn --output-dir "$out" "${resume[@]}" "$@" >> "runs/logs/screen-$name.log" 2>&1
cp "$out/log.jsonl" "results/reproduction/experiments/screen-$name.jsonl"
echo "screen $name finished: results/reproduction/experiments/screen-$name.jsonl"
