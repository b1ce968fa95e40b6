#!/usr/bin/env bash
# A small bench grid that touches every method, alias and protocol option, for before/after comparisons of a
# refactoring: rows of two runs are compared with benchmarks/compare_rows.py.
# Usage: SRC=<a src/ folder to test, or empty for the installed bnadapt> benchmarks/rows_grid.sh OUTDIR
# Needs ../shared (ResNet-20 weights, CIFAR-10 test images). About 10 minutes on 2 CPU cores.
set -euo pipefail
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${BNADAPT_SHARED:-$ROOT/../shared}
PY=${PYTHON:-$ROOT/.venv/bin/python}
B="env PYTHONPATH=${SRC:-} $PY -m bnadapt"
export BNADAPT_WEIGHTS_DIR=$SHARED/data/weights/akamaster_cifar10_resnet
mkdir -p "$OUT"
"$PY" -c "import numpy as np; d=np.load('$SHARED/data/cifar10/test1000_lossless.npz'); \
np.savez('$OUT/c200.npz', x=d['x'][:200], y=d['y'][:200]); np.save('$OUT/x.npy', d['x'][:40])"
D=generate:cifar:$OUT/c200.npz
run() { $B "$@" --device cpu --no-progress >/dev/null; }
run bench --model cifar10_resnet20 --data $D --methods source,replace,prior,sequential,auto,test-batch,ema,tent \
  --n 8,32 --seeds 0,1 --corruptions gaussian_noise fog contrast --severities 3,5 -b 64 --out "$OUT/a"
run bench --model cifar10_resnet20 --data $D --methods prior,ema --prior 4 --opt order=sequential --n 16 --seeds 0 \
  --corruptions glass_blur jpeg_compression --severities 4 -b 50 --part mean --out "$OUT/b"
run bench --model cifar10_resnet20 --data $D --methods replace,auto,tent --opt select=entropy --opt lr=0.0005 \
  --adapt-on fog:5 --n 16 --seeds 0 --corruptions fog snow --severities 5 --last 5 --out "$OUT/c"
run bank build --model cifar10_resnet20 --data $D --corruptions fog gaussian_noise --severities 5 --n 16 \
  --out "$OUT/bank.safetensors"
run bench --model cifar10_resnet20 --data $D --methods bank --opt bank="$OUT/bank.safetensors" --opt mix=true \
  --corruptions fog gaussian_noise --severities 5 -b 8 --out "$OUT/d"
$B adapt --model cifar10_resnet20 --images "$OUT/x.npy" --n 32 --method prior --prior 8 --seed 3 \
  --out "$OUT/p.safetensors" >/dev/null
$B adapt --model cifar10_resnet20 --images "$OUT/x.npy" --n 32 --method auto --seed 3 --out "$OUT/auto.pt" >/dev/null
echo "grid written to $OUT"
