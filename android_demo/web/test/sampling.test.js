// Sampling: top-k / top-p masks, probabilities and draws equal runtime/sampling.py's (fixtures/expected.json), the
// uniforms equal numpy's default_rng, seeded determinism, and the inverse-CDF draw.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import {
  draw, drawAt, drawTable, filterLogits, Pcg64, processedProbs, seedSequenceState, uniforms,
} from '../sampling.js';

const EXPECTED = JSON.parse(readFileSync(new URL('./fixtures/expected.json', import.meta.url)));

test('seedSequenceState and uniforms reproduce numpy default_rng (small, large and the largest u64 seeds)', () => {
  for (const c of EXPECTED.pcg64) {
    assert.deepEqual(seedSequenceState(BigInt(c.seed)).map(String), c.state, `state, seed ${c.seed}`);
    assert.deepEqual(Array.from(uniforms(BigInt(c.seed), c.uniforms.length)), c.uniforms, `seed ${c.seed}`);
  }
  assert.equal(EXPECTED.pcg64[0].uniforms[0], 0.6369616873214543); // np.random.default_rng(0).random(), published
});

test('uniforms are in [0, 1), seeded and seed-dependent', () => {
  const a = Array.from(uniforms(42n, 1000));
  assert.deepEqual(a, Array.from(uniforms(42n, 1000)));
  assert.notDeepEqual(a, Array.from(uniforms(43n, 1000)));
  assert.ok(a.every((x) => x >= 0 && x < 1));
  const mean = a.reduce((s, x) => s + x, 0) / a.length;
  assert.ok(Math.abs(mean - 0.5) < 0.05, `mean ${mean}`);
  const rng = new Pcg64(42n); // the class behind uniforms()
  assert.deepEqual(a.slice(0, 3), [rng.random(), rng.random(), rng.random()]);
});

for (const c of EXPECTED.sampling) {
  test(`filterLogits top_k=${c.top_k} top_p=${c.top_p} keeps what runtime/sampling.py keeps`, () => {
    const kept = [];
    filterLogits(c.logits, c.top_k, c.top_p).forEach((v, i) => { if (Number.isFinite(v)) kept.push(i); });
    assert.deepEqual(kept, c.kept);
    const p = processedProbs(c.logits, c.top_k, c.top_p, false);
    p.forEach((v, i) => assert.ok(Math.abs(v - c.probs[i]) < 1e-6, `prob ${i}: ${v} vs ${c.probs[i]}`));
  });
  test(`draw top_k=${c.top_k} top_p=${c.top_p} gives runtime/sampling.py Sampler.draw's tokens`, () => {
    assert.deepEqual(c.uniforms.map((u) => draw(c.logits, u, c.top_k, c.top_p, false)), c.draws);
    if (!c.top_k && c.top_p >= 1) { // a given table (the graph's cdf) is what the unfiltered draw searches
      const table = drawTable(c.logits);
      assert.deepEqual(c.uniforms.map((u) => draw(c.logits, u, 0, 1, false, table)), c.draws);
      assert.notDeepEqual(c.uniforms.map((u) => draw(c.logits, u, 0, 1, false, table.map((_, i) => i + 1))), c.draws);
    }
  });
}

test('greedy is one-hot at the first argmax', () => {
  const p = processedProbs([0.5, 2, 2, -1], 0, 1, true);
  assert.deepEqual(Array.from(p), [0, 1, 0, 0]);
});

test('draw takes only tokens in the support, with the right frequencies, deterministically per seed', () => {
  const logits = [0, Math.log(3), -100, Math.log(6)];
  const us = uniforms(7n, 20000);
  const counts = [0, 0, 0, 0];
  for (const u of us) counts[draw(logits, u, 2, 1.0, false)]++; // top-2: ids 1 and 3
  assert.equal(counts[0] + counts[2], 0);
  assert.ok(Math.abs(counts[3] / 20000 - 2 / 3) < 0.02, `${counts}`);
  assert.equal(drawAt(Float64Array.of(1, 2, 4), 0), 0);
  assert.equal(drawAt(Float64Array.of(1, 2, 4), 0.25), 1); // 1 is not above 1: the next entry (searchsorted right)
  assert.equal(drawAt(Float64Array.of(1, 2, 4), 0.9999), 2);
  assert.equal(draw([0.5, 2, 2, -1], 0.1, 0, 1, true), 1); // greedy: the first argmax
});
