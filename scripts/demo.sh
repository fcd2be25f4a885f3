#!/usr/bin/env bash
# The demo behind `make demo`: train a small adaptive depth ResNet on Fashion-MNIST with sub-path
# specialization, then evaluate all of its sub-networks. Sized to finish in a few minutes on 2 CPU cores.
set -euo pipefail
ADN=.venv/bin/adn
OUT=runs/demo
rm -rf "$OUT"
cat <<TXT
== adn demo ==
Training ResNet-20 (base width 8, 3 stages -> 8 sub-networks) on Fashion-MNIST with Algorithm 1.
To fit a few minutes on a CPU it trains on a fixed 30,000-image subset of the 60,000 training images
for 3 epochs and evaluates on the full 10,000-image test set. A full run: drop --train-subset and use
--epochs 30 or more.
TXT
start=$(date +%s)
$ADN train --model resnet20 --width 8 --data fashion-mnist --train-subset 30000 --epochs 3 -b 64 --lr 0.05 \
    --output-dir "$OUT"
$ADN eval --checkpoint "$OUT/checkpoint.pt" --latency-batch-size 64 --repeats 10 --plot "$OUT/acc_vs_macs.png" \
    | tee "$OUT/eval.txt"
echo
echo "checkpoint: $OUT/checkpoint.pt   metrics per epoch: $OUT/log.jsonl   plot: $OUT/acc_vs_macs.png"
echo "demo took $(( $(date +%s) - start )) s"
