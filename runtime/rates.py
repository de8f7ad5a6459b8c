"""Cloud calls per token: how the runtime counts them, and the tau a bundle measured for a rate with a cloud.

A bundle's `gate.u_quantiles` table turns a rate into tau from device-only decodes: the share of drafts a tau
flags with no cloud. With a cloud the rate is another quantity: the cloud writes the prefix and corrects the
uncertain drafts, the device is surer of itself after that, and the table's tau spends less than the rate asked
for at 0.3 and more at 0.1 (docs/BENCHMARKS.md 3e, 3m). `ciar export calibrate` measures it instead: cloud calls
per token at a grid of taus, decoding held-out prompts with the cloud in the loop, into `gate.cloud_calls`.
"""
from __future__ import annotations

from typing import Any


def cloud_calls_per_token(prefix: int, verified: int, tokens: int) -> float:
    """The cloud's forwards per image token: its prefill, one per prefix token, one per verification."""
    return (1 + prefix + verified) / tokens


def cloud_calls_problem(table: Any) -> str | None:
    """What is wrong with a manifest's `gate.cloud_calls` table, or None: it must hold `taus` (at least two,
    ascending, finite, >= 0), `calls` (as many, non-increasing, in [0, 1]) and the `prefix_fraction` it was
    measured at."""
    if not isinstance(table, dict) or not all(k in table for k in ("taus", "calls", "prefix_fraction")):
        return "needs taus, calls and prefix_fraction"
    taus, calls = table["taus"], table["calls"]
    numbers = (int, float)
    if not (isinstance(taus, list) and isinstance(calls, list) and len(taus) == len(calls) >= 2
            and all(isinstance(x, numbers) and not isinstance(x, bool) for x in (*taus, *calls))):
        return "taus and calls must be two lists of numbers of the same length, at least two"
    if not all(0.0 <= a < b < float("inf") for a, b in zip(taus, taus[1:])):
        return "taus must be finite, >= 0 and ascending"
    if not all(0.0 <= c <= 1.0 for c in calls) or any(b > a for a, b in zip(calls, calls[1:])):
        return "calls must lie in [0, 1] and not increase"
    if not isinstance(table["prefix_fraction"], numbers) or isinstance(table["prefix_fraction"], bool):
        return "prefix_fraction must be a number"
    return None


def measured_tau(manifest: dict[str, Any], rate: float, prefix_fraction: float,
                 fallback: float) -> tuple[float, str]:
    """tau for `rate` cloud calls per token with a cloud, and where it came from. Inside the manifest's
    `gate.cloud_calls` table (taus ascending, calls non-increasing): interpolated there ("cloud_calls"). Without a
    table, or one measured at another prefix: `fallback`, the quantile table's tau ("u_quantiles"). Outside what the
    table measured: `fallback` too, but never inside the table's range, so that asking for fewer calls never gives a
    lower tau (where it would be, the table's end tau, "cloud_calls")."""
    table = manifest["gate"].get("cloud_calls")
    if not table or table["prefix_fraction"] != prefix_fraction:
        return fallback, "u_quantiles"
    taus, calls = table["taus"], table["calls"]
    if rate > calls[0]:
        return (fallback, "u_quantiles") if fallback <= taus[0] else (float(taus[0]), "cloud_calls")
    if rate < calls[-1]:
        return (fallback, "u_quantiles") if fallback >= taus[-1] else (float(taus[-1]), "cloud_calls")
    for i in range(len(taus) - 1):
        hi, lo = calls[i], calls[i + 1]
        if lo <= rate <= hi:
            if hi == lo:
                return float(taus[i]), "cloud_calls"
            return float(taus[i] + (taus[i + 1] - taus[i]) * (hi - rate) / (hi - lo)), "cloud_calls"
    raise AssertionError("unreachable: calls[-1] <= rate <= calls[0]")
