# Sourced by scripts/demo and scripts/test: make (or refresh) the virtual
# environment they run in. Variables:
#   SESSIONGUARD_VENV        where the venv lives (default .venv)
#   SESSIONGUARD_SQLALCHEMY  the SQLAlchemy requirement (default: newest 2.1.x)
#   PYTHON                   the interpreter to build it from (default python3)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SESSIONGUARD_VENV:-$root/.venv}
sqlalchemy_spec=${SESSIONGUARD_SQLALCHEMY:-"sqlalchemy[asyncio]>=2.1,<2.2"}
python=${PYTHON:-python3}

if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found; install Python >= 3.10 (Debian: apt-get install python3)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "python3 -m venv failed: installing Debian's python3-venv" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv "$venv"
        else
            echo "error: '$python -m venv' failed; install python3-venv (Debian) and retry" >&2
            exit 1
        fi
    fi
fi

# Reinstall when pyproject.toml or the SQLAlchemy requirement changed.
stamp="$venv/.sessionguard-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $sqlalchemy_spec"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up $venv ($sqlalchemy_spec)" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -U "pip>=25.1"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -e "$root" --group "$root/pyproject.toml:dev" "$sqlalchemy_spec"
    printf '%s' "$want" >"$stamp"
fi
export PATH="$venv/bin:$PATH"
