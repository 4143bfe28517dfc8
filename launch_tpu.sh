#!/usr/bin/env bash
# Cloud TPU pod launcher. Not implemented yet (see the multi-host issue).
set -euo pipefail
echo "launch_tpu.sh: not yet implemented; run on CPU with python -m trainer.main" >&2
exit 2
