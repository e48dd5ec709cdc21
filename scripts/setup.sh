#!/usr/bin/env bash
# Installs what building and testing dpo-cluster needs and is missing, once:
#   - Debian packages (a C++ compiler for torch-sys, python3-venv, etcd-server for
#     the end-to-end tests),
#   - a Python venv outside the checkout with torch==2.11.0 (libtorch for tch) and the
#     reference libraries the tests compare against.
# Idempotent: a second run checks and returns in about a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${DPO_VENV:-$HOME/.cache/dpo-cluster/venv}
req="$here/requirements.txt"

log() { printf '[setup] %s\n' "$*" >&2; }

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

command -v g++ >/dev/null || apt_install g++
command -v python3 >/dev/null || apt_install python3 python3-venv
python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
# etcd for the end-to-end tests of the etcd store (Debian's etcd-server, 3.4).
[ -x /usr/bin/etcd ] || command -v etcd >/dev/null || apt_install etcd-server
# A real browser for the test of the coordinator's run page (headless).
command -v chromium >/dev/null || apt_install chromium
command -v cargo >/dev/null || { log "cargo not found: install Rust with rustup first"; exit 1; }

stamp="$venv/.dpo-requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
log "preparing the Python venv at $venv (torch 2.11.0; takes a minute or two the first time)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# --no-cache-dir: the wheels (torch and its CUDA libraries, ~3.5 GB) are not kept a
# second time in ~/.cache/pip; the venv is the cache.
"$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
"$venv/bin/python" -m pip install -q --no-cache-dir -r "$req"
"$venv/bin/python" - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
PY
echo "$want" >"$stamp"
log "venv ready: $venv"
