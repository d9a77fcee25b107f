#!/usr/bin/env bash
# The test command, from a fresh clone: bash tools/test.sh [pytest arguments...]
#
# 1. the pack's environment: a venv (ZEROCON_VENV, default .venv) with CPU torch 2.13.0 and the project with its
#    test extra; reused while pyproject.toml, requirements.txt and the torch pin are unchanged;
# 2. ComfyUI's environments, one per ComfyUI checkout found (COMFYUI_PATHS, colon-separated, else COMFYUI_PATH,
#    else ~/ComfyUI-0.33.0, ~/ComfyUI-0.3.64 and ~/ComfyUI), unless COMFYUI_PYTHON is set: each its own venv
#    (ComfyUI needs torchvision and torchaudio with the registry's torch), cached in
#    ~/.cache/zerocon-ci/comfyui-venv-<key> (ZEROCON_CI_CACHE), keyed by that ComfyUI's requirements and ours;
# 2b. comfy-cli for the Registry check (comfy node validate), in its own venv cached beside ComfyUI's, unless
#    COMFY_CLI is set or comfy is on PATH;
# 3. lint: ruff check . and ruff format --check . must pass before any test runs;
# 4. python -m pytest with the arguments given (none: the whole suite), then whether the ComfyUI integration
#    tests RAN or were SKIPPED, and the real-browser workflow report.
# ZEROCON_INSTALL_CHROMIUM=1 installs Debian's chromium for the browser test when it is missing (CI does).
# Exit code: pytest's (lint failures: 1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${ZEROCON_CI_CACHE:-$HOME/.cache/zerocon-ci}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
TORCH=torch==2.13.0

echo "== pack environment (venv: CPU torch 2.13.0 + the project with its test extra)"
VENV=${ZEROCON_VENV:-$ROOT/.venv}
stamp=$( (cat pyproject.toml requirements.txt; echo "$TORCH"; "$PY" -V) | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.zerocon-stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "reusing $VENV"
else
  echo "building $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH"
  "$VENV/bin/pip" install -q -e ".[test]"
  echo "$stamp" > "$VENV/.zerocon-stamp"
fi

echo "== ComfyUI environments"
# Every ComfyUI checkout the suite runs on: COMFYUI_PATHS (colon-separated), else COMFYUI_PATH, else the
# supported versions' usual places (~/ComfyUI-0.33.0, ~/ComfyUI-0.3.64) and ~/ComfyUI. Each gets its own venv.
COMFY_TORCH="torch==2.9.1 torchvision==0.24.1 torchaudio==2.9.1"  # a trio the registry has; 0.33 imports torchaudio
targets=""
IFS=: read -r -a candidates <<< "${COMFYUI_PATHS:-${COMFYUI_PATH:-$HOME/ComfyUI-0.33.0:$HOME/ComfyUI-0.3.64:$HOME/ComfyUI}}"
for comfy in "${candidates[@]}"; do
  [ -f "$comfy/comfy/model_base.py" ] || continue
  comfy=$(cd "$comfy" && pwd -P)
  case ";$targets" in *";$comfy="*) continue ;; esac
  py=${COMFYUI_PYTHON:-}
  if [ -z "$py" ]; then
    # ComfyUI imports torchvision (and, from 0.33 on, torchaudio), which need the registry's torch: a venv of
    # its own, cached between runs (it is ComfyUI's environment, not ours), keyed by its requirements and ours.
    key=$( (cat "$comfy/requirements.txt" requirements.txt; echo "$COMFY_TORCH") | sha256sum | cut -c1-16)
    CVENV="$CACHE/comfyui-venv-$key"
    if [ ! -x "$CVENV/bin/python" ] || [ ! -f "$CVENV/.complete" ]; then
      echo "building $CVENV ($COMFY_TORCH + the requirements of $comfy)"
      rm -rf "$CVENV"; mkdir -p "$CACHE"
      "$PY" -m venv "$CVENV"
      # shellcheck disable=SC2086
      "$CVENV/bin/pip" install -q $COMFY_TORCH
      grep -v -E '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$comfy/requirements.txt" > "$WORK/comfy-req.txt"
      "$CVENV/bin/pip" install -q -r "$WORK/comfy-req.txt" requests pytest
      touch "$CVENV/.complete"
    fi
    # Our own requirements, as ComfyUI-Manager would install them (line by line, torch never), and
    # playwright for the real-browser workflow test (it drives Debian's Chromium; no browser download).
    "$CVENV/bin/pip" install -q -r requirements.txt playwright
    py="$CVENV/bin/python"
  fi
  echo "ComfyUI checkout: $comfy ($(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py" 2>/dev/null)); its Python: $py"
  targets="$targets$comfy=$py;"
done
if [ -n "$targets" ]; then
  export ZEROCON_COMFYUI_TARGETS="$targets"
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "${ZEROCON_INSTALL_CHROMIUM:-}" = 1 ]; then
      echo "installing Debian's chromium for the browser workflow test"
      (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the browser test will be SKIPPED"
    else
      echo "no chromium on PATH: the browser workflow test will be SKIPPED (apt-get install chromium)"
    fi
  fi
else
  echo "no ComfyUI checkout found (${candidates[*]}): the ComfyUI integration tests will be SKIPPED"
fi

echo "== comfy-cli (for the Registry check, comfy node validate)"
if [ -z "${COMFY_CLI:-}" ] && ! command -v comfy >/dev/null 2>&1; then
  # Its own small venv, cached like ComfyUI's: comfy-cli is a tool we run, not a dependency of the pack.
  CLIVENV="$CACHE/comfy-cli-venv-1.23.0"
  if [ ! -x "$CLIVENV/bin/comfy" ] || [ ! -f "$CLIVENV/.complete" ]; then
    rm -rf "$CLIVENV"; mkdir -p "$CACHE"
    if "$PY" -m venv "$CLIVENV" && "$CLIVENV/bin/pip" install -q comfy-cli==1.23.0; then
      touch "$CLIVENV/.complete"
    else
      echo "comfy-cli could not be installed: the comfy node validate test will be SKIPPED"
    fi
  fi
  [ -f "$CLIVENV/.complete" ] && export COMFY_CLI="$CLIVENV/bin/comfy"
fi
echo "comfy-cli: ${COMFY_CLI:-$(command -v comfy || echo none)}"

echo "== lint (ruff check . ; ruff format --check .)"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .

echo "== tests (python -m pytest $*)"
export ZEROCON_REPORT_DIR=${ZEROCON_REPORT_DIR:-$WORK/report}
export ZEROCON_BROWSER_CACHE=${ZEROCON_BROWSER_CACHE:-$CACHE/browser-models}  # random-weight checkpoints (~2.6 GB), built once
rm -f "$ZEROCON_REPORT_DIR/comfyui-integration.txt" "$ZEROCON_REPORT_DIR/browser-workflows.txt"
set +e
( source "$VENV/bin/activate" && python -m pytest "$@" )
rc=$?
set -e
echo "=================================================================="
if [ -f "$ZEROCON_REPORT_DIR/comfyui-integration.txt" ]; then
  echo "ComfyUI integration tests (one line per ComfyUI checkout):"
  sed 's/^/  /' "$ZEROCON_REPORT_DIR/comfyui-integration.txt"
else
  echo "ComfyUI integration tests: NOT RUN (the runner test did not report)"
fi
if [ -f "$ZEROCON_REPORT_DIR/browser-workflows.txt" ]; then
  echo "Real-browser workflow tests:"
  sed 's/^/  /' "$ZEROCON_REPORT_DIR/browser-workflows.txt"
fi
echo "=================================================================="
exit $rc
