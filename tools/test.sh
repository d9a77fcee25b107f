#!/usr/bin/env bash
# The test command, from a fresh clone: bash tools/test.sh [pytest arguments...]
#
# 1. the pack's environment: a venv (ZEROCON_VENV, default .venv) with CPU torch 2.13.0 and the project with its
#    test extra; reused while pyproject.toml, requirements.txt and the torch pin are unchanged;
# 2. ComfyUI's environment, when a ComfyUI checkout is found (COMFYUI_PATH, default ~/ComfyUI) and COMFYUI_PYTHON
#    is not set: its own venv (ComfyUI needs torchvision and the registry's default torch), cached in
#    ~/.cache/zerocon-ci/comfyui-venv-<key> (ZEROCON_CI_CACHE), keyed by ComfyUI's requirements and ours;
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

echo "== ComfyUI environment"
COMFYUI_PATH=${COMFYUI_PATH:-$HOME/ComfyUI}
if [ -f "$COMFYUI_PATH/comfy/model_base.py" ]; then
  export COMFYUI_PATH
  if [ -z "${COMFYUI_PYTHON:-}" ]; then
    # ComfyUI imports torchvision, which needs the registry's default torch: its own venv, cached
    # between runs (it is ComfyUI's environment, not ours), keyed by its requirements and ours.
    key=$(cat "$COMFYUI_PATH/requirements.txt" requirements.txt | sha256sum | cut -c1-16)
    CVENV="$CACHE/comfyui-venv-$key"
    if [ ! -x "$CVENV/bin/python" ] || [ ! -f "$CVENV/.complete" ]; then
      echo "building $CVENV (torch 2.14.1 + torchvision 0.29.2 + ComfyUI requirements)"
      rm -rf "$CVENV"; mkdir -p "$CACHE"
      "$PY" -m venv "$CVENV"
      "$CVENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.2
      grep -v -E '^(torch|torchvision|torchaudio)([<>=!~ ].*)?$' "$COMFYUI_PATH/requirements.txt" > "$WORK/comfy-req.txt"
      "$CVENV/bin/pip" install -q -r "$WORK/comfy-req.txt" requests pytest
      touch "$CVENV/.complete"
    fi
    # Our own requirements, as ComfyUI-Manager would install them (line by line, torch never), and
    # playwright for the real-browser workflow test (it drives Debian's Chromium; no browser download).
    "$CVENV/bin/pip" install -q -r requirements.txt playwright
    export COMFYUI_PYTHON="$CVENV/bin/python"
  fi
  echo "ComfyUI checkout: $COMFYUI_PATH; its Python: $COMFYUI_PYTHON"
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "${ZEROCON_INSTALL_CHROMIUM:-}" = 1 ]; then
      echo "installing Debian's chromium for the browser workflow test"
      (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed: the browser test will be SKIPPED"
    else
      echo "no chromium on PATH: the browser workflow test will be SKIPPED (apt-get install chromium)"
    fi
  fi
else
  echo "no ComfyUI checkout at $COMFYUI_PATH: the ComfyUI integration tests will be SKIPPED"
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
  echo "ComfyUI integration tests: $(cat "$ZEROCON_REPORT_DIR/comfyui-integration.txt")"
else
  echo "ComfyUI integration tests: NOT RUN (the runner test did not report)"
fi
if [ -f "$ZEROCON_REPORT_DIR/browser-workflows.txt" ]; then
  echo "Real-browser workflow tests:"
  sed 's/^/  /' "$ZEROCON_REPORT_DIR/browser-workflows.txt"
fi
echo "=================================================================="
exit $rc
