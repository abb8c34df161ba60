#!/usr/bin/env bash
# The one command a lent GPU machine runs: the gpu-marked tests, then the paper-scale timings.
#
# That machine has Python 3.12 with torch, triton and numpy but none of the project's other packages and
# no network: they travel as wheels in .whl/ (see docs/benchmarks/README.md for how to fetch them).
# Everything the run writes goes under $OUT (default: /tmp/gpu_checks); each step has its own time
# limit so a slow step cannot starve the next, and gpu_timings.py saves its report after every unit.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 MUJOCO_GL=disable  # no rendering; the image has no libEGL
nvidia-smi -L 2>&1 | tee "$OUT/machine.txt"
python3 -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/machine.txt"
timeout "${GPU_TESTS_S:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py) 2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests exit: $?" | tee -a "$OUT/gpu_tests.log"
timeout "${GPU_TIMINGS_S:-330}" python3 benchmarks/gpu_timings.py --device cuda --out "$OUT/gpu_timings.md" 2>&1 | tee "$OUT/gpu_timings.log"
echo "gpu timings exit: $?"
