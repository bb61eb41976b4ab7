# Sourced by run_all.sh and run_tests.sh: makes sure the system library and the Python venv
# exist, then activates the venv. Idempotent and quick when everything is there.
#   DIFFID_VENV   where the venv lives (default: outside the clone, keyed by the requirements,
#                 so CI and every checkout with the same requirements share one)
set -e
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Headless OpenGL for pyrender: Debian's OSMesa.
if ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing libosmesa6 (headless OpenGL) with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 >/dev/null
  else
    echo "setup: libOSMesa is missing; run: sudo apt-get update && sudo apt-get install -y libosmesa6" >&2
    exit 2
  fi
fi

_key=$(cat "$_here/requirements.txt" "$_here/constraints.txt" | sha256sum | cut -c1-12)
DIFFID_VENV="${DIFFID_VENV:-$HOME/.cache/diff-id/venv-$_key}"
if [ ! -f "$DIFFID_VENV/.complete" ]; then
  mkdir -p "$(dirname "$DIFFID_VENV")"
  exec 9>"$DIFFID_VENV.lock"; flock 9   # two set-ups at once (parallel jobs): the second waits
  if [ ! -f "$DIFFID_VENV/.complete" ]; then
    echo "setup: creating venv $DIFFID_VENV (first time only: about 2 minutes)"
    rm -rf "$DIFFID_VENV"
    python3 -m venv "$DIFFID_VENV"
    "$DIFFID_VENV/bin/pip" install -q --upgrade pip
    "$DIFFID_VENV/bin/pip" install -q -r "$_here/requirements.txt" -c "$_here/constraints.txt"
    touch "$DIFFID_VENV/.complete"   # only a finished install counts: an interrupted one is redone
  fi
  exec 9>&-
fi
source "$DIFFID_VENV/bin/activate"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-osmesa}"
# torch's OpenMP threads sleep when idle instead of spinning: with another busy process on the
# same cores, spinning threads steal each other's time and a training step slows many times over
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
set +e
