#!/usr/bin/env bash
# arm64 smoke run of the torch-free device runtime under qemu-user: a minimal Debian 12 arm64 userland (no chroot,
# no binfmt, no mounts), the project's `device` extra from PyPI's aarch64 wheels, then `ciar-device info`, `run`
# and `bench`. Every timing printed is EMULATED (qemu-aarch64 on this host): it shows that the aarch64 wheels and
# the runtime work, and says nothing about the speed of a Raspberry Pi or a Jetson.
#
#   bash bench/arm64_smoke.sh              work dir /tmp/ciar-arm64 (ARM64_WORK=...), results in $WORK/out
#
# Needs (Debian 12): debootstrap qemu-user-static (apt-get install -y --no-install-recommends debootstrap
# qemu-user-static), network to the Debian mirror of this machine's apt sources (or DEBIAN_MIRROR) and to PyPI.
# Gotcha handled here: onnxruntime segfaults under qemu 7.2 when it parses the host's x86 /proc/cpuinfo; qemu -L
# maps /proc/cpuinfo to $ROOTFS/proc/cpuinfo, so a fake arm64 one is written there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${ARM64_WORK:-/tmp/ciar-arm64}"
ROOTFS="$WORK/rootfs"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
QEMU="$(command -v qemu-aarch64-static || true)"
die() { echo "arm64_smoke: error: $*" >&2; exit 1; }
[ -n "$QEMU" ] || die "qemu-aarch64-static not found (apt-get install qemu-user-static)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip (set PYTHON=)"
mkdir -p "$WORK/out"
stamp() { date -u +%H:%M:%S; }

# --- 1. a minimal arm64 userland with python3 (debootstrap --foreign, debs unpacked with dpkg-deb) ------------
if [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
  m=$(grep -hoE '^(URIs:|deb) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
      | grep -oE 'https?://[^ ]+' | head -n1 || true)
  MIRROR="${DEBIAN_MIRROR:-${m%/}}"
  [ -n "$MIRROR" ] || die "no Debian mirror in /etc/apt sources; set DEBIAN_MIRROR"
  echo "$(stamp) debootstrap --foreign arm64 bookworm from $MIRROR"
  rm -rf "$ROOTFS"
  debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || die "debootstrap failed (see $WORK/debootstrap.log)"
  for d in "$ROOTFS"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$d" "$ROOTFS"; done
fi
mkdir -p "$ROOTFS/proc"
{ for i in 0 1; do printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' $i; done; } > "$ROOTFS/proc/cpuinfo"

# --- 2. the device extra as aarch64 wheels (cp311, what bookworm arm64 runs), the project as a wheel -----------
echo "$(stamp) downloading aarch64 wheels for the device extra"
REQS="$("$PY" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["device"]))
PY
)"
echo "$REQS" > "$WORK/requirements-device.txt"
PLAT=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
      --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
rm -rf "$WORK/wheels" "$WORK/site" && mkdir -p "$WORK/wheels"
pipq() { "$PY" -m pip "$@" >>"$WORK/pip.log" 2>&1 || die "pip $1 failed (see $WORK/pip.log)"; }
: > "$WORK/pip.log"
pipq download --only-binary=:all: "${PLAT[@]}" -d "$WORK/wheels" -r "$WORK/requirements-device.txt"
pipq wheel --no-deps -w "$WORK/wheels" "$ROOT"
pipq install --no-deps --only-binary=:all: "${PLAT[@]}" --target "$WORK/site" "$WORK/wheels"/*.whl
ls "$WORK/wheels" | sed 's/^/  /'

# --- 3. the runtime under qemu-aarch64 ----------------------------------------------------------------------
arm() { env -i PATH=/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 PYTHONPATH="$WORK/site" PYTHONDONTWRITEBYTECODE=1 \
        "$QEMU" -L "$ROOTFS" "$ROOTFS/usr/bin/python3.11" "$@"; }
echo "$(stamp) ciar-device info (aarch64, emulated)"
arm -c 'import platform, onnxruntime, numpy; print("machine", platform.machine(), "python", platform.python_version(), "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)'
arm -m ciar.runtime.cli info --json > "$WORK/out/info.json"
echo "$(stamp) ciar-device run (aarch64, emulated)"
arm -m ciar.runtime.cli run --cloud-rate 0.3 --seed 0 --out "$WORK/out/image.png" --stats "$WORK/out/run.json"
echo "$(stamp) ciar-device bench (aarch64, emulated)"
arm -m ciar.runtime.cli bench --json "$WORK/out/bench.json"
HOST_CPU="$(grep -m1 -i '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)"
"$PY" - "$WORK/out" "${HOST_CPU:-unknown} x86_64, $(nproc) cores" <<'PY'
import json, sys
out, host = sys.argv[1:]
info, run, bench = (json.load(open(f"{out}/{n}.json")) for n in ("info", "run", "bench"))
b = bench["bundles"][0]
print(f"EMULATED (qemu-user on {host}; not arm64 hardware): machine {info['machine']}, "
      f"onnxruntime {info['versions']['onnxruntime']}, numpy {info['versions']['numpy']}")
print(f"run: {run['tokens']} tokens, {run['local']} local, {run['sent']} over tau, {run['seconds']:.2f} s, "
      f"step p50 {run['step_ms_p50']:.2f} ms (emulated)")
print(f"bench {b['bundle'].rsplit('/', 1)[-1]}: prefill {b['prefill_ms']:.1f} ms, step p50 {b['step_ms_p50']:.2f} ms, "
      f"p95 {b['step_ms_p95']:.2f} ms, {b['tokens_per_s']:.0f} tok/s, peak RSS {b['peak_rss_mb']:.0f} MB (emulated)")
PY
echo "$(stamp) done: $WORK/out/{image.png,image_uncertainty.png,run.json,bench.json,info.json}"
