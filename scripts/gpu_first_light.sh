#!/usr/bin/env bash
# GPU first light in one command: wheels, environment, sweep and gate, each within its own time
# budget (8 minutes in all), everything packed into OUTDIR/first_light.tar.gz after every stage.
#
#   bash scripts/gpu_first_light.sh OUTDIR [--smoke] [--copy-to DIR] [--stage-timeout STAGE=SECONDS]
#
# --smoke rehearses it on a CPU machine with tiny cases. The stages run the harness from this
# checkout with ${PYTHON:-python3}; scripts/gpu_first_light.py says what each stage does.
# docs/gpu.md: how to run it on a lent GPU machine in one call.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_first_light.py" "$@"
