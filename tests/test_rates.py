"""The cloud-call table of a bundle (`gate.cloud_calls`, `ciar export calibrate`) read by the runtime."""
from __future__ import annotations

import re

import pytest

from ciar.runtime.rates import cloud_calls_per_token, measured_tau


def manifest(taus, calls, prefix=0.06):
    return {"gate": {"prefix_fraction": prefix,
                     "cloud_calls": {"taus": taus, "calls": calls, "prefix_fraction": prefix}}}


M = manifest([1.0, 2.0, 4.0], [0.5, 0.3, 0.1])


def test_measured_tau_interpolates_between_the_measured_taus():
    assert measured_tau(M, 0.5, 0.06, 9.0) == (1.0, "cloud_calls") and measured_tau(M, 0.1, 0.06, 9.0)[0] == 4.0
    assert measured_tau(M, 0.3, 0.06, 9.0)[0] == 2.0
    assert measured_tau(M, 0.4, 0.06, 9.0)[0] == pytest.approx(1.5)
    assert measured_tau(M, 0.2, 0.06, 9.0)[0] == pytest.approx(3.0)


def test_measured_tau_takes_the_lowest_tau_of_a_flat_stretch():
    assert measured_tau(manifest([1.0, 2.0, 3.0], [0.4, 0.2, 0.2]), 0.2, 0.06, 9.0) == (2.0, "cloud_calls")


def test_outside_the_table_the_quantile_tau_but_never_inside_its_range():
    # above what it measured: the quantile tau where it is lower than the table's lowest tau, else that tau
    assert measured_tau(M, 0.7, 0.06, 0.5) == (0.5, "u_quantiles")
    assert measured_tau(M, 0.7, 0.06, 3.0) == (1.0, "cloud_calls")
    # below: the quantile tau where it is higher than the table's highest, else that
    assert measured_tau(M, 0.05, 0.06, 8.0) == (8.0, "u_quantiles")
    assert measured_tau(M, 0.05, 0.06, 1.5) == (4.0, "cloud_calls")


def test_fewer_calls_asked_never_give_a_lower_tau():
    def quantile(rate):  # a quantile table that disagrees with the measured one, as a cloud makes it
        return 3.0 - 4.0 * rate
    taus = [measured_tau(M, r / 100, 0.06, quantile(r / 100))[0] for r in range(0, 71)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))


@pytest.mark.parametrize("m, prefix", [(M, 0.0), ({"gate": {"prefix_fraction": 0.06}}, 0.06)])
def test_no_table_for_this_prefix_is_the_quantile_tau(m, prefix):
    assert measured_tau(m, 0.3, prefix, 7.0) == (7.0, "u_quantiles")


def test_cloud_calls_count_the_prefill_the_prefix_and_the_verifications():
    assert cloud_calls_per_token(15, 40, 256) == (1 + 15 + 40) / 256
    assert cloud_calls_per_token(0, 0, 256) == 1 / 256


def test_load_bundle_refuses_a_broken_cloud_call_table(tmp_path):
    """A hand-edited or truncated table is refused with the field and the fix, not a traceback mid-run."""
    import json
    import shutil
    from pathlib import Path

    from ciar.runtime.bundle import BundleError, load_bundle

    shipped = Path(__file__).parents[1] / "runtime" / "bundles" / "onnx-int8"
    assert load_bundle(shipped).manifest["gate"]["cloud_calls"]["prompts"] >= 2  # the shipped bundle has one
    b = tmp_path / "b"
    shutil.copytree(shipped, b)
    good = json.loads((b / "manifest.json").read_text())
    table = good["gate"]["cloud_calls"]
    for bad, said in (({"taus": table["taus"]}, "needs taus, calls"),
                      ({**table, "calls": table["calls"][:-1]}, "same length"),
                      ({**table, "taus": table["taus"][::-1]}, "ascending"),
                      ({**table, "calls": table["calls"][::-1]}, "not increase"),
                      ({**table, "calls": [2.0] + table["calls"][1:]}, "in [0, 1]"),
                      ({**table, "prefix_fraction": "six"}, "prefix_fraction")):
        (b / "manifest.json").write_text(json.dumps({**good, "gate": {**good["gate"], "cloud_calls": bad}}))
        with pytest.raises(BundleError, match="gate.cloud_calls: .*" + re.escape(said)):
            load_bundle(b)
