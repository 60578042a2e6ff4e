"""check_suite.sh and compare_with_suite.py: offline, the script stops with one line at once; on a tiny fake pair of
batches under the suite's names (already in its cache, so nothing is downloaded) it prints ours beside the published
figures with the differences. Every run points the proxies at a closed local port, so nothing leaves the machine."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import TREE, random_images

import compare_with_suite
from compare_with_suite import PUBLISHED, REF_NAME, SAMPLE_NAME, comparison_lines, read_figures
from errors import UserError
from inception import WEIGHTS_URL

OFFLINE = {name: "http://127.0.0.1:9" for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")}


def run_check_suite(cache, *flags):
    env = {**os.environ, **OFFLINE, "SUITE_CACHE": str(cache), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "no_proxy": "", "NO_PROXY": ""}
    return subprocess.run(["bash", "evaluations/check_suite.sh", *flags], cwd=TREE.parent, env=env,
                          capture_output=True, text=True, timeout=300)


def test_offline_it_stops_at_once_with_one_line(tmp_path):
    result = run_check_suite(tmp_path / "cache")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: cannot reach https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
                             f"ref_batches/imagenet/256/{REF_NAME} (no internet?); check_suite.sh needs it once, then "
                             f"reads {tmp_path / 'cache' / REF_NAME}\n")
    assert list((tmp_path / "cache").iterdir()) == []


def test_on_a_fake_pair_it_prints_ours_beside_the_published_figures(inception_weights, tmp_path):
    """Both fake batches store their statistics (N(0.5, 0.3 I) vs N(0.1, 0.2 I), sFID N(0, I) vs N(1, 4 I)), so our
    FID and sFID are known; the table's columns are the JSON's figures, the published ones and their difference."""
    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / REF_NAME, arr_0=random_images(6, size=16, seed=1), mu=np.full(2048, 0.5),
             sigma=0.3 * np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    np.savez(cache / SAMPLE_NAME, arr_0=random_images(5, size=16, seed=2), mu=np.full(2048, 0.1),
             sigma=0.2 * np.eye(2048), mu_s=np.ones(2023), sigma_s=4 * np.eye(2023))
    shutil.copy(inception_weights, cache / WEIGHTS_URL.rsplit("/", 1)[1])
    result = run_check_suite(cache, "--device", "cpu", "--unverified-weights", "--split-size", "5")
    assert result.returncode == 0, result.stderr[-3000:]

    ours = json.loads((cache / "ours.json").read_text())
    assert ours["fid"] == pytest.approx(2048 * (0.4 ** 2 + 0.3 + 0.2 - 2 * np.sqrt(0.06)), rel=1e-9)
    assert ours["sfid"] == pytest.approx(2023 * 2, rel=1e-9)
    lines = result.stdout.splitlines()
    assert lines[:5] == [f"{name}: {ours[key]}" for key, (name, _) in PUBLISHED.items()]  # the evaluator's lines
    table = lines[6:]
    assert len(table) == 5 and "warning: " in result.stderr and "unverified Inception weights" in result.stderr
    for row, (key, (name, published)) in zip(table, PUBLISHED.items(), strict=True):
        assert row.startswith(name)
        mine, theirs, diff, percent = (float(x.rstrip("%")) for x in row[len(name):].split())
        assert mine == pytest.approx(ours[key], abs=1e-6) and theirs == pytest.approx(published, abs=1e-6)
        assert diff == pytest.approx(ours[key] - published, abs=2e-6)
        assert percent == pytest.approx(100 * (ours[key] - published) / published, abs=0.006)


def test_comparison_of_known_figures():
    ours = {"inception_score": 220.0, "fid": 3.9425574129223264, "sfid": 6.0, "precision": 0.8, "recall": 0.5309}
    header, *rows = comparison_lines(ours)
    assert header.split() == ["ours", "suite", "(TF)", "difference"]
    assert rows[0].split() == ["Inception", "Score", "220.000000", "215.837036", "+4.162964", "+1.93%"]
    assert rows[1].split() == ["FID", "3.942557", "3.942557", "+0.000000", "+0.00%"]
    assert rows[2].split() == ["sFID", "6.000000", "6.140434", "-0.140434", "-2.29%"]
    assert rows[3].split() == ["Precision", "0.800000", "0.826500", "-0.026500", "-3.21%"]


def test_a_json_of_another_pair_is_named_in_a_warning(tmp_path, capsys):
    figures = {key: 1.0 for key in PUBLISHED}
    (tmp_path / "ours.json").write_text(json.dumps({"ref_batch": "a/ref.npz", "sample_batch": "b/mine.npz", **figures}))
    compare_with_suite.main([str(tmp_path / "ours.json")])
    out, err = capsys.readouterr()
    assert err == (f"warning: {tmp_path / 'ours.json'} scores mine.npz against ref.npz; the published figures are for "
                   f"{SAMPLE_NAME} against {REF_NAME}\n")
    assert len(out.splitlines()) == 6


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "is not the JSON that evaluator.py --json writes"),
    (json.dumps({"fid": 1.0}), r"has no figures \['inception_score', 'sfid', 'precision', 'recall'\]"),
    (json.dumps([1, 2]), "has no figures"),
])
def test_a_bad_json_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "ours.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as error:
        read_figures(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
