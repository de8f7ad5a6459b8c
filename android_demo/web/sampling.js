// Sampling, the JS twin of runtime/sampling.py: top-k (ties at the k-th value kept), then top-p (nucleus), softmax,
// one inverse-CDF draw. The device graph has already applied CFG and temperature.
//
// PRNG: SplitMix64 (Steele, Lea, Flood 2014; the seeder of xoshiro), on BigInt, seeded with the u64 image seed.
// random() = (next() >> 11) / 2^53, a double in [0, 1). It does not reproduce numpy's PCG64 stream: the same seed
// gives the same image in the web demo, not the same image as `ciar-device run`. Arithmetic is float64 (numpy
// filters in float32), so a mask can differ from Python's only for a value exactly at the top-p boundary.

const MASK64 = (1n << 64n) - 1n;

export class SplitMix64 {
  constructor(seed) {
    this.state = BigInt.asUintN(64, BigInt(seed));
  }

  /** The next 64-bit output, as a BigInt. */
  nextU64() {
    this.state = (this.state + 0x9e3779b97f4a7c15n) & MASK64;
    let z = this.state;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
    return z ^ (z >> 31n);
  }

  /** A double in [0, 1) with 53 random bits. */
  random() {
    return Number(this.nextU64() >> 11n) / 2 ** 53;
  }
}

/** -Infinity outside the top-k (ties at the k-th value kept), then outside the nucleus of mass topP. */
export function filterLogits(logits, topK = 0, topP = 1.0) {
  const out = Float64Array.from(logits);
  const n = out.length;
  if (topK && topK < n) {
    const kth = Float64Array.from(out).sort()[n - topK];
    for (let i = 0; i < n; i++) if (out[i] < kth) out[i] = -Infinity;
  }
  if (topP < 1.0) {
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => out[b] - out[a] || a - b); // stable, descending
    const probs = softmax(order.map((i) => out[i]));
    let cum = 0;
    for (let j = 0; j < n; j++) {
      if (cum > topP) out[order[j]] = -Infinity; // mass before this token already exceeds topP
      cum += probs[j];
    }
  }
  return out;
}

export function softmax(x) {
  let m = -Infinity;
  for (const v of x) if (v > m) m = v;
  const e = Float64Array.from(x, (v) => Math.exp(v - m));
  let s = 0;
  for (const v of e) s += v;
  for (let i = 0; i < e.length; i++) e[i] /= s;
  return e;
}

/** The distribution the draft is drawn from (Float64Array); one-hot at the first argmax when greedy. */
export function processedProbs(logits, topK, topP, greedy) {
  if (greedy) {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    const p = new Float64Array(logits.length);
    p[best] = 1;
    return p;
  }
  return softmax(filterLogits(logits, topK, topP));
}

/** One draw by inverse CDF: the first index whose cumulative probability exceeds u * total. */
export function sample(probs, rng) {
  let total = 0;
  for (const p of probs) total += p;
  const u = rng.random() * total;
  let cum = 0;
  for (let i = 0; i < probs.length; i++) {
    cum += probs[i];
    if (cum > u) return i;
  }
  return probs.length - 1;
}
