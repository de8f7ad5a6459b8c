// The bundle: manifest checks, sizes and hashes, the .npy reader, the tokenizer (equal to the Python rule on the
// fixtures' captions) and tau_for.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';
import { BundleError, checkManifest, chooseTau, cloudCallsProblem, loadBundle, readNpy, rateFor, tauFor, Tokenizer } from '../bundle.js';

const EXPECTED = JSON.parse(readFileSync(new URL('./fixtures/expected.json', import.meta.url)));
const BUNDLE = new URL('../../../runtime/bundles/onnx-int8/', import.meta.url);
const MANIFEST = JSON.parse(readFileSync(new URL('manifest.json', BUNDLE)));
const readBundle = async (p) => new Uint8Array(await readFile(new URL(p, BUNDLE)));

for (const c of EXPECTED.tokenizer.cases) {
  test(`tokenizer equals the Python rule on ${JSON.stringify(c.caption)}`, () => {
    const { ids, mask, count } = new Tokenizer(MANIFEST.caption).encode(c.caption);
    assert.deepEqual(Array.from(ids, Number), c.ids);
    assert.equal(count, c.count);
    assert.equal(mask.reduce((a, b) => a + b, 0), c.count);
  });
}

test('a caption over max_tokens words is refused with a clear message', () => {
  assert.throws(() => new Tokenizer(MANIFEST.caption).encode(EXPECTED.tokenizer.too_long), /49 words; this model reads at most 48/);
});

test('tau_for equals runtime/cli.py tau_for', () => {
  for (const { cloud_rate: rate, tau } of EXPECTED.tau_for) {
    const got = tauFor(MANIFEST, null, rate);
    if (tau === null) assert.equal(got, Infinity);
    else assert.ok(Math.abs(got - tau) <= 1e-12 * Math.abs(tau), `${rate}: ${got} vs ${tau}`);
  }
  assert.equal(tauFor(MANIFEST, 0.5, 0.1), 0.5);
  assert.throws(() => tauFor(MANIFEST, null, 2), BundleError);
});

test('cloudCallsProblem says what runtime/rates.py cloud_calls_problem says, and checkManifest refuses a broken table', () => {
  assert.ok(EXPECTED.cloud_calls_problems.length >= 10);
  for (const { table, problem } of EXPECTED.cloud_calls_problems) {
    assert.equal(cloudCallsProblem(table), problem, JSON.stringify(table));
  }
  assert.equal(EXPECTED.cloud_calls_problems[0].problem, null, 'the shipped table is sound');
  for (const { table, problem } of EXPECTED.cloud_calls_problems.slice(1)) {
    const broken = { ...MANIFEST, gate: { ...MANIFEST.gate, cloud_calls: table } };
    assert.throws(() => checkManifest(broken), (e) => e instanceof BundleError && e.message.includes(`gate.cloud_calls: ${problem}`));
  }
  assert.equal(checkManifest(MANIFEST), MANIFEST);
});

test('rateFor equals runtime/cli.py cloud_rate_for: null for an absolute tau, else the rate or the default', () => {
  assert.equal(rateFor(MANIFEST, 0.5, 0.1), null);
  assert.equal(rateFor(MANIFEST, null, 0.1), 0.1);
  assert.equal(rateFor(MANIFEST), MANIFEST.gate.cloud_rate ?? 0.3);
  assert.equal(rateFor({ gate: { tau: 2 } }), null);
  assert.equal(rateFor({ gate: {} }), 0.3);
});

test('chooseTau equals runtime/cli.py choose_tau (with a cloud, the measured cloud-call table)', () => {
  for (const c of EXPECTED.choose_tau) {
    const got = chooseTau(MANIFEST, null, c.cloud_rate, { cloud: c.cloud, prefixFraction: c.prefix_fraction });
    assert.equal(got.source, c.source, `${JSON.stringify(c)}`);
    assert.ok(Math.abs(got.tau - c.tau) <= 1e-12 * Math.abs(c.tau), `${JSON.stringify(c)}: ${got.tau}`);
  }
  assert.ok(EXPECTED.choose_tau.some((c) => c.source === 'cloud_calls'), 'the shipped bundle has a measured table');
  assert.deepEqual(chooseTau(MANIFEST, 0.5, 0.1, { cloud: true }), { tau: 0.5, source: 'tau' });
});

test('readNpy reads the token embeddings (1024 x 256 float32) and refuses broken files', async () => {
  const bytes = await readBundle('token_embeddings.npy');
  const npy = readNpy(bytes);
  assert.deepEqual(npy.shape, [1024, 256]);
  assert.ok(npy.data instanceof Float32Array && npy.data.length === 1024 * 256);
  assert.ok(npy.data.some((x) => x !== 0) && npy.data.every(Number.isFinite));
  assert.throws(() => readNpy(bytes.subarray(0, bytes.length - 4)), /needs/);
  assert.throws(() => readNpy(new Uint8Array(16)), /bad magic/);
});

test('loadBundle checks sizes and SHA-256 like runtime/bundle.py', async () => {
  const b = await loadBundle(readBundle);
  assert.equal(b.hashesChecked, true);
  assert.deepEqual(Object.keys(b.files).sort(), ['caption_encoder', 'device', 'token_embeddings', 'vq_decoder']);
  const flipped = async (p) => {
    const bytes = await readBundle(p);
    if (p === 'device.onnx') bytes[1000] ^= 1;
    return bytes;
  };
  await assert.rejects(loadBundle(flipped), /device.onnx does not match its SHA-256/);
  const truncated = async (p) => (await readBundle(p)).subarray(0, p === 'vq_decoder.onnx' ? 100 : undefined);
  await assert.rejects(loadBundle(truncated), /vq_decoder.onnx has 100 bytes/);
  const missing = async (p) => { if (p === 'caption_encoder.onnx') throw new Error('404'); return readBundle(p); };
  await assert.rejects(loadBundle(missing), /missing file caption_encoder.onnx/);
});

test('checkManifest refuses other versions, formats and missing roles', () => {
  assert.throws(() => checkManifest({ ...MANIFEST, format_version: 1 }), /format_version 1 is not supported.*re-export/);
  assert.throws(() => checkManifest({ ...MANIFEST, format: 'executorch' }), /ONNX bundles only/);
  const { gate, ...noGate } = MANIFEST;
  assert.ok(gate);
  assert.throws(() => checkManifest(noGate), /missing fields/);
  assert.throws(() => checkManifest({ ...MANIFEST, files: { device: MANIFEST.files.device } }), /no 'caption_encoder'/);
});
