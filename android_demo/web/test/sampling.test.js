// Sampling: top-k / top-p masks and probabilities equal runtime/sampling.py's (fixtures/expected.json), SplitMix64
// reference outputs, seeded determinism, and the inverse-CDF draw.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { filterLogits, processedProbs, sample, SplitMix64 } from '../sampling.js';

const EXPECTED = JSON.parse(readFileSync(new URL('./fixtures/expected.json', import.meta.url)));

test('SplitMix64 reproduces the reference outputs (seed 0 and 2^64 - 1)', () => {
  const { seed, outputs, seed2, outputs2 } = EXPECTED.splitmix64;
  const a = new SplitMix64(BigInt(seed));
  assert.deepEqual(outputs.map(() => a.nextU64().toString()), outputs);
  assert.equal(outputs[0], BigInt('0xe220a8397b1dcdaf').toString()); // the published first output for seed 0
  const b = new SplitMix64(BigInt(seed2));
  assert.deepEqual(outputs2.map(() => b.nextU64().toString()), outputs2);
});

test('random() is in [0, 1), seeded and seed-dependent', () => {
  const draws = (seed) => { const r = new SplitMix64(seed); return Array.from({ length: 1000 }, () => r.random()); };
  const a = draws(42n);
  assert.deepEqual(a, draws(42n));
  assert.notDeepEqual(a, draws(43n));
  assert.ok(a.every((x) => x >= 0 && x < 1));
  const mean = a.reduce((s, x) => s + x, 0) / a.length;
  assert.ok(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`);
});

for (const c of EXPECTED.sampling) {
  test(`filterLogits top_k=${c.top_k} top_p=${c.top_p} keeps what runtime/sampling.py keeps`, () => {
    const kept = [];
    filterLogits(c.logits, c.top_k, c.top_p).forEach((v, i) => { if (Number.isFinite(v)) kept.push(i); });
    assert.deepEqual(kept, c.kept);
    const p = processedProbs(c.logits, c.top_k, c.top_p, false);
    p.forEach((v, i) => assert.ok(Math.abs(v - c.probs[i]) < 1e-6, `prob ${i}: ${v} vs ${c.probs[i]}`));
  });
}

test('greedy is one-hot at the first argmax', () => {
  const p = processedProbs([0.5, 2, 2, -1], 0, 1, true);
  assert.deepEqual(Array.from(p), [0, 1, 0, 0]);
});

test('sample draws only from the support, with the right frequencies, deterministically per seed', () => {
  const probs = processedProbs([0, Math.log(3), -100, Math.log(6)], 2, 1.0, false); // top-2: ids 1 and 3
  assert.equal(probs[0], 0);
  const rng = new SplitMix64(7n);
  const counts = [0, 0, 0, 0];
  for (let i = 0; i < 20000; i++) counts[sample(probs, rng)]++;
  assert.equal(counts[0] + counts[2], 0);
  assert.ok(Math.abs(counts[3] / 20000 - 2 / 3) < 0.02, `${counts}`);
  const seq = (seed) => { const r = new SplitMix64(seed); return Array.from({ length: 50 }, () => sample(probs, r)); };
  assert.deepEqual(seq(1n), seq(1n));
  assert.notDeepEqual(seq(1n), seq(2n));
});
