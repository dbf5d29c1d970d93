#!/usr/bin/env bash
# Two real searches back to back, the same hour, so their times compare as a ratio (issue #25's "at most 2x
# today's search time"): ResNet-18 CIFAR at 25% with equal compute's flags, first without promotion (-aN), then
# with the search's default promotion (-bN). Each is preceded and followed by a steadiness probe (eight timings of
# the same matrix product, ms; their spread says how noisy the VM was). Pause every other job first.
#
#   bash benchmarks/promotion_rule/pair.sh 3 >> benchmarks/promotion_rule/runs.log 2>&1
#
# The studies land in benchmarks/.promotion-rule/studies and are copied to benchmarks/promotion_rule/studies
# (tracked); `python benchmarks/promotion_replay.py` tables them ("real runs").
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:?which pair: a suffix such as 3}
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
WORK=benchmarks/.promotion-rule/studies
probe() {
  "$PY" - <<'PYEOF'
import time, torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
out = []
for _ in range(8):
    t = time.perf_counter()
    for _ in range(40):
        a @ a
    out.append(1000 * (time.perf_counter() - t) / 40)
print(" ".join(f"{x:.3f}" for x in out), f"spread {(max(out) - min(out)) / min(out):.1%}")
PYEOF
}
search() {
  echo "[$(date +%T)] $ cli.py search ... --study resnet18_cifar-0.25x-$1 ${*:2}"
  "$PY" cli.py search --model resnet18_cifar --weights "$SHARED/models/cifar10_resnet18.pth" --budget-fraction 0.25 \
    --data "imagefolder:$SHARED/data/cifar10" --input-size 32 --mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616 \
    --precision fp32 --trials 30 --finetune-steps 30 --finetune-batch 64 --bn-batches 8 --val-images 2000 \
    --fit-budget --distill 0.5 --studies-dir "$WORK" --quiet --study "resnet18_cifar-0.25x-$1" "${@:2}"
}
echo "=== $(date) promotion rule: ResNet-18 CIFAR at 25%, a$N (no promotion) then b$N (default promotion), at $(git rev-parse --short HEAD)"
probe
search "a$N" --no-promotion
search "b$N"
probe
mkdir -p benchmarks/promotion_rule/studies
cp "$WORK/resnet18_cifar-0.25x-a$N.db" "$WORK/resnet18_cifar-0.25x-b$N.db" benchmarks/promotion_rule/studies/
echo "=== $(date) done"
