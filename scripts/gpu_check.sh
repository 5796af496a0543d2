#!/usr/bin/env bash
# The GPU check of issue 16 on one GPU (<= 8 min): JSON and Markdown in the run directory,
# the table into docs/benchmarks.md. Extra Hydra overrides pass through ("$@").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m sa2va.bench bench=gpu bench.doc=docs/benchmarks.md "$@"
