// The shared protocol vectors (tests/vectors/protocol_vectors.json): every valid frame encodes byte for byte and
// decodes back to the same frame; every invalid frame is refused with the listed ErrorCode.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import {
  decode, encode, ErrorCode, makeLimits, makeMessage, MsgType, ProtocolError, sparseFromDense,
} from '../protocol.js';

const VECTORS = JSON.parse(readFileSync(new URL('../../../tests/vectors/protocol_vectors.json', import.meta.url)));
const LIMITS = makeLimits(VECTORS.limits);
const hex = (bytes) => Buffer.from(bytes).toString('hex');
const unhex = (s) => new Uint8Array(Buffer.from(s, 'hex'));

function fromFields(type, fields) {
  const f = { type, ...fields };
  for (const key of ['session', 'seed']) if (key in f) f[key] = BigInt(f[key]);
  return f;
}

test('the vectors cover every message type', () => {
  assert.deepEqual(new Set(VECTORS.valid.map((v) => v.type)), new Set(Object.keys(MsgType)));
  assert.ok(VECTORS.invalid.length >= 50);
});

for (const v of VECTORS.valid) {
  test(`valid vector ${v.name}: encodes byte for byte and decodes back`, () => {
    assert.equal(hex(encode(fromFields(v.type, v.fields))), v.hex);
    const decoded = decode(unhex(v.hex), LIMITS);
    assert.equal(decoded.type, v.type);
    assert.equal(hex(encode(decoded)), v.hex); // canonical
    assert.equal(hex(encode(decode(unhex(v.hex).buffer, LIMITS))), v.hex); // an ArrayBuffer, as a WebSocket gives
  });
}

for (const v of VECTORS.invalid) {
  test(`invalid vector ${v.name}: refused with ${v.code_name}`, () => {
    assert.throws(() => decode(unhex(v.hex), LIMITS), (e) => {
      assert.ok(e instanceof ProtocolError, `not a ProtocolError: ${e}`);
      assert.equal(e.code, v.code, `${e.message}`);
      return true;
    });
  });
}

test('decoded fields: u64 as BigInt, Verdict none, fp16 values', () => {
  const byName = Object.fromEntries(VECTORS.valid.map((v) => [v.name, v]));
  const opened = decode(unhex(byName.opened.hex), LIMITS);
  assert.equal(opened.session, 9223372040590704367n);
  assert.deepEqual(Array.from(opened.tokens), [0, 1, 511, 1023]);
  assert.equal(decode(unhex(byName.verdict_final.hex), LIMITS).next_token, null);
  const verify = decode(unhex(byName.verify.hex), LIMITS);
  assert.deepEqual(Array.from(verify.q[0].probs), [0.25, 0.6875, 0.0625]);
  assert.equal(verify.features[0][3], 65504);
  const open = decode(unhex(byName.open.hex), LIMITS);
  assert.equal(open.seed, 18446744073709551557n);
  assert.equal(open.caption, 'un cercle rouge \u00e0 gauche \u2713');
});

test('a text frame is refused as BAD_FRAME', () => {
  assert.throws(() => decode('hello', LIMITS), (e) => e.code === ErrorCode.BAD_FRAME);
});

test('encode refuses what the Python constructors refuse', () => {
  const cases = [
    [{ type: 'Verify', session: 0n, seq: 1, start: 0, tokens: [], drafts: [1], q: [{ ids: [1], probs: [1] }] }, ErrorCode.BAD_FRAME],
    [{ type: 'Verify', session: 1n, seq: 1, start: 0, tokens: [], drafts: [2], q: [{ ids: [1], probs: [1] }] }, ErrorCode.BAD_DISTRIBUTION],
    [{ type: 'Verify', session: 1n, seq: 1, start: 0, tokens: [70000], drafts: [1], q: [{ ids: [1], probs: [1] }] }, ErrorCode.BAD_TOKEN],
    [{ type: 'Verify', session: 1n, seq: 1, start: 0, tokens: [], drafts: [1], q: [{ ids: [1], probs: [1] }], features: [[1e6]] }, ErrorCode.BAD_FEATURES],
    [{ type: 'Open', caption: 'x', seed: 0n, num_tokens: 4, prefix_tokens: 5 }, ErrorCode.BAD_PARAMS],
    [{ type: 'Open', caption: 'x', seed: -1n, num_tokens: 4 }, ErrorCode.BAD_PARAMS],
    [{ type: 'Open', caption: 'x', seed: 0n, num_tokens: 4, top_p: 0 }, ErrorCode.BAD_PARAMS],
    [{ type: 'Hello', auth_token: '\ud800', client: '' }, ErrorCode.BAD_FRAME],
    [{ type: 'Hello', auth_token: '', client: '', versions: [2, 1] }, ErrorCode.BAD_VERSION],
    [{ type: 'Error', code: 99 }, ErrorCode.BAD_FRAME],
    [{ type: 'Verdict', session: 1n, seq: 1, n_accepted: 0, next_token: 0xffff }, ErrorCode.BAD_TOKEN],
  ];
  for (const [message, code] of cases) {
    assert.throws(() => encode(message), (e) => e instanceof ProtocolError && e.code === code, JSON.stringify(message, (k, v) => (typeof v === 'bigint' ? `${v}` : v)));
  }
});

test('round trips of extreme values', () => {
  const messages = [
    { type: 'Hello', auth_token: '', client: '', versions: [1, 2, 7] },
    { type: 'Welcome', limits: makeLimits(), idle_timeout_ms: 0 },
    { type: 'Open', caption: '\u00fc'.repeat(32), seed: (1n << 64n) - 1n, num_tokens: 256, prefix_tokens: 256,
      cfg_scale: 7.5, temperature: 0, top_k: 1024, top_p: 1e-3, use_interval_features: false },
    { type: 'Opened', session: (1n << 64n) - 1n, tokens: Array.from({ length: 256 }, (_, i) => i) },
    { type: 'Verdict', session: 1n, seq: 2 ** 32 - 1, n_accepted: 4, next_token: 1023 },
    { type: 'Resumed', session: 1n, next_seq: 1, position: 256, tokens: [] },
    { type: 'Close' },
    { type: 'Error', code: ErrorCode.INTERNAL, text: '\u00e9'.repeat(32), session: 5n, seq: 3 },
  ];
  const limits = makeLimits({ vocab_size: 1024, max_num_tokens: 256 });
  for (const m of messages) {
    const frame = encode(m);
    assert.equal(hex(encode(decode(frame, limits))), hex(frame), m.type);
  }
});

test('sparseFromDense keeps tiny probabilities at the smallest fp16 and sums within tolerance', () => {
  const dense = new Float64Array(1024).fill(1 / 1024);
  dense[3] = 1e-12;
  const q = sparseFromDense(dense);
  assert.equal(q.ids.length, 1024);
  assert.equal(q.probs[3], 2 ** -24);
  const frame = encode({ type: 'Verify', session: 1n, seq: 1, start: 0, tokens: [], drafts: [3], q: [q] });
  const back = decode(frame, makeLimits({ vocab_size: 1024, max_num_tokens: 256, max_q_support: 1024 }));
  assert.equal(back.q[0].ids.length, 1024);
  assert.equal(makeMessage('Close', {}).session, 0n);
});
