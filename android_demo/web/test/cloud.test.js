// CloudClient over a WebSocket look-alike: the protocol exchange, retries, and the device-only fallback.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { CloudClient, LocalVerifier } from '../cloud.js';
import { FakeCloud } from './fake_cloud.js';

const PARAMS = { caption: 'a red circle', seed: 3n, num_tokens: 256, prefix_tokens: 4, cfg_scale: 3, temperature: 1, top_k: 0, top_p: 1 };
const row = () => new Float32Array(267).fill(0.25);
const client = (cloud, extra = {}) => new CloudClient('ws://fake', { WebSocket: cloud.socketClass(), featureDim: 267, timeoutMs: 2000, ...extra });

test('Hello -> Welcome, Open -> Opened (prefix), Verify -> Verdict, Close', async () => {
  const cloud = new FakeCloud(() => ({ n_accepted: 1, next_token: 9 }));
  const c = client(cloud, { authToken: 'Bearer x' });
  assert.deepEqual(await c.open(PARAMS), [100, 101, 102, 103]);
  assert.equal(c.state, 'online');
  assert.equal(c.model, 'fake-cloud');
  assert.equal(c.session, 0xfedcba9876543210n);
  const v = await c.verify(4, [7, 8], [row(), row()], 5, [5, 6], [0.75, 0.25], row());
  assert.deepEqual(v, { n_accepted: 1, next_token: 9, verified: true });
  const v2 = await c.verify(8, [], [], 6, [6], [1], row()); // frontier: 4 + 2 accepted + 1 draft + 1 next
  assert.equal(v2.verified, true, c.reason);
  await c.close();
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(cloud.received.map((m) => m.type), ['Hello', 'Open', 'Verify', 'Verify', 'Close']);
  const [hello, open, verify] = cloud.received;
  assert.equal(hello.auth_token, 'Bearer x');
  assert.equal(open.use_interval_features, true);
  assert.equal(open.seed, 3n);
  assert.deepEqual(Array.from(verify.tokens), [7, 8]);
  assert.equal(verify.seq, 1);
  assert.equal(cloud.received[3].seq, 2);
  assert.equal(verify.features.length, 3);
  assert.equal(verify.features[0].length, 267);
  assert.equal(cloud.received[4].session, 0xfedcba9876543210n);
});

test('no cloud: open gives no prefix and every verify is unverified', async () => {
  const c = client(new FakeCloud(null, { refuse: true }));
  assert.deepEqual(await c.open(PARAMS), []);
  assert.equal(c.state, 'offline');
  assert.match(c.reason, /cannot connect/);
  assert.deepEqual(await c.verify(0, [], [], 1, [1], [1], row()), { n_accepted: 1, next_token: null, verified: false });
});

test('an Error reply to Hello (UNAUTHORIZED) falls back to device-only with the reason', async () => {
  const c = client(new FakeCloud(null, { unauthorized: true }));
  assert.deepEqual(await c.open(PARAMS), []);
  assert.match(c.reason, /UNAUTHORIZED: bad token/);
});

test('BUSY is retried with the same seq; a dropped connection falls back mid-image', async () => {
  const cloud = new FakeCloud(() => ({ n_accepted: 0, next_token: 11 }), { busyOnce: true, dropAfter: 1 });
  const c = client(cloud);
  await c.open(PARAMS);
  const v = await c.verify(4, [], [], 5, [5, 6], [0.5, 0.5], row());
  assert.deepEqual(v, { n_accepted: 0, next_token: 11, verified: true });
  const verifies = cloud.received.filter((m) => m.type === 'Verify');
  assert.deepEqual(verifies.map((m) => m.seq), [1, 1]);
  const after = await c.verify(5, [], [], 5, [5], [1], row());
  assert.equal(after.verified, false);
  assert.equal(c.state, 'offline');
  assert.match(c.reason, /closed/);
});

test('without a matching feature_dim the client sends no features', async () => {
  const cloud = new FakeCloud(() => ({ n_accepted: 1, next_token: 1 }));
  const c = client(cloud, { featureDim: 12 });
  await c.open(PARAMS);
  await c.verify(4, [], [], 5, [5], [1], new Float32Array(12));
  assert.equal(cloud.received[1].use_interval_features, false);
  assert.equal(cloud.received[2].features[0].length, 0);
});

test('LocalVerifier: no prefix, drafts unverified', async () => {
  const v = new LocalVerifier();
  assert.deepEqual(await v.open(PARAMS), []);
  assert.equal((await v.verify()).verified, false);
});
