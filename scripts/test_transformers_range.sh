#!/usr/bin/env bash
# The Hugging Face integration tests against both ends of the transformers range Twilight declares
# (twilight.integrations.hf.compat.SUPPORTED_TRANSFORMERS, the same as pyproject.toml): the oldest supported
# release and the newest one pip resolves today, each in its own virtual environment. The environments
# share this Python's other packages (--system-site-packages: torch, the editable twilight, pytest) and hold
# only their own transformers; they are kept in $TWILIGHT_VENVS (default .venvs/) and reused.
# Called by scripts/test.sh after the main suite; extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
root=${TWILIGHT_VENVS:-.venvs}
read -r spec oldest < <(python -c "from twilight.integrations.hf import compat
print(compat.SUPPORTED_TRANSFORMERS, compat.OLDEST_TRANSFORMERS)") || exit 1
here=$(python -c "import transformers; print(transformers.__version__)") || exit 1
tests=(tests/integrations tests/eval/test_cli.py tests/bench/test_e2e.py)
status=0
for end in oldest newest; do
  venv="$root/transformers-$end"
  [ -x "$venv/bin/python" ] || python -m venv --system-site-packages "$venv" || exit 1
  if [ "$end" = oldest ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$oldest" || exit 1
  else
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "transformers$spec" || exit 1
  fi
  version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)") || exit 1
  if [ "$end" = newest ] && [ "$version" = "$here" ]; then
    echo "== transformers $version (newest of $spec) is the main environment's: its run above covered it"
    continue
  fi
  echo "== integration tests with transformers $version ($end of $spec), in $venv"
  TRITON_INTERPRET=1 "$venv/bin/python" -m pytest "${tests[@]}" -q -ra -p no:cacheprovider "$@" || status=1
done
exit "$status"
