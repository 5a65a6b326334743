#!/usr/bin/env bash
# The Hugging Face integration tests against both ends of the transformers range Twilight declares
# (twilight.integrations.hf.compat.SUPPORTED_TRANSFORMERS, the same as pyproject.toml): the oldest supported
# release and the newest one pip resolves today, each in its own virtual environment. The environments
# share this Python's other packages (--system-site-packages, and this virtual environment's packages when run
# from one: torch, the editable twilight, pytest) and hold only their own transformers; they are kept in $TWILIGHT_VENVS (default .venvs/) and reused.
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
  if [ ! -x "$venv/bin/python" ]; then
    python -m venv --system-site-packages "$venv" || exit 1
    # Run from inside a virtual environment, "system" site-packages are its base interpreter's, not this
    # environment's (torch, the editable twilight): list this one's after the new environment's own, so that only
    # transformers differs (its own site-packages come first on sys.path).
    python - "$venv" <<'PY' || exit 1
import site, subprocess, sys
if sys.prefix != sys.base_prefix:
    child = subprocess.check_output([f"{sys.argv[1]}/bin/python", "-c",
                                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(f"{child}/_twilight_parent_env.pth", "w") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages())
PY
  fi
  if [ "$end" = oldest ]; then
    # transformers 5.0.0 imports the optional `kernels` package when present, and kernels 0.15 on (the newest
    # transformers requires it) no longer accept its hub-layer declarations: its import fails. Give the oldest
    # environment a kernels of its own era.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "transformers==$oldest" "kernels<0.15" || exit 1
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
