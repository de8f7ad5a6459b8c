// The ciar wire protocol, version 1 (docs/PROTOCOL.md), in plain JavaScript: the twin of
// cloud_bridge/protocol.py. A frame is a 22-byte little-endian header "<2sBBHQII" (magic "CI", version, type,
// flags, session u64, seq u32, payload length u32) and a typed payload.
//
// Messages are plain objects {type: "Verify", ...fields} with the Python field names; u64 fields (session, seed)
// are BigInt. encode(msg) checks what needs no limits (like the Python constructors) and returns a Uint8Array;
// decode(frame, limits) checks a frame completely and throws nothing but ProtocolError, in the Python order, so
// that a bad frame gets the same ErrorCode here and there (tests/vectors/protocol_vectors.json).
import { fromHalfBits, toHalfBits } from './fp16.js';

export const VERSION = 1;
export const SUPPORTED_VERSIONS = [1];
export const HEADER_BYTES = 22;
export const NO_TOKEN = 0xffff; // "no next token" in a Verdict: the image is complete
export const PROB_TOLERANCE = 5e-3;
export const FP16_TINY = 2 ** -24;
const U16_MAX = 0xffff;
const U32_MAX = 0xffffffff;
const U64_MAX = (1n << 64n) - 1n;

export const MsgType = Object.freeze({
  Hello: 1, Welcome: 2, Open: 3, Opened: 4, Verify: 5, Verdict: 6, Resume: 7, Resumed: 8, Close: 9, Error: 10,
});
const TYPE_NAMES = Object.fromEntries(Object.entries(MsgType).map(([k, v]) => [v, k]));

export const ErrorCode = Object.freeze({
  BAD_VERSION: 1, BAD_FRAME: 2, TOO_LARGE: 3, BAD_TOKEN: 4, BAD_DISTRIBUTION: 5, BAD_FEATURES: 6, BAD_PARAMS: 7,
  BAD_POSITION: 8, BAD_SEQUENCE: 9, UNEXPECTED: 10, UNAUTHORIZED: 11, UNKNOWN_SESSION: 12, FOREIGN_SESSION: 13,
  RATE_LIMITED: 14, BUSY: 15, TIMEOUT: 16, INTERNAL: 17,
});
export const ERROR_NAMES = Object.freeze(Object.fromEntries(Object.entries(ErrorCode).map(([k, v]) => [v, k])));
export const isRetryable = (code) => code === 14 || code === 15 || code === 16;
const E = ErrorCode;

export class ProtocolError extends Error {
  constructor(code, message) {
    super(`${ERROR_NAMES[code] ?? code}: ${message}`);
    this.name = 'ProtocolError';
    this.code = code;
    this.detail = message;
  }
}

// ------------------------------------------------------------------------------------------------ value checks
function int(value, lo, hi, what, code = E.BAD_FRAME) {
  let v = value;
  if (typeof v === 'bigint') {
    if (v < BigInt(lo) || v > BigInt(hi)) throw new ProtocolError(code, `${what} = ${v} is outside [${lo}, ${hi}]`);
    return Number(v);
  }
  if (typeof v === 'boolean') v = Number(v);
  if (typeof v !== 'number' || !Number.isInteger(v)) throw new ProtocolError(E.BAD_FRAME, `${what} must be an integer`);
  if (v < lo || v > hi) throw new ProtocolError(code, `${what} = ${v} is outside [${lo}, ${hi}]`);
  return v;
}

function u64(value, lo, what, code = E.BAD_FRAME) {
  let v = value;
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v)) throw new ProtocolError(E.BAD_FRAME, `${what} must be an integer (BigInt past 2^53)`);
    v = BigInt(v);
  }
  if (typeof v !== 'bigint') throw new ProtocolError(E.BAD_FRAME, `${what} must be an integer`);
  if (v < BigInt(lo) || v > U64_MAX) throw new ProtocolError(code, `${what} = ${v} is outside [${lo}, 2^64 - 1]`);
  return v;
}

function real(value, what) {
  if (typeof value !== 'number') throw new ProtocolError(E.BAD_PARAMS, `${what} must be a number`);
  if (!Number.isFinite(value)) throw new ProtocolError(E.BAD_PARAMS, `${what} must be finite, got ${value}`);
  return value;
}

const ENCODER = new TextEncoder();
const DECODER = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

function utf8(text, what) {
  if (typeof text !== 'string') throw new ProtocolError(E.BAD_FRAME, `${what} must be a string`);
  if (LONE_SURROGATE.test(text)) throw new ProtocolError(E.BAD_FRAME, `${what} is not valid Unicode`);
  const raw = ENCODER.encode(text);
  if (raw.length > U16_MAX) throw new ProtocolError(E.TOO_LARGE, `${what} is ${raw.length} bytes (at most ${U16_MAX})`);
  return raw;
}

function atMost(n, limit, what) {
  if (n > limit) throw new ProtocolError(E.TOO_LARGE, `${n} ${what} (limit ${limit})`);
}

function arrayLike(value, what, code = E.BAD_FRAME) {
  if (value == null || typeof value === 'string' || typeof value.length !== 'number') {
    throw new ProtocolError(code, `${what} is not an array`);
  }
  return value;
}

/** A Uint16Array of token ids (integers; outside 0..65535 is BAD_TOKEN). */
function ids(value, what) {
  const a = arrayLike(value, what);
  if (a instanceof Uint16Array) return a;
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) {
    const v = typeof a[i] === 'bigint' ? Number(a[i]) : a[i];
    if (typeof v !== 'number' || !Number.isInteger(v)) {
      throw new ProtocolError(E.BAD_FRAME, `${what} must be a 1-D integer array`);
    }
    if (v < 0 || v > U16_MAX) throw new ProtocolError(E.BAD_TOKEN, `${what} must be uint16 token ids`);
    out[i] = v;
  }
  return out;
}

/** Numbers rounded to fp16 (a Float64Array of fp16 values; too large becomes inf, which callers refuse). */
function halves(value, what, code) {
  const a = arrayLike(value, what, code);
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) {
    if (typeof a[i] !== 'number') throw new ProtocolError(code, `${what} must be a 1-D real array`);
    out[i] = fromHalfBits(toHalfBits(a[i]));
  }
  return out;
}

function checkVocab(tokens, limits, what) {
  let max = -1;
  for (const t of tokens) max = Math.max(max, t);
  if (max >= limits.vocab_size) throw new ProtocolError(E.BAD_TOKEN, `${what}: id ${max} >= vocab size ${limits.vocab_size}`);
}

// ------------------------------------------------------------------------------------------------------ limits
const LIMIT_FIELDS = [ // wire order in Welcome "<IIHHHHHHH", default, bounds
  ['max_frame_bytes', 8 << 20, HEADER_BYTES, U32_MAX, 4],
  ['max_num_tokens', 4096, 1, U32_MAX, 4],
  ['vocab_size', 16384, 2, U16_MAX, 2],
  ['feature_dim', 0, 0, U16_MAX, 2],
  ['max_verify_tokens', 4096, 0, U16_MAX, 2],
  ['max_drafts', 16, 1, U16_MAX, 2],
  ['max_q_support', U16_MAX, 1, U16_MAX, 2],
  ['max_caption_bytes', 1024, 0, U16_MAX, 2],
  ['max_text_bytes', 4096, 0, U16_MAX, 2],
];

/** What a peer accepts (the server announces its own in Welcome); missing fields take the Python defaults. */
export function makeLimits(fields = {}) {
  const out = {};
  for (const [name, dflt, lo, hi] of LIMIT_FIELDS) {
    out[name] = int(fields[name] ?? dflt, lo, hi, `Limits.${name}`, E.BAD_PARAMS);
  }
  return Object.freeze(out);
}

// ------------------------------------------------------------------------------------------ byte reader/writer
class Writer {
  constructor() { this.parts = []; this.size = 0; }
  push(n, fill) {
    const b = new Uint8Array(n);
    fill(new DataView(b.buffer));
    this.parts.push(b);
    this.size += n;
    return this;
  }
  u8(v) { return this.push(1, (d) => d.setUint8(0, v)); }
  u16(v) { return this.push(2, (d) => d.setUint16(0, v, true)); }
  u32(v) { return this.push(4, (d) => d.setUint32(0, v, true)); }
  u64(v) { return this.push(8, (d) => d.setBigUint64(0, v, true)); }
  f64(v) { return this.push(8, (d) => d.setFloat64(0, v, true)); }
  u16s(values) { return this.push(2 * values.length, (d) => values.forEach((v, i) => d.setUint16(2 * i, v, true))); }
  f16s(values) { return this.u16s(Array.from(values, toHalfBits)); }
  bytes(b) { this.parts.push(b); this.size += b.length; return this; }
  text(raw) { return this.u16(raw.length).bytes(raw); }
  concat() {
    const out = new Uint8Array(this.size);
    let at = 0;
    for (const p of this.parts) { out.set(p, at); at += p.length; }
    return out;
  }
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = HEADER_BYTES;
  }
  take(n) {
    if (n > this.bytes.length - this.pos) throw new ProtocolError(E.BAD_FRAME, 'payload is truncated');
    this.pos += n;
    return this.pos - n;
  }
  u8() { return this.view.getUint8(this.take(1)); }
  u16() { return this.view.getUint16(this.take(2), true); }
  u32() { return this.view.getUint32(this.take(4), true); }
  u64() { return this.view.getBigUint64(this.take(8), true); }
  f64() { return this.view.getFloat64(this.take(8), true); }
  u16s(count) {
    const at = this.take(2 * count);
    const out = new Uint16Array(count);
    for (let i = 0; i < count; i++) out[i] = this.view.getUint16(at + 2 * i, true);
    return out;
  }
  f16s(count) { return Float64Array.from(this.u16s(count), fromHalfBits); }
  text(what) {
    const n = this.u16();
    const at = this.take(n);
    try {
      return DECODER.decode(this.bytes.subarray(at, at + n));
    } catch {
      throw new ProtocolError(E.BAD_FRAME, `${what} is not valid UTF-8`);
    }
  }
  end() {
    const left = this.bytes.length - this.pos;
    if (left) throw new ProtocolError(E.BAD_FRAME, `${left} trailing bytes`);
  }
}

// ---------------------------------------------------------------------------------------------------- messages
// Per type: which header ids it carries, make (the constructor checks, returns the normalised message),
// write (payload), parse (payload -> make), validate (checks against the receiver's limits).
function sparseQ(q) {
  if (q == null || typeof q !== 'object') throw new ProtocolError(E.BAD_FRAME, 'need one SparseQ per draft');
  const qIds = ids(q.ids, 'q ids');
  const probs = halves(q.probs, 'q probabilities', E.BAD_DISTRIBUTION);
  if (qIds.length !== probs.length || !qIds.length) {
    throw new ProtocolError(E.BAD_DISTRIBUTION, `${qIds.length} q ids and ${probs.length} probabilities`);
  }
  for (let i = 1; i < qIds.length; i++) {
    if (qIds[i] <= qIds[i - 1]) throw new ProtocolError(E.BAD_DISTRIBUTION, 'q ids must be strictly ascending (no duplicates)');
  }
  let sum = 0;
  for (const p of probs) {
    if (!(p > 0 && p <= 1)) throw new ProtocolError(E.BAD_DISTRIBUTION, 'q probabilities must be finite and in (0, 1]');
    sum += p;
  }
  if (Math.abs(sum - 1) > PROB_TOLERANCE) throw new ProtocolError(E.BAD_DISTRIBUTION, `q sums to ${sum.toFixed(6)}, not 1`);
  return { ids: qIds, probs };
}

/** The support of a dense probability vector (entries > 0; tiny ones kept at the smallest fp16). */
export function sparseFromDense(q) {
  const outIds = [];
  const probs = [];
  for (let i = 0; i < q.length; i++) {
    if (q[i] > 0) { outIds.push(i); probs.push(Math.max(q[i], FP16_TINY)); }
  }
  return sparseQ({ ids: outIds, probs });
}

function featureMatrix(value, rows) {
  const f = value == null ? Array.from({ length: rows }, () => []) : arrayLike(value, 'features', E.BAD_FEATURES);
  const cols = f.length ? arrayLike(f[0], 'features', E.BAD_FEATURES).length : 0;
  const out = [];
  for (const row of f) {
    const r = halves(arrayLike(row, 'features', E.BAD_FEATURES), 'features', E.BAD_FEATURES);
    if (r.length !== cols) throw new ProtocolError(E.BAD_FEATURES, 'features must be a 2-D real array');
    out.push(r);
  }
  if (out.length !== rows) throw new ProtocolError(E.BAD_FEATURES, `features have ${out.length} rows, need n + k = ${rows}`);
  atMost(cols, U16_MAX, 'feature columns');
  for (const r of out) {
    for (const x of r) if (!Number.isFinite(x)) throw new ProtocolError(E.BAD_FEATURES, 'features must be finite');
  }
  return out;
}

const featureCols = (m) => (m.features.length ? m.features[0].length : 0);

const SPECS = {
  Hello: {
    header: [],
    make(f) {
      utf8(f.auth_token, 'auth token');
      utf8(f.client, 'client name');
      const given = f.versions ?? SUPPORTED_VERSIONS;
      if (typeof given[Symbol.iterator] !== 'function') throw new ProtocolError(E.BAD_FRAME, 'versions must be a sequence of integers');
      const versions = Array.from(given, (v) => int(v, 1, 255, 'version', E.BAD_VERSION));
      const ascending = versions.every((v, i) => i === 0 || v > versions[i - 1]);
      if (versions.length < 1 || versions.length > 255 || !ascending) {
        throw new ProtocolError(E.BAD_VERSION, 'versions must be 1 to 255 distinct ascending numbers');
      }
      return { auth_token: f.auth_token, client: f.client, versions };
    },
    write: (m, w) => w.text(utf8(m.auth_token)).text(utf8(m.client)).u8(m.versions.length).bytes(Uint8Array.from(m.versions)),
    parse(r) {
      const auth_token = r.text('auth token');
      const client = r.text('client name');
      const n = r.u8();
      const at = r.take(n);
      return { auth_token, client, versions: Array.from(r.bytes.subarray(at, at + n)) };
    },
    validate(m, limits) {
      atMost(utf8(m.auth_token).length, limits.max_text_bytes, 'bytes of auth token');
      atMost(utf8(m.client).length, limits.max_text_bytes, 'bytes of client name');
    },
  },
  Welcome: {
    header: [],
    make(f) {
      if (f.limits == null || typeof f.limits !== 'object') throw new ProtocolError(E.BAD_FRAME, 'limits must be a Limits');
      const model = f.model ?? '';
      utf8(model, 'model name');
      return { limits: makeLimits(f.limits), idle_timeout_ms: int(f.idle_timeout_ms, 0, U32_MAX, 'idle timeout'), model };
    },
    write(m, w) {
      for (const [name, , , , size] of LIMIT_FIELDS) (size === 4 ? w.u32(m.limits[name]) : w.u16(m.limits[name]));
      w.u32(m.idle_timeout_ms).text(utf8(m.model));
    },
    parse(r) {
      const raw = {};
      for (const [name, , , , size] of LIMIT_FIELDS) raw[name] = size === 4 ? r.u32() : r.u16();
      const limits = makeLimits(raw); // checked before the rest is read, as in Python
      const idle_timeout_ms = r.u32();
      return { limits, idle_timeout_ms, model: r.text('model name') };
    },
    validate: (m, limits) => atMost(utf8(m.model).length, limits.max_text_bytes, 'bytes of model name'),
  },
  Open: {
    header: [],
    make(f) {
      utf8(f.caption, 'caption');
      const m = { caption: f.caption, seed: u64(f.seed, 0, 'seed', E.BAD_PARAMS) };
      m.num_tokens = int(f.num_tokens, 1, U32_MAX, 'num_tokens', E.BAD_PARAMS);
      m.prefix_tokens = int(f.prefix_tokens ?? 0, 0, m.num_tokens, 'prefix_tokens', E.BAD_PARAMS);
      m.top_k = int(f.top_k ?? 0, 0, U16_MAX, 'top_k', E.BAD_PARAMS);
      m.cfg_scale = real(f.cfg_scale ?? 1.0, 'cfg_scale');
      m.temperature = real(f.temperature ?? 1.0, 'temperature');
      m.top_p = real(f.top_p ?? 1.0, 'top_p');
      for (const [name, ok] of [['cfg_scale', m.cfg_scale >= 0], ['temperature', m.temperature >= 0],
        ['top_p', m.top_p > 0 && m.top_p <= 1]]) {
        if (!ok) throw new ProtocolError(E.BAD_PARAMS, `${name} = ${m[name]} is out of range`);
      }
      const feats = f.use_interval_features ?? true;
      if (typeof feats !== 'boolean') throw new ProtocolError(E.BAD_PARAMS, 'use_interval_features must be a bool');
      m.use_interval_features = feats;
      return m;
    },
    write: (m, w) => w.u64(m.seed).f64(m.cfg_scale).f64(m.temperature).f64(m.top_p).u32(m.num_tokens)
      .u32(m.prefix_tokens).u16(m.top_k).u16(m.use_interval_features ? 1 : 0).text(utf8(m.caption)),
    parse(r) {
      const seed = r.u64(); const cfg_scale = r.f64(); const temperature = r.f64(); const top_p = r.f64();
      const num_tokens = r.u32(); const prefix_tokens = r.u32(); const top_k = r.u16(); const options = r.u16();
      if (options & ~1) throw new ProtocolError(E.BAD_FRAME, `unknown Open options 0x${options.toString(16)}`);
      return { caption: r.text('caption'), seed, num_tokens, prefix_tokens, cfg_scale, temperature, top_k, top_p,
        use_interval_features: Boolean(options) };
    },
    validate(m, limits) {
      atMost(utf8(m.caption).length, limits.max_caption_bytes, 'bytes of caption');
      atMost(m.num_tokens, limits.max_num_tokens, 'image tokens');
      if (m.top_k > limits.vocab_size) throw new ProtocolError(E.BAD_PARAMS, `top_k ${m.top_k} > vocab size ${limits.vocab_size}`);
    },
  },
  Opened: {
    header: ['session'],
    make: (f) => ({ session: u64(f.session, 1, 'session'), tokens: ids(f.tokens, 'prefix tokens') }),
    write: (m, w) => w.u32(m.tokens.length).u16s(m.tokens),
    parse: (r) => ({ tokens: r.u16s(r.u32()) }),
    validate(m, limits) {
      atMost(m.tokens.length, limits.max_num_tokens, 'prefix tokens');
      checkVocab(m.tokens, limits, 'prefix tokens');
    },
  },
  Verify: {
    header: ['session', 'seq'],
    make(f) {
      const q = Array.isArray(f.q) ? f.q.map(sparseQ) : null; // SparseQ objects exist before the Verify
      const m = { session: u64(f.session, 1, 'session'), seq: int(f.seq, 1, U32_MAX, 'seq') };
      m.start = int(f.start, 0, U32_MAX, 'start', E.BAD_POSITION);
      m.tokens = ids(f.tokens, 'tokens');
      m.drafts = ids(f.drafts, 'drafts');
      atMost(m.tokens.length, U16_MAX, 'accepted tokens');
      if (m.drafts.length < 1 || m.drafts.length > U16_MAX) {
        throw new ProtocolError(E.BAD_FRAME, `${m.drafts.length} drafts (need 1 .. ${U16_MAX})`);
      }
      if (!q || q.length !== m.drafts.length) throw new ProtocolError(E.BAD_FRAME, 'need one SparseQ per draft');
      m.drafts.forEach((d, i) => {
        if (!q[i].ids.includes(d)) throw new ProtocolError(E.BAD_DISTRIBUTION, `draft ${i} (token ${d}) is outside its q`);
      });
      m.q = q;
      m.features = featureMatrix(f.features, m.tokens.length + m.drafts.length);
      return m;
    },
    write(m, w) {
      w.u32(m.start).u16(m.tokens.length).u16(m.drafts.length).u16(featureCols(m));
      w.u16s(m.tokens).u16s(m.drafts).u16s(m.q.map((x) => x.ids.length));
      for (const x of m.q) w.u16s(x.ids);
      for (const x of m.q) w.f16s(x.probs);
      for (const row of m.features) w.f16s(row);
    },
    parse(r) {
      const start = r.u32(); const n = r.u16(); const k = r.u16(); const f = r.u16();
      const tokens = r.u16s(n); const drafts = r.u16s(k); const counts = r.u16s(k);
      const total = counts.reduce((a, b) => a + b, 0);
      const qIds = r.u16s(total); const qProbs = r.f16s(total);
      const q = [];
      let at = 0;
      for (const c of counts) { q.push(sparseQ({ ids: qIds.slice(at, at + c), probs: qProbs.slice(at, at + c) })); at += c; }
      const flat = r.f16s((n + k) * f);
      const features = Array.from({ length: n + k }, (_, i) => flat.slice(i * f, (i + 1) * f));
      return { start, tokens, drafts, q, features };
    },
    validate(m, limits) {
      const n = m.tokens.length; const k = m.drafts.length; const f = featureCols(m);
      atMost(n, limits.max_verify_tokens, 'accepted tokens');
      atMost(k, limits.max_drafts, 'drafts');
      if (f !== 0 && f !== limits.feature_dim) throw new ProtocolError(E.BAD_FEATURES, `${f} feature columns (0 or ${limits.feature_dim})`);
      if (m.start + n + k > limits.max_num_tokens) {
        throw new ProtocolError(E.BAD_POSITION, `positions ${m.start} .. ${m.start + n + k - 1} past ${limits.max_num_tokens} image tokens`);
      }
      checkVocab(m.tokens, limits, 'tokens');
      checkVocab(m.drafts, limits, 'drafts');
      for (const x of m.q) {
        atMost(x.ids.length, limits.max_q_support, 'q support entries');
        checkVocab(x.ids, limits, 'q ids');
      }
    },
  },
  Verdict: {
    header: ['session', 'seq'],
    make(f) {
      const m = { session: u64(f.session, 1, 'session'), seq: int(f.seq, 1, U32_MAX, 'seq') };
      m.n_accepted = int(f.n_accepted, 0, U16_MAX, 'n_accepted');
      m.next_token = f.next_token == null ? null : int(f.next_token, 0, NO_TOKEN - 1, 'next_token', E.BAD_TOKEN);
      return m;
    },
    write: (m, w) => w.u16(m.n_accepted).u16(m.next_token ?? NO_TOKEN),
    parse(r) {
      const n_accepted = r.u16(); const token = r.u16();
      return { n_accepted, next_token: token === NO_TOKEN ? null : token };
    },
    validate(m, limits) {
      atMost(m.n_accepted, limits.max_drafts, 'accepted drafts');
      if (m.next_token != null && m.next_token >= limits.vocab_size) {
        throw new ProtocolError(E.BAD_TOKEN, `next token ${m.next_token} >= vocab ${limits.vocab_size}`);
      }
    },
  },
  Resume: {
    header: ['session'],
    make: (f) => ({ session: u64(f.session, 1, 'session'), last_seq: int(f.last_seq, 0, U32_MAX, 'last_seq') }),
    write: (m, w) => w.u32(m.last_seq),
    parse: (r) => ({ last_seq: r.u32() }),
    validate() {},
  },
  Resumed: {
    header: ['session'],
    make: (f) => ({ session: u64(f.session, 1, 'session'), next_seq: int(f.next_seq, 1, U32_MAX, 'next_seq'),
      position: int(f.position, 0, U32_MAX, 'position', E.BAD_POSITION), tokens: ids(f.tokens, 'missed tokens') }),
    write: (m, w) => w.u32(m.next_seq).u32(m.position).u32(m.tokens.length).u16s(m.tokens),
    parse(r) {
      const next_seq = r.u32(); const position = r.u32();
      return { next_seq, position, tokens: r.u16s(r.u32()) };
    },
    validate(m, limits) {
      atMost(m.tokens.length, limits.max_num_tokens, 'missed tokens');
      if (m.position + m.tokens.length > limits.max_num_tokens) {
        throw new ProtocolError(E.BAD_POSITION, `tokens run past ${limits.max_num_tokens} image tokens`);
      }
      checkVocab(m.tokens, limits, 'missed tokens');
    },
  },
  Close: {
    header: ['session'],
    make(f) {
      const reason = f.reason ?? '';
      const session = u64(f.session ?? 0n, 0, 'session');
      utf8(reason, 'close reason');
      return { session, reason };
    },
    write: (m, w) => w.text(utf8(m.reason)),
    parse: (r) => ({ reason: r.text('close reason') }),
    validate: (m, limits) => atMost(utf8(m.reason).length, limits.max_text_bytes, 'bytes of close reason'),
  },
  Error: {
    header: ['session', 'seq'],
    make(f) {
      const code = int(f.code, 0, U16_MAX, 'error code');
      if (!(code in ERROR_NAMES)) throw new ProtocolError(E.BAD_FRAME, `unknown error code ${code}`);
      const text = f.text ?? '';
      utf8(text, 'error text');
      return { code, text, session: u64(f.session ?? 0n, 0, 'session'), seq: int(f.seq ?? 0, 0, U32_MAX, 'seq') };
    },
    write: (m, w) => w.u16(m.code).text(utf8(m.text)),
    parse: (r) => ({ code: r.u16(), text: r.text('error text') }),
    validate: (m, limits) => atMost(utf8(m.text).length, limits.max_text_bytes, 'bytes of error text'),
  },
};

function specOf(type) {
  const spec = SPECS[type];
  if (!spec) throw new ProtocolError(E.BAD_FRAME, `unknown message type ${type}`);
  return spec;
}

/** A checked, normalised message (the Python constructor): throws ProtocolError like it. */
export function makeMessage(type, fields = {}) {
  return { type, ...specOf(type).make(fields) };
}

/** Check a message against a receiver's limits (what decode would check there); throws ProtocolError. */
export function validateMessage(message, limits) {
  const m = makeMessage(message.type, message);
  specOf(message.type).validate(m, limits);
  return m;
}

/** The frame of a message: header + payload, as one Uint8Array. */
export function encode(message) {
  const spec = specOf(message.type);
  const m = makeMessage(message.type, message);
  const payload = new Writer();
  spec.write(m, payload);
  const body = payload.concat();
  const frame = new Uint8Array(HEADER_BYTES + body.length);
  const d = new DataView(frame.buffer);
  frame[0] = 0x43; frame[1] = 0x49; // "CI"
  d.setUint8(2, VERSION);
  d.setUint8(3, MsgType[m.type]);
  d.setUint16(4, 0, true);
  d.setBigUint64(6, spec.header.includes('session') ? m.session : 0n, true);
  d.setUint32(14, spec.header.includes('seq') ? m.seq : 0, true);
  d.setUint32(18, body.length, true);
  frame.set(body, HEADER_BYTES);
  return frame;
}

function asBytes(frame) {
  if (frame instanceof Uint8Array) return frame;
  if (frame instanceof ArrayBuffer) return new Uint8Array(frame);
  if (ArrayBuffer.isView(frame)) return new Uint8Array(frame.buffer, frame.byteOffset, frame.byteLength);
  throw new ProtocolError(E.BAD_FRAME, 'not a binary frame');
}

/** Check a frame's size and header (not its payload). */
export function readHeader(frame, limits) {
  const bytes = asBytes(frame);
  const size = bytes.length;
  if (size > limits.max_frame_bytes) throw new ProtocolError(E.TOO_LARGE, `frame of ${size} bytes (limit ${limits.max_frame_bytes})`);
  if (size < HEADER_BYTES) throw new ProtocolError(E.BAD_FRAME, `frame of ${size} bytes is shorter than the header`);
  const d = new DataView(bytes.buffer, bytes.byteOffset, size);
  if (bytes[0] !== 0x43 || bytes[1] !== 0x49) throw new ProtocolError(E.BAD_FRAME, 'bad magic');
  const version = d.getUint8(2);
  if (version !== VERSION) throw new ProtocolError(E.BAD_VERSION, `version ${version} (this peer speaks ${VERSION})`);
  const kind = d.getUint8(3);
  if (!(kind in TYPE_NAMES)) throw new ProtocolError(E.BAD_FRAME, `unknown message type ${kind}`);
  const flags = d.getUint16(4, true);
  if (flags) throw new ProtocolError(E.BAD_FRAME, `flags 0x${flags.toString(16)}: none are defined in version ${VERSION}`);
  const length = d.getUint32(18, true);
  if (length !== size - HEADER_BYTES) {
    throw new ProtocolError(E.BAD_FRAME, `payload length ${length} but ${size - HEADER_BYTES} bytes follow`);
  }
  return { type: TYPE_NAMES[kind], session: d.getBigUint64(6, true), seq: d.getUint32(14, true), payloadBytes: length, bytes };
}

/** Parse and fully validate one frame against the receiver's limits. Throws only ProtocolError. */
export function decode(frame, limits) {
  const header = readHeader(frame, limits);
  const spec = SPECS[header.type];
  const headerIds = {};
  for (const name of ['session', 'seq']) {
    const value = header[name];
    if (spec.header.includes(name)) headerIds[name] = value;
    else if (value) throw new ProtocolError(E.BAD_FRAME, `${header.type} frames carry ${name} 0, got ${value}`);
  }
  const reader = new Reader(header.bytes);
  const message = makeMessage(header.type, { ...headerIds, ...spec.parse(reader) });
  reader.end();
  spec.validate(message, limits);
  return message;
}
