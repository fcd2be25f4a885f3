#!/usr/bin/env bash
# Session 15 measurements on the idle machine, after the --base-ce fine-tune: decoding speed (1 thread; the
# engine's products now pad rows to counts that agree, so verification of a few tokens is one product), then
# self-speculative decoding with session 14's fine-tuned checkpoint (its acceptance is the one measured then),
# then with the --base-ce checkpoint.
# The license texts (/tmp/licenses): GPL-3, Apache-2.0, MPL-2.0, LGPL-3, Artistic from /usr/share/common-licenses, copied as .txt.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
PY=.venv/bin/python
OUT=runs/lm/session15
mkdir -p $OUT
CK=runs/lm/long/train/checkpoint.pt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 1 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --ppl-tokens 2048 --text /tmp/licenses --save-json $OUT/decode-1thread.json | tee $OUT/decode-1thread.txt
for ck in long base-ce; do
  $PY benchmarks/lm_speculative.py --checkpoint runs/lm/$ck/train/checkpoint.pt --threads 2 --draft base \
      --draft-tokens 1,2,3,4 --draft-vocab 0,8192 --min-confidence 0,0.5 --save-json $OUT/speculative-$ck.json \
      --plot $OUT/speculative-$ck.png | tee $OUT/speculative-$ck.txt || echo "lm_speculative exit $?"
done
echo MEASURED
