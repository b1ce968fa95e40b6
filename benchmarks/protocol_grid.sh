#!/usr/bin/env bash
# Issue 15's grid: every setting x order x batch size, the peers' online BN methods (n = 0, as their papers run them)
# beside ours (n = 32; outside reset also with --refresh 32; bank also with assign=auto), ResNet-20 on CIFAR-10 corrupted on the fly. Resumable:
# rerun the same command to finish.
#
#   bash benchmarks/protocol_grid.sh OUT [JOBS] [ONLY]
#
# ONLY: an extended regex on the configuration tags (setting_order_bB, e.g. 'mixed_.*_b(200|16)'): run just those.
# OUT holds build.npz / eval.npz (the lossless test images 0..499 and 500..999: the bank is built from the first half,
# every method is evaluated on the second) and one bench folder per configuration. JOBS parallel bench processes
# (default 2), each with one torch thread. Cells: the 15 benchmark corruptions at severity 5, 100 images per cell
# (--limit-per-cell, spread evenly); gradual: severities 1..5..1, 40 images per visit. One seed (0).
set -euo pipefail
OUT=${1:?usage: protocol_grid.sh OUT [JOBS] [ONLY]}
JOBS=${2:-2}
ONLY=${3:-.*}
BNADAPT=${BNADAPT:-bnadapt}
PY=${PYTHON:-python}
jobs_file=$(mktemp)
for setting in reset continual mixed gradual; do
  for order in shuffled dirichlet:0.1; do
    for b in 200 16 1; do
      if [ "$setting" = gradual ]; then cells="--severities 1-5 --limit-per-cell 40"; else cells="--severities 5 --limit-per-cell 100"; fi
      tag="${setting}_${order/:/}_b${b}"
      common="--model cifar10_resnet20 --data generate:cifar:eval.npz --corruptions common $cells --setting $setting --order $order -b $b --no-plots --no-progress --resume"
      echo "$BNADAPT bench $common --methods source,test-batch,ema,rbn,dua,tent --n 0 --out peers_$tag" >> "$jobs_file"
      echo "$BNADAPT bench $common --methods source,prior,auto,bank --n 32 --opt bank=bank.safetensors --out ours_$tag" >> "$jobs_file"
      echo "$BNADAPT bench $common --methods source,bank --n 32 --opt bank=bank.safetensors --opt assign=auto --out banka_$tag" >> "$jobs_file"
      # Outside reset, the offline estimators once more, adapting again every 32 images on the latest 32 (--refresh).
      [ "$setting" = reset ] || echo "$BNADAPT bench $common --methods source,prior,auto --n 32 --refresh 32 --out refresh_$tag" >> "$jobs_file"
    done
  done
done
if ! grep -qE -- "--out (peers|ours|refresh|banka)_(${ONLY})\$" "$jobs_file"; then
  echo "protocol_grid.sh: no configuration matches '$ONLY' (tags look like reset_shuffled_b200, gradual_dirichlet0.1_b1)" >&2
  rm -f "$jobs_file"
  exit 2
fi
mkdir -p "$OUT"
cd "$OUT"
if [ ! -f eval.npz ]; then
  "$PY" - <<'PYEOF'
import os
import numpy as np
shared = os.environ.get("BNADAPT_SHARED", "../shared")
d = np.load(f"{shared}/data/cifar10/test1000_lossless.npz")
np.savez("build.npz", x=d["x"][:500], y=d["y"][:500])
np.savez("eval.npz", x=d["x"][500:], y=d["y"][500:])
PYEOF
fi
[ -f bank.safetensors ] || OMP_NUM_THREADS=1 "$BNADAPT" bank build --model cifar10_resnet20 \
  --data generate:cifar:build.npz --corruptions common --severities 1,3,5 --n 64 --seed 0 --out bank.safetensors
# Longest first: gradual and b=1 runs, then the rest.
grep -E -- "--out (peers|ours|refresh|banka)_(${ONLY})\$" "$jobs_file" | sort -t_ -k1,1 | awk '/gradual/ {print 0 "\t" $0; next} / -b 1 / {print 1 "\t" $0; next} {print 2 "\t" $0}' \
  | sort -s -k1,1n | cut -f2- | OMP_NUM_THREADS=1 xargs -P "$JOBS" -I{} sh -c '{} > /dev/null 2>> grid.log || echo "FAILED: {}" >> grid.log'
rm -f "$jobs_file"
echo "done: $(ls -d peers_* ours_* refresh_* banka_* 2>/dev/null | wc -l) folders in $OUT"
