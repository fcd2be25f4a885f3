#!/usr/bin/env bash
# The demo behind `make demo`: train a small adaptive depth ResNet on Fashion-MNIST with adn train's default
# (joint training of both depths, then each depth's batch-norm statistics stored in the checkpoint), then
# evaluate all of its sub-networks. Took 21 minutes on 2 cores of an Intel Xeon (session 12), where an earlier
# 2-core AMD EPYC trained the same schedule in about 12 (README, "What make demo printed").
set -euo pipefail
ADN=.venv/bin/adn
OUT=runs/demo
rm -rf "$OUT"
cat <<TXT
== adn demo ==
Training ResNet-20 (base width 8, 3 stages -> 8 sub-networks) on all 60,000 Fashion-MNIST training images
for 10 epochs (SGD, lr 0.1 with cosine decay, batch 128) with adn train's default: the super-net and the
base-net trained jointly on the labels, then each depth's batch-norm statistics measured and stored in the
checkpoint (the paper's Algorithm 1 is --method adn). Then every sub-network is evaluated on the 10,000
test images. adn picks the fastest precision the CPU supports (bfloat16 autocast and channels-last where
bfloat16 is native; see the line below).
TXT
start=$(date +%s)
$ADN train --model resnet20 --width 8 --data fashion-mnist --epochs 10 -b 128 --lr 0.1 --wd 5e-4 \
    --output-dir "$OUT"
$ADN eval --checkpoint "$OUT/checkpoint.pt" --latency-batch-size 64 --repeats 10 --plot "$OUT/acc_vs_macs.png" \
    | tee "$OUT/eval.txt"
echo
echo "checkpoint: $OUT/checkpoint.pt   metrics per epoch: $OUT/log.jsonl   plot: $OUT/acc_vs_macs.png"
echo "demo took $(( $(date +%s) - start )) s"
