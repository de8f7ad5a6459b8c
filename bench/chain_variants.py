"""Chain variants of ciar in `ciar bench methods`: how many drafts one verification carries.

Registers, for this run only, the variants named in --methods and hands every argument to `ciar bench methods`
(so the same prompts, seeds, budget, bootstrap and JSON):

    ciar-cK   ciar with a fixed chain of K drafts per verification (sd-style chains behind the interval gate)
    ciar-xK   ciar with ciar-chain's rule up to K drafts: the uncertain run, ended by the first confident draft
              (ciar-x4 is ciar-chain)
    ciar-ixK  the same rule in ciar-inflight (the device drafts on while verifications are in flight)

    python bench/chain_variants.py --prompts 300 --link all --budget --methods cloud ciar ciar-c2 ciar-x4 \
        --device-bundle runtime/bundles/onnx-int8 --bootstrap 1000 --json out.json
"""
from __future__ import annotations

import dataclasses
import re
import sys

VARIANT = re.compile(r"^ciar-(c|x|ix)([1-9][0-9]?)$")


def register(names: list[str]) -> list[str]:
    """Add the variants among `names` to the engine's method table and the benchmark's choices; returns them."""
    from ciar.cli import bench
    from ciar.engine import methods

    added = []
    for name in names:
        m = VARIANT.match(name)
        if not m or name in methods.METHODS:
            continue
        kind, k = m.group(1), int(m.group(2))
        base = methods.METHODS["ciar-inflight" if kind == "ix" else "ciar"]
        methods.METHODS[name] = dataclasses.replace(base, name=name, chain=k, chain_extend=kind != "c")
        bench.GATED[name] = "interval"
        bench.METHOD_ORDER = bench.METHOD_ORDER + (name,)
        added.append(name)
    return added


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    register(argv)
    from ciar.cli.main import main as ciar
    return ciar(["bench", "methods", *argv])


if __name__ == "__main__":
    sys.exit(main())
