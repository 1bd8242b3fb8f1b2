#!/usr/bin/env bash
# Check that the edge screener runs in a fresh virtualenv WITHOUT TensorFlow.
#
# Usage: edge/check_fresh_venv.sh MODEL SOURCE [SOURCE...] [screen.py options]
#
#   1. creates a fresh venv in a temporary directory ($PYTHON -m venv, default python3);
#   2. pip-installs edge/requirements.txt plus opencv-python-headless into it;
#   3. asserts `import tensorflow` FAILS in that venv;
#   4. runs `python edge/screen.py --model MODEL SOURCE...` there (isolated mode,
#      so nothing from the repository or PYTHONPATH leaks in) and checks that it
#      exits 0 and that its last stdout line is a {"summary": ...} JSON line.
#
# Exit status: 0 all checks passed, 1 a check failed, 2 bad usage.
# Set KEEP_VENV=1 to keep the temporary directory for inspection.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

if [ "$#" -lt 2 ]; then
    echo "usage: $0 MODEL SOURCE [SOURCE...] [screen.py options]" >&2
    exit 2
fi
model="$1"
shift

fail() {
    echo "check_fresh_venv: FAIL: $*" >&2
    exit 1
}

tmp="$(mktemp -d "${TMPDIR:-/tmp}/edge-venv.XXXXXX")"
if [ "${KEEP_VENV:-0}" = "1" ]; then
    echo "check_fresh_venv: keeping $tmp"
else
    trap 'rm -rf "$tmp"' EXIT
fi

echo "check_fresh_venv: creating venv with $("$python" --version 2>&1) in $tmp/venv"
"$python" -m venv "$tmp/venv"
venv_py="$tmp/venv/bin/python"
# Nothing from the caller's environment may leak into the venv's interpreter.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV

echo "check_fresh_venv: installing edge/requirements.txt + opencv-python-headless"
"$venv_py" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements.txt" opencv-python-headless \
    || fail "pip install failed"
"$venv_py" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -i -E '^(numpy|pillow|ai-edge-litert|opencv-python-headless) ' || true

if "$venv_py" -I -c "import tensorflow" >/dev/null 2>&1; then
    fail "tensorflow is importable in the fresh venv (it must not be installed)"
fi
echo "check_fresh_venv: ok: tensorflow is not importable in the venv"

echo "check_fresh_venv: running edge/screen.py --model $model $*"
set +e
"$venv_py" -I "$here/screen.py" --model "$model" "$@" >"$tmp/stdout" 2>"$tmp/stderr"
rc=$?
set -e
cat "$tmp/stdout"
sed 's/^/  stderr: /' "$tmp/stderr" >&2
[ "$rc" -eq 0 ] || fail "edge/screen.py exited with $rc (expected 0)"
tail -n 1 "$tmp/stdout" | "$venv_py" -I -c '
import json, sys
record = json.loads(sys.stdin.read())
assert set(record) == {"summary"}, record
summary = record["summary"]
assert {"n", "poisoned", "clean", "errors", "mean_latency_ms", "threshold"} <= set(summary), summary
' || fail "the last stdout line is not a summary JSON line"
echo "check_fresh_venv: PASS (exit 0, summary printed, no TensorFlow)"
