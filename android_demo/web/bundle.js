// The artifact bundle (runtime/bundle.py): manifest checks, file sizes and SHA-256, a tiny .npy reader, the caption
// tokenizer of the manifest, and tau_for (runtime/cli.py). No onnxruntime here.

export const FORMAT_VERSION = 4; // runtime/bundle.py FORMAT_VERSION (2: the device graph takes `neighbours`; 3: it
// returns the step's new cache rows, k_new and v_new; 4: it also returns `cdf`, the draw table, which this loop
// does not read: it draws from the centre logits in sampling.js)
const REQUIRED_KEYS = ['format_version', 'format', 'quantize', 'model', 'caption', 'sampling', 'gate', 'files'];
const ROLES = ['device', 'caption_encoder', 'vq_decoder', 'token_embeddings'];

export class BundleError extends Error {
  constructor(message) { super(message); this.name = 'BundleError'; }
}

/** Check a parsed manifest.json like runtime/bundle.py load_bundle (this runtime runs ONNX bundles only). */
export function checkManifest(manifest, where = 'manifest.json') {
  const missing = REQUIRED_KEYS.filter((k) => !(k in manifest));
  if (missing.length) throw new BundleError(`${where}: missing fields ${JSON.stringify(missing)}`);
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new BundleError(`${where}: format_version ${manifest.format_version} is not supported (this runtime reads ${FORMAT_VERSION}); re-export the bundle`);
  }
  if (manifest.format !== 'onnx') throw new BundleError(`${where}: format ${manifest.format}: the web runtime runs ONNX bundles only`);
  if (!['none', 'int8', 'int4'].includes(manifest.quantize)) throw new BundleError(`${where}: unknown quantization ${manifest.quantize}`);
  const problem = manifest.gate && 'cloud_calls' in manifest.gate ? cloudCallsProblem(manifest.gate.cloud_calls) : null;
  if (problem) throw new BundleError(`${where}: gate.cloud_calls: ${problem}; measure it again with \`ciar export calibrate\`, or delete the field`);
  for (const role of ROLES) if (!(role in manifest.files)) throw new BundleError(`${where}: no '${role}' file listed`);
  return manifest;
}

/** runtime/rates.py cloud_calls_problem: what is wrong with a gate.cloud_calls table, or null (the same words). */
export function cloudCallsProblem(table) {
  if (table === null || typeof table !== 'object' || Array.isArray(table)
      || !['taus', 'calls', 'prefix_fraction'].every((k) => k in table)) return 'needs taus, calls and prefix_fraction';
  const { taus, calls } = table;
  const isNumber = (x) => typeof x === 'number';
  if (!(Array.isArray(taus) && Array.isArray(calls) && taus.length === calls.length && taus.length >= 2
        && [...taus, ...calls].every(isNumber))) {
    return 'taus and calls must be two lists of numbers of the same length, at least two';
  }
  if (!taus.slice(1).every((b, i) => taus[i] >= 0 && taus[i] < b && b < Infinity)) return 'taus must be finite, >= 0 and ascending';
  if (!calls.every((c) => c >= 0 && c <= 1) || calls.slice(1).some((b, i) => b > calls[i])) return 'calls must lie in [0, 1] and not increase';
  if (!isNumber(table.prefix_fraction)) return 'prefix_fraction must be a number';
  return null;
}

async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest('SHA-256', bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Load a bundle through readFile(relativePath) -> Promise<Uint8Array> (fetch in a browser, fs in Node): the
 * manifest, then every listed file with its size and (where crypto.subtle exists: secure contexts, Node) SHA-256.
 * Returns {manifest, files: {role: Uint8Array}, hashesChecked}.
 */
export async function loadBundle(readFile, { verifyHashes = true } = {}) {
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(await readFile('manifest.json')));
  } catch (e) {
    throw new BundleError(`manifest.json: cannot read or parse it (${e.message}); is this an artifact bundle from \`ciar export\`?`);
  }
  checkManifest(manifest);
  const hashesChecked = verifyHashes && Boolean(globalThis.crypto?.subtle);
  const files = {};
  for (const role of ROLES) {
    const entry = manifest.files[role];
    let bytes;
    try {
      bytes = await readFile(entry.path);
    } catch (e) {
      throw new BundleError(`missing file ${entry.path} (${role}): ${e.message}; the bundle is incomplete`);
    }
    if (verifyHashes && bytes.length !== entry.bytes) {
      throw new BundleError(`${entry.path} has ${bytes.length} bytes, the manifest says ${entry.bytes} (truncated or replaced)`);
    }
    if (hashesChecked && (await sha256Hex(bytes)) !== entry.sha256) {
      throw new BundleError(`${entry.path} does not match its SHA-256 in manifest.json (corrupted or modified)`);
    }
    files[role] = bytes;
  }
  return { manifest, files, hashesChecked };
}

const NPY_TYPES = { '<f4': Float32Array, '<f8': Float64Array, '<i4': Int32Array, '<i8': BigInt64Array, '|u1': Uint8Array };

/** A .npy file (format 1.0-3.0, little-endian, C order) as {shape, dtype, data: TypedArray}. */
export function readNpy(bytes) {
  const magic = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
  if (bytes.length < 10 || magic.some((b, i) => bytes[i] !== b)) throw new BundleError('not a .npy file (bad magic)');
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText == null) throw new BundleError(`.npy header not understood: ${header.trim()}`);
  if (fortran !== 'False') throw new BundleError('.npy in Fortran order is not supported');
  const Type = NPY_TYPES[descr];
  if (!Type) throw new BundleError(`.npy dtype ${descr} is not supported (${Object.keys(NPY_TYPES).join(', ')})`);
  const shape = shapeText.split(',').map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + headerLen;
  if (bytes.length - offset !== count * Type.BYTES_PER_ELEMENT) {
    throw new BundleError(`.npy data is ${bytes.length - offset} bytes, shape ${shape} needs ${count * Type.BYTES_PER_ELEMENT}`);
  }
  const data = new Type(bytes.slice(offset).buffer); // a copy: aligned, independent of the file buffer
  return { shape, dtype: descr, data };
}

// Python's str.isspace() characters, for `\s` of a Python pattern (JavaScript's \s differs: it has U+FEFF and
// lacks U+001C..U+001F and U+0085).
const PY_SPACE = '\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';

/** A JavaScript RegExp (flags gu: code points, like Python str patterns) for a Python token pattern. */
export function pythonPattern(source) {
  let out = '';
  let inClass = false;
  for (let i = 0; i < source.length; i++) {
    const c = source[i];
    if (c === '\\' && source[i + 1] === 's') {
      out += inClass ? PY_SPACE : `[${PY_SPACE}]`;
      i++;
    } else if (c === '\\') {
      out += c + source[i + 1];
      i++;
    } else {
      if (c === '[' && !inClass) inClass = true;
      else if (c === ']' && inClass) inClass = false;
      out += c;
    }
  }
  return new RegExp(out, 'gu');
}

/** The caption tokenizer of the manifest (the training rule): lower-case, regex words, vocab ids, pad to max. */
export class Tokenizer {
  constructor(caption) {
    this.vocab = new Map(caption.vocab.map((w, i) => [w, i]));
    this.maxTokens = caption.max_tokens;
    this.pad = caption.pad_id;
    this.unk = caption.unk_id;
    this.lowercase = caption.lowercase !== false;
    this.pattern = pythonPattern(caption.token_pattern);
  }

  words(text) {
    return Array.from((this.lowercase ? text.toLowerCase() : text).matchAll(this.pattern), (m) => m[0]);
  }

  /** {ids: BigInt64Array(maxTokens), mask: Uint8Array(maxTokens), count}; too many words is an error. */
  encode(text) {
    const words = this.words(text);
    if (words.length > this.maxTokens) {
      throw new Error(`the caption has ${words.length} words; this model reads at most ${this.maxTokens}`);
    }
    const ids = new BigInt64Array(this.maxTokens).fill(BigInt(this.pad));
    const mask = new Uint8Array(this.maxTokens);
    words.forEach((w, i) => {
      ids[i] = BigInt(this.vocab.get(w) ?? this.unk);
      mask[i] = 1;
    });
    return { ids, mask, count: words.length };
  }
}

/**
 * runtime/rates.py measured_tau: {tau, source} for `rate` cloud calls per token with a cloud. Inside the manifest's
 * gate.cloud_calls table (`ciar export calibrate`; taus ascending, calls non-increasing): interpolated there. Without
 * a table for this prefix: `fallback`, the quantile table's tau. Outside what it measured: `fallback`, but never
 * inside the table's range (there, the table's end tau), so that fewer calls asked never give a lower tau.
 */
export function measuredTau(manifest, rate, prefixFraction, fallback) {
  const table = manifest.gate.cloud_calls;
  if (!table || table.prefix_fraction !== prefixFraction) return { tau: fallback, source: 'u_quantiles' };
  const { taus, calls } = table;
  const last = taus.length - 1;
  if (rate > calls[0]) return fallback <= taus[0] ? { tau: fallback, source: 'u_quantiles' } : { tau: taus[0], source: 'cloud_calls' };
  if (rate < calls[last]) return fallback >= taus[last] ? { tau: fallback, source: 'u_quantiles' } : { tau: taus[last], source: 'cloud_calls' };
  for (let i = 0; i < last; i++) {
    const hi = calls[i];
    const lo = calls[i + 1];
    if (lo <= rate && rate <= hi) {
      const tau = hi === lo ? taus[i] : taus[i] + (taus[i + 1] - taus[i]) * (hi - rate) / (hi - lo);
      return { tau, source: 'cloud_calls' };
    }
  }
  throw new Error('unreachable: calls[last] <= rate <= calls[0]');
}

/**
 * runtime/cli.py choose_tau: {tau, source}. tauFor's tau, except that with a cloud a rate goes through measuredTau
 * (the bundle's measured cloud-call table for this prefix; default prefix: the manifest's).
 */
export function chooseTau(manifest, tau = null, cloudRate = null, { cloud = false, prefixFraction = null } = {}) {
  const quantile = tauFor(manifest, tau, cloudRate);
  const rate = rateFor(manifest, tau, cloudRate);
  if (rate === null) return { tau: quantile, source: 'tau' };
  if (!cloud) return { tau: quantile, source: 'u_quantiles' };
  return measuredTau(manifest, rate, prefixFraction ?? manifest.gate.prefix_fraction, quantile);
}

/** runtime/cli.py cloud_rate_for: the rate the gate is set by, or null when tau is absolute (given, or the bundle's). */
export function rateFor(manifest, tau = null, cloudRate = null) {
  const gate = manifest.gate;
  if (tau != null || (cloudRate == null && gate.tau != null)) return null;
  return cloudRate ?? gate.cloud_rate ?? 0.3;
}

/** runtime/cli.py tau_for: tau as given; else the cloud rate through the calibration table (quantiles of U). */
export function tauFor(manifest, tau = null, cloudRate = null) {
  const rate = rateFor(manifest, tau, cloudRate);
  if (rate === null) return tau ?? Number(manifest.gate.tau);
  const gate = manifest.gate;
  if (!(rate >= 0 && rate <= 1)) throw new BundleError(`cloud rate must be in [0, 1], got ${rate}`);
  const table = gate.u_quantiles;
  if (!table || !table.length) throw new BundleError('the manifest has no calibration table (gate.u_quantiles); pass tau');
  if (rate <= 0) return Infinity;
  const i = (1 - rate) * (table.length - 1);
  const lo = Math.floor(i);
  const hi = Math.ceil(i);
  return table[lo] + (table[hi] - table[lo]) * (i - lo);
}
