#!/usr/bin/env bash
# Upload the offline W&B runs of `logger=wandb` jobs (written offline when WANDB_API_KEY was
# not set) once a key is available:
#   WANDB_API_KEY=... scripts/wandb_sync.sh [ROOT] [wandb sync options]
#   scripts/wandb_sync.sh outputs/train/multiruns/<sweep> --dry-run    # list, upload nothing
# ROOT (default outputs) is searched for */wandb/offline-run-*; each is passed to `wandb sync`,
# which skips runs it has already uploaded. The key is read from the environment only.
set -euo pipefail

root="${1:-outputs}"
shift || true
[[ -d "$root" ]] || { echo "$root: no such directory" >&2; exit 1; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python=python3

mapfile -t runs < <(find "$root" -type d -path '*/wandb/offline-run-*' -prune | sort)
if ((${#runs[@]} == 0)); then
    echo "no offline W&B runs under $root" >&2
    exit 0
fi
echo "${#runs[@]} offline W&B runs under $root" >&2
exec "$python" -m wandb sync "$@" "${runs[@]}"
