#!/usr/bin/env bash
# Session 15, final code (one-token steps unpadded, a few tokens in one product where it gives one-row results,
# the down projection one token at a time): decoding speed (1 and 2 threads), self-speculative decoding with
# depth drafts and with context drafts, the --base-ce checkpoint, on the idle machine.
# The license texts (/tmp/licenses): GPL-3, Apache-2.0, MPL-2.0, LGPL-3, Artistic from /usr/share/common-licenses, copied as .txt.
set -uo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
PY=.venv/bin/python
OUT=runs/lm/session15
mkdir -p $OUT
CK=runs/lm/base-ce/train/checkpoint.pt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 1 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --ppl-tokens 2048 --text /tmp/licenses --save-json $OUT/decode-1thread.json | tee $OUT/decode-1thread.txt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 2 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --save-json $OUT/decode-2threads.json | tee $OUT/decode-2threads.txt
$PY benchmarks/lm_speculative.py --checkpoint $CK --threads 2 --draft base,none --draft-tokens 1,2,4 \
    --draft-vocab 8192 --min-confidence 0,0.5 --lookup 0,2 --save-json $OUT/speculative.json \
    --plot $OUT/speculative-break-even.png | tee $OUT/speculative.txt
echo MEASURED
