#!/usr/bin/env bash
# Mutation testing of the checks (issue 19) with mutmut, in a throwaway copy of the
# committed tree: this working tree is never mutated.
#
#   bash scripts/mutation.sh [TIME_LIMIT_S]      # default 1800; needs `pip install mutmut` in .venv
#
# Mutates the validity rules, FLOPs/MFU, leaderboard, summary, loss parity, and the
# record/status and divergence code; runs only their fast unit tests (no trial, no
# SLURM). Prints the survival rate; the survivors are listed in the copy's
# mutmut_results.txt. MUTMUT_REV=COMMIT measures an older revision (only the files and
# tests it has); MUTMUT_WORK=DIR keeps the copy there (default: a new folder in /tmp).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
LIMIT=${1:-1800}
WORK=${MUTMUT_WORK:-$(mktemp -d /tmp/layout-sweep-mutmut.XXXXXX)}
mkdir -p "$WORK"
git -C "$REPO" archive "${MUTMUT_REV:-HEAD}" | tar -x -C "$WORK"
cd "$WORK" || exit 1
"$REPO/.venv/bin/python" - <<'PY'
import os

mutate = ["sweeper/validity.py", "core/flops.py", "analysis/leaderboard.py", "analysis/summary.py",
          "analysis/parity.py", "launch/record.py", "launch/divergence.py"]
tests = ["tests/sweeper/test_validity.py", "tests/test_conf.py", "tests/core/test_flops.py",
         "tests/analysis/test_summary.py", "tests/analysis/test_parity.py", "tests/analysis/test_results.py",
         "tests/launch/test_record.py", "tests/launch/test_divergence.py"]
# Trials and subprocesses: seconds each, times every mutant; the fast tests cover the same code.
slow = ["tests/analysis/test_parity.py::test_on_cpu_a_non_causal_and_a_perturbed_variant_fail_in_the_same_run",
        "tests/analysis/test_parity.py::test_the_report_fails_on_a_missing_parity_folder",
        "tests/launch/test_divergence.py::test_a_diverged_trial_is_recorded_and_never_ranked_or_calibrated_on"]


def have(paths):
    return [p for p in paths if os.path.exists(p.split("::")[0])]


args = ["-p", "no:cacheprovider", "-q"] + [x for s in have(slow) for x in ("--deselect", s)]
with open("pyproject.toml", "a") as f:
    f.write(f"""
[tool.mutmut]
source_paths = ["sweeper", "analysis", "launch"]
only_mutate = {have(mutate)!r}
also_copy = ["conf", "kernels", "hydra_plugins", "benchmarks"]
pytest_add_cli_args = {args!r}
pytest_add_cli_args_test_selection = {have(tests)!r}
""")
PY
export TRITON_INTERPRET=1
echo "mutating in $WORK (limit ${LIMIT} s)"
timeout "$LIMIT" "$REPO/.venv/bin/mutmut" run --max-children 2 > mutmut_run.log 2>&1
echo "mutmut run exit: $? (124: stopped at the time limit)"
"$REPO/.venv/bin/mutmut" results --all true > mutmut_results.txt 2>&1
"$REPO/.venv/bin/python" - <<'PY'
import collections
import re

counts = collections.Counter()
for line in open("mutmut_results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if m:
        counts[m.group(2).strip()] += 1
# "no tests": no fast test reaches the function (the sweep-level tests do); "not checked":
# the time limit came first. The rate is over the mutants that ran.
tested = counts["killed"] + counts["survived"] + counts["timeout"]
print(dict(counts))
if tested:
    print(f"survived {counts['survived']} of {tested} tested mutants: {100 * counts['survived'] / tested:.1f}%")
PY
echo "survivors: grep survived $WORK/mutmut_results.txt; one diff: (cd $WORK && mutmut show NAME)"
