#!/usr/bin/env bash
# The GPU numbers on a lent device machine: the CUDA tests, then each benchmark suite at the H100 sizes,
# one suite per call (each device command is limited to 10 minutes). Results land in $OUT.
#
# The device's python has torch (CUDA), gpytorch, linear_operator and botorch but not pyro-ppl, so first,
# here (wheels are pure Python; the folder must be git-ignored: echo /.whl/ >> .git/info/exclude):
#     python -m pip download --no-deps -d .whl pyro-ppl pyro-api opt_einsum
# then one device `run` per suite, carrying .whl:
#     bash benchmarks/device_run.sh tests         # CUDA tests (tests/test_cuda.py, tests/models/test_cuda_models.py)
#     bash benchmarks/device_run.sh covariance    # then iterative, models, scaling, overhead, matrix_free
#     bash benchmarks/device_run.sh distributed   # one GPU's throughput for the multi-GPU estimate (one rank)
set -euo pipefail
what=${1:?usage: device_run.sh tests|covariance|iterative|models|scaling|overhead|matrix_free|distributed}
out=${OUT:-bench_out_gpu}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
if [ "$what" = tests ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/models/test_cuda_models.py 2>&1 | tee "$out/cuda_tests.log"
    exit "${PIPESTATUS[0]}"
fi
if [ "$what" = distributed ]; then  # the partitioned engine's single-device value + gradient, library defaults
    python3 benchmarks/bench_distributed.py --device cuda --worlds 1 --n 200000 --num-probes 32 --precond-rank 256 \
        --json "$out/distributed.json" 2>&1 | tee "$out/distributed.log"
    exit "${PIPESTATUS[0]}"
fi
all=covariance,iterative,models,scaling,overhead,lifted,matrix_free
skip=$(echo "$all" | tr , '\n' | grep -vx "$what" | paste -sd, -)
python3 benchmarks/run_all.py --device cuda --size full --out "$out" --skip "$skip" 2>&1 | tee "$out/$what.log"
