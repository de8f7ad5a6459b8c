#!/usr/bin/env bash
# Build a signed debug APK of the ciar WebView demo offline from Debian packages (docs: android_demo/README.md).
#
#   bash android_demo/build.sh            -> android_demo/build/ciar-demo.apk
#
# Path: javac (Java 8 bytecode) against android.jar (API 23) -> dx -> aapt package (manifest, res, assets) ->
# zipalign -> apksigner with a debug keystore made here (never committed). android.jar and dx come from two
# Architecture: all packages of Debian 11 (bullseye), fetched once with a private apt configuration (the system's
# apt sources are not touched) and checked against the SHA-256 pinned below; bookworm has no android.jar and no dx.
# Needs (bookworm): default-jdk-headless (javac, keytool), aapt, zipalign, apksigner, dpkg-deb; node + npm for the
# onnxruntime-web files (npm ci --prefix android_demo/web).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
OUT="$HERE/build"
BUNDLE="${CIAR_BUNDLE:-$ROOT/runtime/bundles/onnx-int8}"
WEB="$HERE/web"
ORT_DIST="$WEB/node_modules/onnxruntime-web/dist"
APK="$OUT/ciar-demo.apk"

# bullseye packages: name version sha256 (from the signed bullseye Packages index)
DEBS=(
  "dalvik-exchange 10.0.0+r36-1 8fc128db7c27253d963eb9b33de79b197162a4749d2ba69019b2fd0664cbd7fe"
  "libandroid-23-java 6.0.1+r72-6 8af1b6df556971dda0a6da3536ea526a838e0c363afcdd454213d8bce94793e3"
)

die() { echo "build.sh: error: $*" >&2; exit 1; }
for tool in javac keytool aapt zipalign apksigner dpkg-deb apt-get; do
  command -v "$tool" >/dev/null || die "$tool not found; apt-get install -y --no-install-recommends default-jdk-headless aapt zipalign apksigner"
done
[ -f "$BUNDLE/manifest.json" ] || die "no device bundle at $BUNDLE (set CIAR_BUNDLE)"
if [ ! -f "$ORT_DIST/ort.wasm.min.mjs" ]; then
  command -v npm >/dev/null || die "onnxruntime-web is not installed and npm is missing"
  npm ci --no-audit --no-fund --prefix "$WEB"
fi
mkdir -p "$OUT/debs" "$OUT/sdk"

# --- 1. android.jar (API 23) and dx, from bullseye -----------------------------------------------------------
mirror() { # the Debian mirror this machine's apt already uses
  local m
  m=$(grep -hoE '^(URIs:|deb) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
      | grep -oE 'https?://[^ ]+' | head -n1 || true)
  echo "${DEBIAN_MIRROR:-${m%/}}"
}
fetch_debs() {
  local apt="$OUT/apt" url
  url="$(mirror)"
  [ -n "$url" ] || die "no Debian mirror found in /etc/apt sources; set DEBIAN_MIRROR=http://.../debian"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  : > "$apt/status"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $url bullseye main" > "$apt/sources.list"
  local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$apt/lists"
           -o "Dir::Cache=$apt/cache" -o "Dir::State::status=$apt/status" -o APT::Sandbox::User=root)
  apt-get "${o[@]}" -q update >/dev/null
  local names=()
  for d in "${DEBS[@]}"; do set -- $d; names+=("$1=$2"); done
  (cd "$OUT/debs" && apt-get "${o[@]}" -q download "${names[@]}" >/dev/null)
}
for d in "${DEBS[@]}"; do
  set -- $d
  f="$OUT/debs/${1}_${2}_all.deb"
  [ -f "$f" ] || fetch_debs
  [ -f "$f" ] || die "could not download $1 $2 from bullseye"
  echo "$3  $f" | sha256sum -c --quiet - || die "$f does not match its pinned SHA-256"
  dpkg-deb -x "$f" "$OUT/sdk"
done
AJAR="$OUT/sdk/usr/share/java/com.android.android-23.jar"
DX="$OUT/sdk/usr/share/java/com.android.dx-10.0.0.jar"
[ -f "$AJAR" ] && [ -f "$DX" ] || die "android.jar or dx.jar missing after extracting the debs"

# --- 2. assets: the web page, onnxruntime-web (WASM build only), the device bundle ---------------------------
STAGE="$OUT/stage"
rm -rf "$STAGE" && mkdir -p "$STAGE/assets/web/vendor/ort" "$STAGE/assets/web/bundle" "$STAGE/classes"
cp "$WEB"/{index.html,style.css,app.js,loop.js,cloud.js,protocol.js,fp16.js,sampling.js,bundle.js} "$STAGE/assets/web/"
cp "$ORT_DIST"/{ort.wasm.min.mjs,ort-wasm-simd-threaded.mjs,ort-wasm-simd-threaded.wasm} "$STAGE/assets/web/vendor/ort/"
cp "$BUNDLE/manifest.json" "$STAGE/assets/web/bundle/"
python3 - "$BUNDLE" "$STAGE/assets/web/bundle" <<'PY'
import json, shutil, sys
src, dst = sys.argv[1:]
for entry in json.load(open(f"{src}/manifest.json"))["files"].values():
    shutil.copy(f"{src}/{entry['path']}", f"{dst}/{entry['path']}")
PY

# --- 3. Java 8 -> dex ----------------------------------------------------------------------------------------
javac -nowarn -source 8 -target 8 -bootclasspath "$AJAR" -Xlint:-options -d "$STAGE/classes" \
  $(find "$HERE/app/src" -name '*.java')
java -jar "$DX" --dex --min-sdk-version=24 --output="$STAGE/classes.dex" "$STAGE/classes"

# --- 4. package, align, sign ---------------------------------------------------------------------------------
aapt package -f -M "$HERE/app/AndroidManifest.xml" -S "$HERE/app/res" -A "$STAGE/assets" -I "$AJAR" \
  -0 onnx -0 npy -F "$STAGE/unsigned.apk"
(cd "$STAGE" && aapt add unsigned.apk classes.dex >/dev/null)
zipalign -f -p 4 "$STAGE/unsigned.apk" "$STAGE/aligned.apk"
KS="$OUT/debug.keystore"
if [ ! -f "$KS" ]; then
  keytool -genkeypair -keystore "$KS" -storepass android -keypass android -alias debug -keyalg RSA -keysize 2048 \
    -validity 10000 -dname "CN=ciar debug,O=ciar,C=US" >/dev/null 2>&1
fi
apksigner sign --ks "$KS" --ks-pass pass:android --key-pass pass:android --out "$APK" "$STAGE/aligned.apk"
apksigner verify "$APK"
echo "built $APK ($(du -h "$APK" | cut -f1))"
