"""`ciar generate`, `ciar eval` and `ciar bench methods` as a user runs them, on smoke-trained weights."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

CIAR = str(Path(sys.executable).parent / "ciar")


def ciar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CIAR, *args], capture_output=True, text=True, timeout=600)


def test_generate_both_modes(smoke_weights, tmp_path):
    for mode in ("cloud", "device"):
        out = tmp_path / f"{mode}.png"
        res = ciar("generate", "--checkpoint", str(smoke_weights), "--mode", mode, "--out", str(out), "--seed", "3")
        assert res.returncode == 0, res.stderr
        assert Image.open(out).size == (256, 256)


def test_eval_json_fields(smoke_weights):
    res = ciar("eval", "--checkpoint", str(smoke_weights), "--mode", "device", "--prompts", "4", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("mode", "prompts", "adherence", "fd", "fd_floor", "precision", "recall", "f1"):
        assert key in out
    res = ciar("eval", "gate", "--checkpoint", str(smoke_weights), "--prompts", "2", "--json")
    assert res.returncode == 0, res.stderr
    gate = json.loads(res.stdout)
    assert set(gate["auroc"]) == {"interval", "entropy", "maxprob"}
    for v in gate["auroc"].values():  # smoke weights may agree everywhere: then AUROC is undefined, and said so
        assert (v is None and "undefined" in gate["note"]) or 0.0 <= v <= 1.0


def test_bench_methods_json(smoke_weights, tmp_path):
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--calibration-prompts",
               "2", "--methods", "cloud", "ciar", "ciar-inflight", "sd", "--link", "all", "--budget",
               "--bootstrap", "20", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    boot = out["bootstrap"]
    assert boot["reference"] == "ciar" and set(boot["minus"]) == {"cloud", "ciar-inflight", "sd"}
    for d in boot["minus"].values():
        assert d["fd"]["ci95"][0] <= d["fd"]["mean"] <= d["fd"]["ci95"][1]
    assert "paired bootstrap over prompts" in res.stderr
    assert out["link"] == "all" and out["prompts"] == 2 and out["budget"] is True
    assert set(out["links"]) == {"lan", "wifi", "4g"} and out["methods"] == out["links"]["lan"]
    # the same decodes on every link: the slower link costs time, never tokens kept or calls made
    lan, g4 = out["links"]["lan"]["ciar-inflight"], out["links"]["4g"]["ciar-inflight"]
    assert lan["cloud_calls"] == g4["cloud_calls"] and lan["seconds"] < g4["seconds"]
    for name in ("cloud", "ciar", "ciar-inflight", "sd"):
        row = out["methods"][name]
        for key in ("speedup", "cloud_calls", "cloud_seconds_ratio", "bytes_up", "bytes_down",
                    "tokens_per_cloud_forward", "adherence", "fd", "f1"):
            assert key in row, (name, key)
    assert out["methods"]["cloud"]["speedup"] == 1.0 and out["methods"]["cloud"]["cloud_calls"] == 1.0


def test_bench_methods_bootstrap_needs_its_reference(smoke_weights):
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--methods", "cloud",
               "entropy", "--bootstrap", "10")
    assert res.returncode != 0 and "--reference ciar" in res.stderr and "--methods" in res.stderr


def test_bench_methods_tau_sweep_plot(smoke_weights, tmp_path):
    out_json, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--calibration-prompts",
               "1", "--methods", "cloud", "--sweep", "0.2,0.6", "--sweep-prompts", "2", "--prefix-fraction", "0",
               "--json", str(out_json), "--plot", str(plot))
    assert res.returncode == 0, res.stderr
    sweep = json.loads(out_json.read_text())["sweep"]
    assert set(sweep) == {"interval", "entropy", "maxprob", "latent", "random"}
    for points in sweep.values():
        assert [p["rate"] for p in points] == [0.2, 0.6]
        assert all(0.0 <= p["cloud_calls"] <= 1.0 and p["fd"] >= 0 and p["prefix_fraction"] == 0 for p in points)
    assert "tau sweep" in res.stderr and Image.open(plot).size[0] > 0
    # one image cannot be scored (FD, precision/recall compare sets): a usage error, before any decoding
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "1")
    assert res.returncode == 2 and "at least 2" in res.stderr and "Traceback" not in res.stderr


def test_missing_weights_message(tmp_path):
    res = ciar("generate", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert res.returncode != 0 and "ciar train builtin" in res.stderr


def test_demo_writes_image_map_and_stats(tmp_path):
    """The README's main job on the shipped defaults: device runtime -> real localhost bridge -> cloud."""
    res = ciar("demo", "--out-dir", str(tmp_path), "--json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    for key in ("tokens", "local", "cloud", "cloud_calls", "bytes_up", "bytes_down", "seconds"):
        assert key in stats
    assert stats["local"] + stats["cloud"] == stats["tokens"] == 256
    assert stats["sent"] > 0 and stats["unverified"] == 0 and stats["prefix"] > 0 and stats["bytes_up"] > 0
    assert stats["transport"].startswith("websocket bridge on ws://127.0.0.1:")
    assert stats["tau_from"] == "cloud_calls"  # the shipped bundle's measured table, as `ciar-device run --cloud`
    assert json.loads((tmp_path / "stats.json").read_text())["tokens"] == 256
    for name in ("image.png", "uncertainty.png", "cloud_only.png"):
        assert (tmp_path / name).stat().st_size > 100


def test_demo_bad_input_is_a_clear_error(tmp_path):
    res = ciar("demo", "--out-dir", str(tmp_path), "--bundle", str(tmp_path / "nope"))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "nope" in res.stderr
    res = ciar("demo", "--out-dir", str(tmp_path), "--cloud-rate", "1.5")
    assert res.returncode == 2 and "--cloud-rate" in res.stderr


def test_bench_methods_on_an_exported_device_bundle(smoke_weights, tmp_path):
    bundle = tmp_path / "onnx-int8"
    res = ciar("export", "--checkpoint", str(smoke_weights), "--format", "onnx", "--quantize", "int8",
               "--out", str(bundle))
    assert res.returncode == 0, res.stderr
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--calibration-prompts",
               "2", "--methods", "cloud", "ciar", "ciar-inflight", "--device-bundle", str(bundle), "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["device"].startswith("bundle") and "int8" in out["device"]
    assert out["methods"]["ciar"]["device_seconds"] > 0 and out["methods"]["ciar"]["cloud_calls"] < 1.0
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--methods", "ciar",
               "--device-bundle", str(tmp_path))
    assert res.returncode != 0 and "--device-bundle" in res.stderr and "no manifest.json" in res.stderr

    # the bare gates on their own bare-gate bundle (no Inter-Head), ciar on the interval one
    bare = tmp_path / "onnx-int8-maxprob"
    res = ciar("export", "--checkpoint", str(smoke_weights), "--format", "onnx", "--quantize", "int8", "--gate",
               "maxprob", "--out", str(bare))
    assert res.returncode == 0, res.stderr
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--calibration-prompts",
               "2", "--methods", "cloud", "ciar", "maxprob", "entropy", "--device-bundle", str(bundle),
               "--gate-bundle", str(bare), "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["gate_devices"]) == {"maxprob"} and str(bare) in out["gate_devices"]["maxprob"]
    # entropy had no bundle of its own: said so, once
    assert res.stderr.count("note: entropy run on the interval bundle's device graph") == 1, res.stderr
    assert out["methods"]["maxprob"]["device_seconds"] > 0 and out["methods"]["entropy"]["device_seconds"] > 0
    for extra, message in [((), "--gate-bundle.*scores the interval"),
                           (("--same-pipeline",), "--same-pipeline"),
                           (("--gate-bundle", str(bare)), "two --gate-bundle")]:
        args = ["--gate-bundle", str(bundle) if not extra else str(bare), *extra]
        res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--methods",
                   "maxprob", "--device-bundle", str(bundle), *args)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert re.search(message, res.stderr), res.stderr
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--methods", "maxprob",
               "--gate-bundle", str(bare))
    assert res.returncode != 0 and "--device-bundle" in res.stderr
    fp32 = tmp_path / "onnx-fp32-entropy"
    res = ciar("export", "--checkpoint", str(smoke_weights), "--format", "onnx", "--gate", "entropy", "--out",
               str(fp32))
    assert res.returncode == 0, res.stderr
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--methods", "entropy",
               "--device-bundle", str(bundle), "--gate-bundle", str(fp32))
    assert res.returncode != 0 and "is onnx none, --device-bundle onnx int8" in res.stderr, res.stderr
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--methods", "maxprob",
               "--device-bundle", str(bare))
    assert res.returncode != 0 and "Traceback" not in res.stderr and "is a bare-gate (maxprob) bundle" in res.stderr


def test_same_pipeline_swaps_only_the_gate():
    from ciar.cli.bench import _method_for
    from ciar.engine import get_method

    taus = {"interval": 1e-4, "entropy": 2.0, "maxprob": 0.6, "latent": 0.4}
    ciar_m = get_method("ciar")
    for name, gate, tau in (("entropy", "entropy", 2.0), ("maxprob", "maxprob", 0.6), ("latent", "latent", 0.4),
                            ("random", "random", 0.7)):
        bare, inside = _method_for(name, taus, 0.3), _method_for(name, taus, 0.3, same_pipeline=True)
        assert bare.prefix_fraction == 0.0 and not bare.use_phi
        assert (inside.gate, inside.tau, inside.name) == (gate, pytest.approx(tau), name)
        assert inside.prefix_fraction == ciar_m.prefix_fraction and inside.use_phi == ciar_m.use_phi
    assert _method_for("ciar", taus, 0.3, same_pipeline=True) == get_method("ciar", tau=1e-4)


def test_prefix_fraction_replaces_ciars_prefix_only():
    from ciar.cli.bench import _method_for
    from ciar.engine import get_method

    taus = {"interval": 1e-4, "entropy": 2.0, "maxprob": 0.6, "latent": 0.4}
    for name in ("ciar", "ciar-chain", "ciar-inflight", "ciar-lossless"):
        assert get_method(name).prefix_fraction > 0 and _method_for(name, taus, 0.2, prefix=0.0).prefix_fraction == 0
        assert _method_for(name, taus, 0.2, prefix=0.1) == dataclasses.replace(_method_for(name, taus, 0.2),
                                                                               prefix_fraction=0.1)
    assert _method_for("code30", taus, 0.2, prefix=0.0).prefix_fraction == 0.3  # its 30% is the method itself
    assert _method_for("entropy", taus, 0.2, prefix=0.1).prefix_fraction == 0.0  # a bare gate has none
    assert _method_for("entropy", taus, 0.2, same_pipeline=True, prefix=0.1).prefix_fraction == 0.1


def test_bench_methods_without_the_prefix_spends_every_forward_on_verification(smoke_weights):
    res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--calibration-prompts",
               "2", "--methods", "ciar", "--prefix-fraction", "0", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    row = out["methods"]["ciar"]
    assert out["prefix_fraction"] == {"ciar": 0.0}
    assert row["cloud_forwards"] - row["sent"] == 1  # the prefill; no prefix forwards
    for bad in ("-0.1", "1.5", "half"):
        res = ciar("bench", "methods", "--prompts", "2", "--prefix-fraction", bad)
        assert res.returncode == 2 and "--prefix-fraction" in res.stderr and "Traceback" not in res.stderr


def test_bench_methods_budget_cap_bounds_what_tau_fixed_would_send(smoke_weights):
    """--budget-cap R: each gate starts at its calibrated tau (--cloud-rate) and is held under R; tau fixed at the
    same calibration sends far more than a cap of 0.05 allows."""
    rows = {}
    for name, extra in (("fixed", []), ("cap", ["--budget-cap", "0.05"])):
        res = ciar("bench", "methods", "--checkpoint", str(smoke_weights), "--prompts", "2", "--calibration-prompts",
                   "2", "--methods", "ciar", "--cloud-rate", "0.5", "--prefix-fraction", "0", *extra, "--json", "-")
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        rows[name] = out["methods"]["ciar"]
        assert out["budget"] is False and out["budget_cap"] == (0.05 if extra else None)
    assert rows["cap"]["cloud_calls"] < 0.15 < rows["fixed"]["cloud_calls"]
    assert rows["cap"]["cloud_calls_max"] <= 0.05 < rows["fixed"]["cloud_calls_max"]  # no image over the cap
    assert rows["cap"]["cloud_calls"] <= rows["cap"]["cloud_calls_p90"] <= rows["cap"]["cloud_calls_max"]
    res = ciar("bench", "methods", "--prompts", "2", "--budget", "--budget-cap", "0.2")
    assert res.returncode != 0 and "pass one of them" in res.stderr and "Traceback" not in res.stderr


def bench_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(Path(__file__).parents[1] / "bench" / name), *args],
                          capture_output=True, text=True, timeout=300)


def test_cloud_forward_bench_reports_and_refuses():
    res = bench_script("cloud_forward.py", "--tokens", "1,3", "--repeats", "1", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["device"] == "cpu" and out["shape"] == "built-in" and set(out["forward_ms"]) == {"1", "3"}
    assert all(ms > 0 for ms in out["forward_ms"].values()) and out["relative_to_one_token"]["1"] == 1.0
    for bad, said in ((["--shape", "GPT-Z"], "choose one of GPT-B"), (["--device", "gpu"], "--device")):
        res = bench_script("cloud_forward.py", *bad)
        assert res.returncode != 0 and said in res.stderr and "Traceback" not in res.stderr


def test_colocation_bench_times_both_sides_and_refuses_bad_settings():
    res = bench_script("colocation.py", "--every", "0,5", "--passes", "1", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["device_step_ms"]) == {"0", "5", "cloud alone"} and out["device_step_ms"]["cloud alone"] is None
    assert out["device_step_ms"]["0"] > 0 and out["device_step_ms"]["5"] > 0
    assert out["cloud_forward_ms"]["0"] is None and out["cloud_forward_ms"]["5"] > 0
    res = bench_script("colocation.py", "--every", "x")
    assert res.returncode == 2 and "--every" in res.stderr


def test_chain_variants_bench_registers_what_it_runs():
    res = bench_script("chain_variants.py", "--prompts", "2", "--calibration-prompts", "2", "--methods", "cloud",
                       "ciar-c2", "ciar-x3", "--json", "-")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["methods"]
    assert set(rows) == {"cloud", "ciar-c2", "ciar-x3"}
    for name in ("ciar-c2", "ciar-x3"):
        assert 1 < rows[name]["tokens_per_cloud_forward"] and rows[name]["cloud_calls"] < 1
    res = bench_script("chain_variants.py", "--methods", "ciar-q2")
    assert res.returncode == 2 and "invalid choice: 'ciar-q2'" in res.stderr


def test_runtime_inflight_bench_runs_a_real_server_through_a_delaying_proxy():
    res = bench_script("runtime_inflight.py", "--prompts", "1", "--links", "wifi", "--lookahead", "2", "--engine",
                       "--json", "-")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)["links"]["wifi"]
    assert row["rtt_ms"] == 10.0 and set(row["methods"]) == {"cloud", "waiting", "lookahead 2"}
    waiting = row["methods"]["waiting"]
    assert waiting["verifies"] > 0 and waiting["speedup"] > 0 and waiting["voided"] == 0
    assert waiting["cloud_s"] > 0.01 * waiting["verifies"]  # every Verify paid the 10 ms round trip
    server = json.loads(res.stdout)["server"]
    assert waiting["verify_ms"] > 10 and server["verify_requests"] > 0  # the device also waited out the link
    assert 0 < server["forward_ms_p50"] <= server["verify_ms_p50"] < waiting["verify_ms"]
    assert row["methods"]["lookahead 2"]["drafts"] > waiting["drafts"]
    assert set(row["engine"]) == {"cloud", "waiting", "lookahead 2"} and row["engine"]["waiting"]["verifies"] > 0
    res = bench_script("runtime_inflight.py", "--lookahead", "0")
    assert res.returncode == 2 and "--lookahead: must be at least 1, got 0" in res.stderr


def test_step_overhead_bench_splits_a_decode_step_and_refuses_bad_input(tmp_path):
    res = bench_script("step_overhead.py", "--images", "1", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    us = out["median_us"]
    assert set(us) == {"neighbours", "embed", "backend_io", "graph", "draw", "record", "draw_again"}
    assert out["steps"] == 255 and all(v > 0 for v in us.values())
    outside = sum(v for k, v in us.items() if k not in ("graph", "draw_again"))
    assert out["outside_graph_us"] == pytest.approx(outside)
    assert out["outside_graph_fraction"] == pytest.approx(outside / (outside + us["graph"]))
    res = bench_script("step_overhead.py", "--images", "0")
    assert res.returncode == 2 and "--images must be at least 1" in res.stderr
    res = bench_script("step_overhead.py", "--bundle", str(tmp_path))
    assert res.returncode == 1 and "no manifest.json" in res.stderr and "Traceback" not in res.stderr


def test_head_cost_bench_times_the_shipped_graph_against_a_bare_gate_graph(tmp_path):
    res = bench_script("head_cost.py", "--rounds", "2", "--calls", "5", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["step_us"]) == {"shipped", "bare_gate"} and all(v > 0 for v in out["step_us"].values())
    assert all(len(v) == 2 for v in out["step_us_per_round"].values())
    assert out["nodes"]["shipped"] > out["nodes"]["bare_gate"] > 0  # the Inter-Head's nodes are gone
    ratios = [a / b for a, b in zip(out["step_us_per_round"]["shipped"], out["step_us_per_round"]["bare_gate"])]
    assert out["ratio_per_round"] == pytest.approx(ratios)
    latent = json.loads(bench_script("head_cost.py", "--rounds", "1", "--calls", "3", "--gate", "latent",
                                     "--json", "-").stdout)
    assert latent["gate"] == "latent" and out["gate"] == "maxprob"
    assert out["nodes"]["shipped"] > latent["nodes"]["bare_gate"] > out["nodes"]["bare_gate"]  # + the codebook product
    res = bench_script("head_cost.py", "--rounds", "0")
    assert res.returncode == 2 and "--rounds and --calls must be at least 1" in res.stderr
    res = bench_script("head_cost.py", "--bundle", str(tmp_path))
    assert res.returncode == 1 and "no manifest.json" in res.stderr and "Traceback" not in res.stderr


def test_executorch_ops_bench_profiles_a_program_op_by_op(smoke_weights, tmp_path):
    """ETDump of an ExecuTorch program: per-step events whose parts add up, the Inter-Head's elementwise ops in the
    XNNPACK delegate, its portable kernels gone from a bare-gate program; a missing bundle is refused with one
    line."""
    pytest.importorskip("executorch.devtools", reason="ExecuTorch is not installed (pip install 'ciar[export]')")
    for gate in ("interval", "maxprob"):
        res = ciar("export", "--checkpoint", str(smoke_weights), "--format", "executorch", "--gate", gate, "--out",
                   str(tmp_path / gate))
        assert res.returncode == 0, res.stderr
    res = bench_script("executorch_ops.py", "--bundle", str(tmp_path / "interval"), "--bundle",
                       str(tmp_path / "maxprob"), "--steps", "3", "--json", "-")
    assert res.returncode == 0, res.stderr
    rows = {row["gate"]: row for row in json.loads(res.stdout)["bundles"]}
    for row in rows.values():
        assert row["steps"] == 3 and 0 < row["delegate_us"] < row["execute_us"]
        assert row["portable_kernels_us"] == pytest.approx(sum(e["us_per_step"] for e in row["events"]
                                                               if e["name"].startswith("native_call_")))
    names = {g: {e["name"] for e in row["events"]} for g, row in rows.items()}
    # the Inter-Head's elementwise arithmetic runs in the XNNPACK delegate: none of these falls to a portable kernel
    portable = {"native_call_log1p.out", "native_call_reciprocal.out", "native_call_eq.Tensor_out",
                "native_call_clamp.Tensor_out", "native_call_bitwise_and.Tensor_out", "native_call_argmax.out"}
    assert not names["interval"] & portable
    assert "native_call_topk.values" in names["interval"] - names["maxprob"]  # the bounds' top-2, the stats' top-8
    assert rows["maxprob"]["portable_kernel_calls"] < rows["interval"]["portable_kernel_calls"]
    res = bench_script("executorch_ops.py", "--bundle", str(tmp_path / "nope"))
    assert res.returncode == 1 and "Traceback" not in res.stderr and "not a bundle directory" in res.stderr


def test_interval_bounds_bench_times_the_log_space_form_and_compares_u(tmp_path):
    """The previous graph (log-space bounds, torch's softplus) exports from the same weights with more nodes; U of
    both bound formulas is compared with float64 and the gate decides alike on two images; bad input is refused
    with one line."""
    res = bench_script("interval_bounds.py", "--prompts", "2", "--rounds", "1", "--calls", "5", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out["step_us"]) == {"shipped", "log_space"} and all(v > 0 for v in out["step_us"].values())
    u = out["u"]
    assert u["positions"] == 512 and u["gate_agreement"] > 0.99
    for name in ("shipped", "log_space"):
        assert u[name]["rel_err_p50"] < 1e-4 and u[name]["near_tau_rel_err_max"] < 1e-3
    res = bench_script("interval_bounds.py", "--prompts", "0")
    assert res.returncode == 2 and "must be at least 1" in res.stderr
    res = bench_script("interval_bounds.py", "--bundle", str(tmp_path))
    assert res.returncode == 1 and "no manifest.json" in res.stderr and "Traceback" not in res.stderr


def test_runtime_budget_bench_compares_fixed_tau_and_the_budget():
    res = bench_script("runtime_budget.py", "--prompts", "2", "--rates", "0.3", "--cap-factor", "4", "--json", "-")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)["rates"]["0.3"]
    assert row.pop("cap_rate") == 1.0 and row.pop("tau") > 0 and row.pop("tau_from") in ("cloud_calls", "u_quantiles")
    assert set(row) == {"fixed tau", "budget", "cap"}
    assert all(0 < r["p10"] <= r["mean"] <= r["p90"] <= r["max"] < 1 and r["over_cap"] == 0 for r in row.values())
    assert row["cap"] == row["fixed tau"]  # a cap no image can reach never moves tau from its start
    res = bench_script("runtime_budget.py", "--prompts", "3", "--rates", "0.3", "--cap-factor", "4", "--quality",
                       "--bootstrap", "20", "--tau-from", "quantiles", "--json", "-")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)["rates"]["0.3"]
    assert row["tau_from"] == "u_quantiles"
    assert "minus_fixed" not in row["fixed tau"] and 0 < row["fixed tau"]["adherence"] <= 1
    assert all(r["fd"] > 0 and 0 <= r["f1"] <= 1 for r in (row["fixed tau"], row["budget"], row["cap"]))
    same = row["cap"].pop("minus_fixed")  # the cap's images are tau fixed's: nothing between them, every resample
    assert same == {m: {"mean": 0.0, "ci95": [0.0, 0.0]} for m in ("fd", "adherence")}
    assert row["cap"] == row["fixed tau"] and row["budget"]["mean"] != row["fixed tau"]["mean"]
    lo, hi = row["budget"]["minus_fixed"]["fd"]["ci95"]
    assert lo <= row["budget"]["minus_fixed"]["fd"]["mean"] <= hi
    res = bench_script("runtime_budget.py", "--bootstrap", "5")
    assert res.returncode == 2 and "add --quality" in res.stderr
    res = bench_script("runtime_budget.py", "--quality", "--bootstrap", "5", "--policies", "cap")
    assert res.returncode == 2 and "add fixed to --policies" in res.stderr
    res = bench_script("runtime_budget.py", "--rates", "1.5")
    assert res.returncode == 2 and "--rates must lie in (0, 1]" in res.stderr
    res = bench_script("runtime_budget.py", "--cap-factor", "0.5")
    assert res.returncode == 2 and "--cap-factor must be at least 1" in res.stderr


def test_device_agreement_bench_reads_both_models_on_the_kept_tokens():
    import dataclasses
    import importlib.util

    import torch

    from ciar.engine import collaborative_generate, get_method
    from ciar.models import SamplingConfig
    from ciar.models.builtin import load_builtin
    from ciar.training.evaluate import encode_prompts

    spec = importlib.util.spec_from_file_location("device_agreement",
                                                  Path(__file__).parents[1] / "bench" / "device_agreement.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # greedy: the cloud's teacher-forced argmax is the token it wrote, at every position (pins the alignment)
    models = dataclasses.replace(load_builtin(), sampling=SamplingConfig(cfg_scale=3.0, temperature=0.0))
    cond = encode_prompts(models, ["a red circle left of a blue square"])
    tokens = collaborative_generate(get_method("cloud"), models.cloud, models.device, cond, models.sampling,
                                    torch.Generator().manual_seed(0)).tokens
    assert torch.equal(mod.teacher_forced(models.cloud, models, cond, tokens).argmax(-1), tokens[0])
    row = mod.compare(models, cond, tokens, 15)
    assert len(row["disagree"]) == tokens.shape[1] - 15 and (row["p_kept"] == 1).all()

    res = bench_script("device_agreement.py", "--prompts", "2", "--calibration-prompts", "2", "--json", "-")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    parts = out["ciar_image"]
    assert parts["sent"]["positions"] + parts["local"]["positions"] <= parts["all"]["positions"] == 2 * (256 - 15)
    assert all(0 <= row["disagree"] <= 1 for row in (out["cloud_image"], *parts.values()))
    assert out["perfect_gate_local_floor"] == pytest.approx(
        max(0.0, parts["all"]["disagree"] - out["sent_rate"]) / (1 - out["sent_rate"]))
    res = bench_script("device_agreement.py", "--cloud-rate", "0")
    assert res.returncode == 2 and "--cloud-rate must be in (0, 1]" in res.stderr


def _bench_module(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_gate_scores_drafts_with_the_cloud_of_the_same_image(tmp_path):
    import torch

    from ciar.engine import collaborative_generate
    from ciar.engine.methods import Method
    from ciar.engine.proposer import DeviceProposer
    from ciar.models import model_probs
    from ciar.models.builtin import load_builtin
    from ciar.training.evaluate import encode_prompts

    mod = _bench_module("oracle_gate")
    p, q = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.25, 0.25, 0.5]])
    assert float(mod.oracle_score("oracle-tv", p, q, torch.tensor([0]))) == pytest.approx(0.5)
    assert float(mod.oracle_score("oracle-draft", p, q, torch.tensor([2]))) == pytest.approx(1.0)  # p(x) = 0
    assert float(mod.oracle_score("oracle-draft", p, q, torch.tensor([0]))) == 0.0  # p(x) > q(x): always kept
    with pytest.raises(ValueError, match="unknown oracle"):
        mod.oracle_score("oracle-argmax", p, q, torch.tensor([0]))
    # latent: codes 0 and 2 share a vector; the cloud writes code 2, so drafting code 0 is no error there at all
    codebook, p2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    latent = [float(mod.oracle_score("oracle-latent", p2, q, torch.tensor([x]), codebook)) for x in range(3)]
    assert latent == pytest.approx([0.0, 2.0, 0.0])
    assert float(mod.oracle_score("oracle-draft", p2, q, torch.tensor([0]))) == 1.0  # code identity: rejected

    # the oracle's cloud follows the image: at every draft its p is the cloud's teacher-forced on the final tokens
    # (the waiting loop never changes a token before a draft), and its score is the draft's rejection chance
    models = load_builtin()
    seen = {}

    class Recording(mod.OracleProposer):
        def draft(self, generator):
            d = super().draft(generator)
            seen[self.inner.pos] = (model_probs(self.logits, self.sampling)[0], d)
            return d

    oracle = Recording(DeviceProposer(models.device, models.sampling), models.cloud, models.sampling, "oracle-draft")
    cond = encode_prompts(models, ["a red circle left of a blue square"])
    res = collaborative_generate(Method("oracle", gate="interval", tau=0.5), models.cloud, models.device, cond,
                                 models.sampling, torch.Generator().manual_seed(3), proposer=oracle)
    P, T = models.cloud.config.cls_token_num, res.tokens.shape[1]
    with torch.inference_mode():
        logits = models.cloud(cond=models.cloud.cfg_condition(cond), tokens=res.tokens.repeat(2, 1)).logits
    forced = model_probs(logits[:, P - 1:P - 1 + T], models.sampling)[0]
    assert 0 < int(res.sent.sum()) < len(seen) <= T  # (a verdict that keeps the draft adds the cloud's next token)
    for t, (p_t, d) in seen.items():
        assert torch.allclose(p_t, forced[t], atol=1e-4), t
        x = int(d.token)
        assert float(d.u) == pytest.approx(max(0.0, 1 - float(forced[t, x] / d.q[0, x])), abs=1e-3)
    assert torch.equal(res.sent[0], res.u[0] >= 0.5)

    # the script: a second run with --tokens decodes nothing and reports the same images
    args = ("--prompts", "2", "--calibration-prompts", "2", "--methods", "maxprob", "latent@0.4", "oracle-tv",
            "--reference", "oracle-tv", "--bootstrap", "20", "--divergence", "1", "--tokens", str(tmp_path),
            "--json", "-")
    first = bench_script("oracle_gate.py", *args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert set(out["methods"]) == {"maxprob", "latent@0.4", "oracle-tv"} and sorted(
        p.name for p in tmp_path.iterdir()) == ["latent@0.4.pt", "maxprob.pt", "oracle-tv.pt"]
    assert all(0 < row["cloud_calls"] < 1 for row in out["methods"].values())
    assert out["rates"] == {"maxprob": 0.15, "latent@0.4": 0.4, "oracle-tv": 0.15}
    assert out["methods"]["latent@0.4"]["cloud_calls"] > out["methods"]["maxprob"]["cloud_calls"] + 0.1
    for d in out["divergence"].values():  # the cloud reading every draft changed no image
        assert d["same_images"] and d["images"] == 1 and 0 < d["kept_tv"] < d["drafted_tv"] < 256
        assert d["sent_share_of_tv"] == pytest.approx(1 - d["kept_tv"] / d["drafted_tv"])
    saved = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = json.loads(bench_script("oracle_gate.py", *args).stdout)
    assert again["methods"] == out["methods"] and again["taus"] == out["taus"]
    assert again["divergence"] == out["divergence"]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == saved  # read, not written again
    with_cloud = bench_script("oracle_gate.py", "--prompts", "2", "--calibration-prompts", "1", "--methods", "cloud",
                              "maxprob", "--reference", "cloud", "--bootstrap", "10", "--divergence", "1",
                              "--json", "-")
    assert with_cloud.returncode == 0, with_cloud.stderr
    out = json.loads(with_cloud.stdout)
    assert out["methods"]["cloud"]["cloud_calls"] == 1.0 and set(out["divergence"]) == {"maxprob"}
    for bad, said in ((("--cloud-rate", "1"), "--cloud-rate must be in (0, 1)"),
                      (("--methods", "maxprob"), "--reference oracle-draft is not among --methods"),
                      (("--methods", "maxprob@1.5", "--reference", "maxprob@1.5"), "@RATE must be a cloud-call rate"),
                      (("--methods", "cloud@0.2", "--reference", "cloud@0.2"), "@RATE must be a cloud-call rate"),
                      (("--methods", "variance", "--reference", "variance"), "unknown method 'variance'")):
        res = bench_script("oracle_gate.py", *bad)
        assert res.returncode == 2 and said in res.stderr
