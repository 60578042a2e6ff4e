#!/usr/bin/env bash
# Sets up the environment (once) and runs the whole test suite: ruff, then pytest for each tree,
# then the project's own tests (tests/: the shared files are identical copies).
# Each tree runs in its own pytest process, because SiT-SRA/ and DiT-SRA/ both have a models.py,
# train.py, ... and one interpreter can import only one of each. Within a tree, pytest-xdist runs one
# test module per worker (--dist loadscope: a module's fixtures are built once), a worker per CPU core;
# SRA_TEST_WORKERS=N sets the number (0: no workers, every test in the one process). With several trees, demo/ runs
# in the background beside them.
#   bash run_tests.sh            # everything
#   bash run_tests.sh SiT-SRA    # one tree
#   bash run_tests.sh .          # the project's tests
set -uo pipefail
cd "$(dirname "$0")"
source ./setup_env.sh || exit 1

ruff check . || exit 1

trees=("$@")
[ ${#trees[@]} -gt 0 ] || trees=(SiT-SRA DiT-SRA preprocessing pca-vis demo evaluations benchmarks .)
reports=$(mktemp -d)
status=0
run_tree() {  # tree, workers
  (cd "$1" && python -m pytest -q -p no:cacheprovider -n "$2" --dist loadscope --junitxml="$reports/${1/#./project}.xml" tests)
}
# demo/'s tests wait on one end-to-end run (a single process, about 3 minutes): it runs beside the other trees,
# in one process of its own, instead of keeping a worker's core idle; its output follows theirs.
background=""
if [[ " ${trees[*]} " == *" demo "* && ${#trees[@]} -gt 1 ]]; then
  run_tree demo 0 > "$reports/demo.log" 2>&1 &
  background=$!
fi
for tree in "${trees[@]}"; do
  [ -d "$tree/tests" ] || continue
  [ "$tree" = demo ] && [ -n "$background" ] && continue
  echo "=== $tree"
  run_tree "$tree" "${SRA_TEST_WORKERS:-auto}" || status=1
done
if [ -n "$background" ]; then
  wait "$background" || status=1
  echo "=== demo (beside the others)"
  cat "$reports/demo.log"
fi
python - "$reports" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for path in glob.glob(sys.argv[1] + "/*.xml"):
    for suite in ET.parse(path).getroot().iter("testsuite"):
        total, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += total - f - e - s
        failed += f + e
        skipped += s
print(f"all trees: {passed} passed, {failed} failed, {skipped} skipped")
PY
exit $status
