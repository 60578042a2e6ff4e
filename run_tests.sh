#!/usr/bin/env bash
# Sets up the environment (once) and runs the whole test suite: ruff, then pytest for each tree,
# then the project's own tests (tests/: the shared files are identical copies).
# Each tree runs in its own pytest process, because SiT-SRA/ and DiT-SRA/ both have a models.py,
# train.py, ... and one interpreter can import only one of each. Within a tree, pytest-xdist runs one
# test module per worker (--dist loadscope: a module's fixtures are built once), a worker per CPU core;
# SRA_TEST_WORKERS=N sets the number (0: no workers, every test in the one process).
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
for tree in "${trees[@]}"; do
  [ -d "$tree/tests" ] || continue
  echo "=== $tree"
  (cd "$tree" && python -m pytest -q -p no:cacheprovider -n "${SRA_TEST_WORKERS:-auto}" --dist loadscope \
     --junitxml="$reports/${tree/#./project}.xml" tests) || status=1
done
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
