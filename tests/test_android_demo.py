"""The Android / WebView demo (android_demo/): the web device loop's own tests under `node --test` (protocol vectors,
fp16, sampling, tokenizer, the real loop on onnxruntime-web), the headless-Chromium tests (device-only, and CIAR
against a real `ciar serve`), and the APK build (`android_demo/build.sh`, checked with apksigner and aapt).

Needs: node + npm (node_modules is installed here with `npm ci` when missing or stale); for the browser tests
Debian's `chromium`; for the APK `aapt apksigner zipalign` and a JDK (javac, keytool). Each test is skipped, with
the reason, only when its tool is absent."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "android_demo" / "web"
BUILD = ROOT / "android_demo" / "build"
PACKAGE = "org.ciar.demo"

needs_node = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node/npm are not installed (apt-get install nodejs npm)")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """`npm ci` (exact versions from package-lock.json) unless node_modules already matches the lock file."""
    stamp = WEB / "node_modules" / ".package-lock.json"
    lock = WEB / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(WEB)], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return WEB / "node_modules"


def node_test(paths: list[str], timeout: int) -> dict[str, int]:
    done = subprocess.run(["node", "--test", *paths], cwd=WEB, capture_output=True, text=True, timeout=timeout)
    counts = {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail|skipped) (\d+)$", done.stdout, re.M)}
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0 and counts.get("fail") == 0, f"node --test failed:\n{report}"
    return counts


@needs_node
def test_web_unit_tests(node_modules):
    """protocol vectors, fp16, sampling, tokenizer, bundle, CloudClient, and the real loop on the int8 bundle."""
    files = sorted(str(p.relative_to(WEB)) for p in (WEB / "test").glob("*.test.js"))
    assert len(files) >= 6
    counts = node_test(files, timeout=600)
    assert counts["pass"] >= 100 and counts["skipped"] == 0, counts


@needs_node
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Chromium is not installed (apt-get install chromium)")
def test_web_demo_in_headless_chromium(node_modules):
    """device-only in Chromium; CIAR against a real `ciar serve` (skipped inside when the venv has no ciar)."""
    counts = node_test(["test/browser/"], timeout=900)
    assert counts["pass"] >= 1, counts


APK_TOOLS = ("javac", "keytool", "aapt", "zipalign", "apksigner", "dpkg-deb")


@pytest.fixture(scope="module")
def apk(node_modules) -> Path:
    done = subprocess.run(["bash", str(ROOT / "android_demo" / "build.sh")], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"build.sh failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    path = BUILD / "ciar-demo.apk"
    assert path.exists() and f"built {path}" in done.stdout
    return path


@needs_node
@pytest.mark.skipif(any(shutil.which(t) is None for t in APK_TOOLS),
                    reason="Android build tools absent (apt-get install default-jdk-headless aapt zipalign apksigner)")
def test_apk_builds_signed_with_the_web_demo_and_the_bundle(apk, tmp_path):
    verify = subprocess.run(["apksigner", "verify", "--verbose", str(apk)], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.startswith("Verifies"), verify.stdout + verify.stderr
    assert "(APK Signature Scheme v2): true" in verify.stdout
    assert subprocess.run(["zipalign", "-c", "4", str(apk)], capture_output=True).returncode == 0

    badging = subprocess.run(["aapt", "dump", "badging", str(apk)], capture_output=True, text=True, check=True).stdout
    assert f"package: name='{PACKAGE}'" in badging
    assert "sdkVersion:'24'" in badging
    assert "uses-permission: name='android.permission.INTERNET'" in badging
    assert f"launchable-activity: name='{PACKAGE}.MainActivity'" in badging
    assert "application-label:'ciar demo'" in badging

    listing = set(subprocess.run(["aapt", "list", str(apk)], capture_output=True, text=True, check=True).stdout.split())
    bundle = json.loads((ROOT / "runtime" / "bundles" / "onnx-int8" / "manifest.json").read_text())
    expected = {"classes.dex", "assets/web/index.html", "assets/web/app.js", "assets/web/loop.js",
                "assets/web/protocol.js", "assets/web/vendor/ort/ort.wasm.min.mjs",
                "assets/web/vendor/ort/ort-wasm-simd-threaded.wasm", "assets/web/bundle/manifest.json",
                *(f"assets/web/bundle/{f['path']}" for f in bundle["files"].values())}
    assert expected <= listing, sorted(expected - listing)
    with zipfile.ZipFile(apk) as z:  # the bundled model files are the shipped ones, byte for byte
        for entry in bundle["files"].values():
            data = z.read(f"assets/web/bundle/{entry['path']}")
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        web = tmp_path / "web"
        for name in z.namelist():
            if name.startswith("assets/web/"):
                target = web / name[len("assets/web/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    dexdump = shutil.which("dexdump")
    if dexdump:
        classes = subprocess.run([dexdump, "-l", "plain", str(apk)], capture_output=True, text=True).stdout
        assert f"L{PACKAGE.replace('.', '/')}/MainActivity;" in classes

    if shutil.which("chromium") or shutil.which("chromium-browser"):  # the APK's own assets run the demo
        done = subprocess.run(["node", "--test", "--test-name-pattern", "APK assets", "test/browser/"], cwd=WEB,
                              capture_output=True, text=True, timeout=600, env={**os.environ, "CIAR_APK_WEB": str(web)})
        assert done.returncode == 0 and "# pass 1" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def test_android_sources_are_java8_without_lambdas():
    """dx (the only dexer on Debian) takes Java 8 bytecode without invokedynamic: no lambdas, no method refs."""
    sources = list((ROOT / "android_demo" / "app" / "src").rglob("*.java"))
    assert sources
    for src in sources:
        text = src.read_text()
        assert "->" not in text and "::" not in text, f"{src}: lambdas or method references cannot be dexed by dx"
        assert "androidx" not in text, f"{src}: AndroidX is not available offline"
