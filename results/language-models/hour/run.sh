#!/usr/bin/env bash
# Session 14 (AMD EPYC, 2 cores): the fine-tune (run as STEPS=400 LR=2e-4), then the baseline for the same steps.
set -euo pipefail
# The license texts (/tmp/licenses): GPL-3, Apache-2.0, MPL-2.0, LGPL-3, Artistic from /usr/share/common-licenses, copied as .txt.
cd "$(dirname "$0")/../../.."  # the repository root
ADN=.venv/bin/adn
OUT=runs/lm/long
STEPS=${STEPS:-400}
export OMP_NUM_THREADS=2
$ADN train-lm --skippable half --threads 2 --output-dir $OUT/train --train near-skipped --steps $STEPS \
    --time-limit 60 -b 4 --seq-len 256 --lr ${LR:-2e-4} --eval-every 100 --eval-tokens 2048 --save-every 25 --overwrite
$ADN train-lm --skippable half --threads 2 --output-dir $OUT/alone --method alone --train near-skipped \
    --steps $STEPS -b 4 --seq-len 256 --lr ${LR:-2e-4} --eval-every 100 --eval-tokens 2048 --save-every 25 --overwrite
$ADN eval-lm --checkpoint $OUT/train/checkpoint.pt --threads 2 --eval-tokens 4096 --no-speed --save-json $OUT/after.json --overwrite | tee $OUT/after.txt
$ADN eval-lm --checkpoint $OUT/alone/checkpoint.pt --threads 2 --eval-tokens 4096 --skip super,base --no-speed --save-json $OUT/alone.json --overwrite | tee $OUT/alone.txt
$ADN eval-lm --checkpoint $OUT/train/checkpoint.pt --threads 2 --eval-tokens 4096 --skip super,base --no-speed --text /tmp/licenses --heldout-share 0.5 --save-json $OUT/licenses-train.json --overwrite | tee $OUT/licenses-train.txt
$ADN eval-lm --checkpoint $OUT/alone/checkpoint.pt --threads 2 --eval-tokens 4096 --skip super,base --no-speed --text /tmp/licenses --heldout-share 0.5 --no-naive --save-json $OUT/licenses-alone.json --overwrite | tee $OUT/licenses-alone.txt
echo ALL DONE
