"""The quality benchmark: metric wiring (torchmetrics on given features), bootstrap intervals, the --quick run."""
import json

import pytest
import torch

from sag_fast import quality
from sag_fast.__main__ import main


def test_fid_of_gaussians_matches_the_closed_form():
    # N(0, I) vs N(1, I) in D dims: FID = |mu1 - mu2|^2 = D (equal covariances); vs itself (new draw): ~0
    g = torch.Generator().manual_seed(0)
    d = 16
    a, b = torch.randn(4000, d, generator=g), torch.randn(4000, d, generator=g)
    assert quality.fid(a, b + 1.0) == pytest.approx(d, rel=0.1)
    assert quality.fid(a, b) < 0.05 * d


def test_bootstrap_intervals():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(500, 8, generator=g), torch.randn(500, 8, generator=g) + 0.5
    point = quality.fid(real, fake)
    boot = quality.bootstrap_fid(real, fake, base=fake, n_boot=30)
    lo, hi = boot["fid_ci"]
    assert lo < hi and lo - 0.5 < point < hi + 0.5
    assert boot["delta_ci"] == [0.0, 0.0]  # the same set as its own baseline: every paired difference is 0
    far = quality.bootstrap_fid(real, fake + 3.0, base=fake, n_boot=30)
    assert far["delta_ci"][0] > 0  # clearly worse than the baseline: the whole interval is above 0


def test_forward_counter_counts_rows():
    net = torch.nn.Conv2d(3, 3, 1)
    c = quality._ForwardCounter(net)
    net(torch.zeros(5, 3, 2, 2))
    net(torch.zeros(2, 3, 2, 2))
    c.remove()
    net(torch.zeros(9, 3, 2, 2))
    assert c.rows == 7


def test_quick_run_reports_a_metric_that_can_fail(tmp_path):
    out = tmp_path / "q.md"
    assert main(["quality", "--quick", "--output", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    refs = report["references"]
    # the data against an independent draw of itself is near zero, noise against the data is far
    assert refs["data vs held-out data"] < 0.05 * refs["noise vs held-out data"]
    rows = {r["name"]: r for r in report["results"]}
    assert set(rows) == {"none", "SAG s=0.75"}
    assert rows["none"]["forwards"] == 4.0 and rows["SAG s=0.75"]["forwards"] == 8.0  # counted, not assumed
    for r in rows.values():
        assert r["fid"] < 0.5 * refs["noise vs held-out data"], "the trained model's samples should beat noise"
    assert rows["SAG s=0.75"]["change"] > 0 and rows["none"]["change"] == 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    text = out.read_text()
    assert "| none |" in text and "ΔFID" in text


@pytest.mark.parametrize("args, word", [
    (["--n", "1"], "--n"),
    (["--steps", "0"], "--steps"),
    (["--settings", "SAG s=9"], "--settings"),
    (["--threads", "0"], "--threads"),
])
def test_bad_quality_arguments_name_the_option(tmp_path, args, word):
    with pytest.raises(SystemExit) as err:
        main(["quality", "--output", str(tmp_path / "q.md"), *args])
    assert word in str(err.value)
