#!/bin/sh
# The last device call of a GPU lease (see benchmarks/gpu/suite.py's docstring for the calls before):
# install the carried onnxruntime-gpu beside the machine's own onnxruntime, and the serving wheels
# beside its packages, then run the suite into $OUT/gpu. Each step that fails says so and the
# suite runs anyway: its rows then say what was missing. Extra arguments go to the suite.
#
#   sh benchmarks/gpu/launch.sh                                        # there, from the repository root
#   OUT=/tmp/o GPU_TMP=/tmp/t PYTHON=.venv/bin/python sh benchmarks/gpu/launch.sh --smoke   # a rehearsal here
set -u
: "${OUT:?the device tool sets OUT}"
PYTHON=${PYTHON:-python3}
T=${GPU_TMP:-/tmp}
mkdir -p "$T/parts" "$OUT/gpu"
cp .gpu/parts/*/* "$T/parts/" 2>/dev/null
if [ -d "$T/ort/onnxruntime" ]; then
  echo "onnxruntime-gpu already in $T/ort"
elif ! "$PYTHON" -m benchmarks.gpu.wheel_parts install "$T/parts" --target "$T/ort"; then
  echo "onnxruntime-gpu not installed: the ONNX Runtime rows will run on the CPU"
fi
if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$T/site" .gpu/site/*.whl; then
  echo "serving wheels not installed: the serving step will say so"
fi
# Checkpoints and cached inputs in memory where there is room (tmpfs makes every fsync free).
WORK=${GPU_WORK:-$T/gpu-work}
if [ -z "${GPU_WORK:-}" ] && [ "$(df --output=avail -k /dev/shm 2>/dev/null | tail -1)" -gt 20000000 ] 2>/dev/null; then
  WORK=/dev/shm/gpu-work
fi
PYTHONUNBUFFERED=1 PYTHONPATH="$T/ort${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m benchmarks.gpu.suite \
  --out "$OUT/gpu" --work "$WORK" --data-dir .gpu/data --serving-site "$T/site" "$@" 2>&1 | tee "$OUT/gpu/suite.log"
