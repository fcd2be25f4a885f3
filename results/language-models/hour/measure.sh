#!/usr/bin/env bash
# Session 14 measurements on the idle machine, after the fine-tunes: decoding speed (1 and 2 threads), then
# self-speculative decoding with the fine-tuned checkpoint.
# The license texts (/tmp/licenses): GPL-3, Apache-2.0, MPL-2.0, LGPL-3, Artistic from /usr/share/common-licenses, copied as .txt.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
PY=.venv/bin/python
OUT=runs/lm/long
CK=$OUT/train/checkpoint.pt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 1 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --ppl-tokens 2048 --text /tmp/licenses --save-json $OUT/decode-1thread.json | tee $OUT/decode-1thread.txt
$PY benchmarks/lm_decode.py --checkpoint $CK --threads 2 --depths super,base --dtypes float32,bfloat16 \
    --new-tokens 32 --repeats 3 --save-json $OUT/decode-2threads.json | tee $OUT/decode-2threads.txt
$PY benchmarks/lm_speculative.py --checkpoint $CK --threads 2 --draft base --draft-tokens 1,2,3 --draft-vocab 0,8192 \
    --min-confidence 0,0.5 --save-json $OUT/speculative.json --plot $OUT/speculative-break-even.png | tee $OUT/speculative.txt
.venv/bin/adn eval-lm --checkpoint $CK --threads 1 --eval-tokens 4096 --new-tokens 32 --repeats 2 --no-naive \
    --save-json $OUT/depth-table.json --overwrite | tee $OUT/depth-table.txt
echo MEASURED
