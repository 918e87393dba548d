#!/usr/bin/env bash
# Issue 10's GPU checks as one command, for a session lent the device machine (DEVELOPERS.md):
#
#   .venv/bin/pip wheel -q --no-deps fairscale==0.4.13 -w .whl     # here, once (.whl is ignored)
#   run(command="bash bench/device_run.sh", carry=[".whl"], timeout_s=480)
#
# That machine has torch (2.11 when last seen) with CUDA, sentencepiece and pytest, but no Ray
# and no fairscale: fairscale travels as a wheel. It runs the GPU test tier (the captured decode
# against the eager one, Meta's tokens on CUDA, an overlapped engine under CUDA's sync debug
# mode), then bench/engine_decode.py on the 7B shape; the logs come back under $OUT. About 5
# minutes (never run yet: allow the timeout's margin for a second try).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" | tail -30
timeout 300 python3 bench/engine_decode.py --shape 7b 2>&1 | tee "$OUT/bench_7b.log"
