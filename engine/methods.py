"""Every decoding method as a configuration of the one loop (METHOD.md section 7)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ciar.runtime.bundle import PREFIX_FRACTION

CIAR_PREFIX = PREFIX_FRACTION["interval"]  # the share of a CIAR image the cloud writes first (prefix injection)


@dataclass(frozen=True)
class Method:
    name: str
    gate: str = "interval"  # a gates.SCORES entry: which drafts go to the cloud
    tau: float = 0.0  # send iff score >= tau
    prefix_fraction: float = 0.0  # the cloud writes the first floor(f * T) tokens
    chain: int = 1  # drafts per verification (speculative sampling chains); with chain_extend, the most
    chain_extend: bool = False  # the chain grows past its first draft only while each new draft is uncertain too
    policy: str = "exact"  # "exact" speculative sampling, or "lantern" relaxed acceptance
    use_phi: bool = False  # interval-feature conditioning of the cloud
    cloud_only: bool = False  # the base: the cloud writes every token
    lookahead: int = 0  # drafts the device makes past the oldest verification in flight (0: waits for each verdict)
    max_in_flight: int = 1  # verifications in flight at once (with lookahead > 0)
    lantern_delta: float = 0.1
    lantern_k: int = 1000

    def with_tau(self, tau: float) -> "Method":
        return replace(self, tau=tau)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("cloud", gate="never", cloud_only=True),
    Method("device", gate="never"),
    Method("sd", gate="always", chain=4),
    Method("lantern", gate="always", chain=4, policy="lantern"),
    Method("entropy", gate="entropy"),
    Method("maxprob", gate="maxprob"),
    Method("latent", gate="latent"),
    Method("random", gate="random", tau=0.7),  # random score in [0, 1): sends 30%
    Method("code30", gate="never", prefix_fraction=0.3),
    Method("ciar", gate="interval", prefix_fraction=CIAR_PREFIX, use_phi=True),
    Method("ciar-chain", gate="interval", prefix_fraction=CIAR_PREFIX, use_phi=True, chain=4, chain_extend=True),
    Method("ciar-inflight", gate="interval", prefix_fraction=CIAR_PREFIX, use_phi=True, lookahead=4, max_in_flight=2),
    Method("ciar-lossless", gate="always", prefix_fraction=CIAR_PREFIX),
)}


def get_method(name: str, tau: float | None = None) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    m = METHODS[name]
    return m if tau is None else m.with_tau(tau)
