#!/usr/bin/env bash
# Session 15 (AMD EPYC, 2 cores): the session-14 fine-tune (400 steps, lr 2e-4) with the base-net's own
# next-token loss added (--base-ce, default 0.5), evaluated on the same 4,096 held-out tokens and license texts
# as run.sh; the baseline alone is run.sh's (its checkpoint and numbers do not change with --base-ce).
set -euo pipefail
# The license texts (/tmp/licenses): GPL-3, Apache-2.0, MPL-2.0, LGPL-3, Artistic from /usr/share/common-licenses, copied as .txt.
cd "$(dirname "$0")/../../.."  # the repository root
ADN=.venv/bin/adn
OUT=runs/lm/base-ce
export OMP_NUM_THREADS=2
$ADN train-lm --skippable half --threads 2 --output-dir $OUT/train --train near-skipped --steps ${STEPS:-400} \
    --time-limit 60 -b 4 --seq-len 256 --lr ${LR:-2e-4} --base-ce ${BASE_CE:-0.5} --eval-every 100 --eval-tokens 2048 \
    --save-every 25 --overwrite
$ADN eval-lm --checkpoint $OUT/train/checkpoint.pt --threads 2 --eval-tokens 4096 --no-speed --save-json $OUT/after.json --overwrite | tee $OUT/after.txt
$ADN eval-lm --checkpoint $OUT/train/checkpoint.pt --threads 2 --eval-tokens 4096 --skip super,base --no-speed --text /tmp/licenses --heldout-share 0.5 --save-json $OUT/licenses-train.json --overwrite | tee $OUT/licenses-train.txt
echo ALL DONE
