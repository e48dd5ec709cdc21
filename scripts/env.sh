# Source this to use plain `cargo` the way `make` does:  . scripts/env.sh
# tch's build finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH=1).
export DPO_VENV="${DPO_VENV:-$HOME/.cache/dpo-cluster/venv}"
export VIRTUAL_ENV="$DPO_VENV"
export PATH="$DPO_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export DPO_PYTHON="$DPO_VENV/bin/python"
