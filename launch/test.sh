#!/usr/bin/env bash
# The test command: sets up the environment, then runs the suite on 2 workers.
#   default: everything except tests marked slow
#   UNCLIP_TEST_ALL=1: the slow end-to-end tests too (CI)
# Extra arguments go to pytest.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$root/launch/setup_env.sh" | tail -n 1)" || { echo "environment set-up failed" >&2; exit 1; }
cd "$root"
marker=(-m "not slow")
[[ "${UNCLIP_TEST_ALL:-0}" == "1" ]] && marker=()
"$venv/bin/python" -m pytest -n "${UNCLIP_TEST_WORKERS:-2}" "${marker[@]}" "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: treating an empty run as a failure" >&2
  exit 1
fi
exit $rc
