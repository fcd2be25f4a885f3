#!/usr/bin/env bash
# (Ran at commit 56099e6+, when single rows were padded to 2 for the down projection; kept as the record of that variant.)
# Session 15 measurements on the idle machine, after the --base-ce fine-tune (run-base-ce.sh): decoding speed
# (1 and 2 threads; the engine's products now pad rows to counts that agree, so a verification of a few tokens
# is one product per matrix), self-speculative decoding with depth drafts for both fine-tuned checkpoints
# (session 14's, runs/lm/long, and the --base-ce one), context drafts (prompt lookup), and the depth table.
# The license texts (/tmp/licenses): GPL-3, Apache-2.0, MPL-2.0, LGPL-3, Artistic from /usr/share/common-licenses, copied as .txt.
set -uo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
PY=.venv/bin/python
OUT=runs/lm/session15-padded
mkdir -p $OUT
CK=runs/lm/base-ce/train/checkpoint.pt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 1 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --ppl-tokens 2048 --text /tmp/licenses --save-json $OUT/decode-1thread.json | tee $OUT/decode-1thread.txt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 2 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --save-json $OUT/decode-2threads.json | tee $OUT/decode-2threads.txt
for ck in base-ce long; do
  $PY benchmarks/lm_speculative.py --checkpoint runs/lm/$ck/train/checkpoint.pt --threads 2 --draft base \
      --draft-tokens 1,2,3,4 --draft-vocab 0,8192 --min-confidence 0,0.5 --save-json $OUT/speculative-$ck.json \
      --plot $OUT/speculative-$ck.png | tee $OUT/speculative-$ck.txt
done
$PY benchmarks/lm_speculative.py --checkpoint $CK --threads 2 --draft none,base --draft-tokens 2,4,6 \
    --draft-vocab 8192 --min-confidence 0.5 --lookup 1,2,3 --save-json $OUT/speculative-lookup.json | tee $OUT/speculative-lookup.txt
.venv/bin/adn eval-lm --checkpoint $CK --threads 1 --eval-tokens 4096 --new-tokens 32 --repeats 2 --no-naive \
    --save-json $OUT/depth-table.json --overwrite | tee $OUT/depth-table.txt
echo MEASURED
