// Sampling, the JS twin of runtime/sampling.py: top-k (ties at the k-th value kept), then top-p (nucleus), softmax
// (what a Verify sends), and the draft's inverse-CDF draw. The device graph has already applied CFG and temperature.
//
// Uniforms: numpy's `np.random.default_rng(seed).random(n)` (PCG64 seeded through SeedSequence), on BigInt, one per
// image position, as runtime/generator.py draws them: the draw at position j uses the j-th uniform, so a seed gives
// the Python runtime's image (the graph's float rounding differs between WASM and x86 by ulps, so a token could
// differ where a uniform falls that close to a boundary of the draw table). Arithmetic is float64 (numpy filters in
// float32), so a mask can differ from Python's only for a value exactly at the top-p boundary.

const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const PCG_MULT = (2549297995355413924n << 64n) + 4865540595714422341n; // PCG_DEFAULT_MULTIPLIER_128

/** numpy's SeedSequence(seed).generate_state(n64, uint64) for an integer seed >= 0 (pool of 4 uint32 words). */
export function seedSequenceState(seed, n64 = 4) {
  const entropy = [];
  for (let x = BigInt(seed); ; x >>= 32n) {
    entropy.push(x & M32);
    if (x >> 32n === 0n) break;
  }
  const mul32 = (a, b) => (a * b) & M32;
  let hashConst = 0x43b0d7e5n;
  const hashmix = (v) => {
    v = (v ^ hashConst) & M32;
    hashConst = mul32(hashConst, 0x931e8875n);
    v = mul32(v, hashConst);
    return v ^ (v >> 16n);
  };
  const mix = (x, y) => {
    const r = (0xca01f9ddn * x - 0x4973f715n * y) & M32;
    return r ^ (r >> 16n);
  };
  const pool = [0, 1, 2, 3].map((i) => hashmix(i < entropy.length ? entropy[i] : 0n));
  for (let src = 0; src < 4; src++) {
    for (let dst = 0; dst < 4; dst++) if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  }
  for (let src = 4; src < entropy.length; src++) {
    for (let dst = 0; dst < 4; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  hashConst = 0x8b51f9ddn;
  const words = [];
  for (let i = 0; i < 2 * n64; i++) {
    let v = (pool[i % 4] ^ hashConst) & M32;
    hashConst = mul32(hashConst, 0x58f38dedn);
    v = mul32(v, hashConst);
    words.push(v ^ (v >> 16n));
  }
  return Array.from({ length: n64 }, (_, i) => words[2 * i] | (words[2 * i + 1] << 32n));
}

/** numpy's PCG64 bit generator (XSL-RR 128/64) as `np.random.default_rng(seed)` seeds it. */
export class Pcg64 {
  constructor(seed) {
    const [s0, s1, s2, s3] = seedSequenceState(BigInt.asUintN(64, BigInt(seed)));
    this.inc = ((((s2 << 64n) | s3) << 1n) | 1n) & M128;
    this.state = 0n;
    this.step();
    this.state = (this.state + ((s0 << 64n) | s1)) & M128;
    this.step();
  }

  step() {
    this.state = (this.state * PCG_MULT + this.inc) & M128;
  }

  /** The next 64-bit output, as a BigInt. */
  nextU64() {
    this.step();
    const rot = this.state >> 122n;
    const v = ((this.state >> 64n) ^ this.state) & M64;
    return ((v >> rot) | (v << ((64n - rot) & 63n))) & M64;
  }

  /** A double in [0, 1) with 53 random bits (numpy's `random()`). */
  random() {
    return Number(this.nextU64() >> 11n) / 2 ** 53;
  }
}

/** `np.random.default_rng(seed).random(n)`: the image's uniforms, one per position. */
export function uniforms(seed, n) {
  const rng = new Pcg64(seed);
  return Float64Array.from({ length: n }, () => rng.random());
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

/** The largest value of x (-Infinity for none). */
function maxOf(x) {
  let m = -Infinity;
  for (const v of x) if (v > m) m = v;
  return m;
}

/** The index of the first largest value of x (0 for none). */
function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

export function softmax(x) {
  const m = maxOf(x);
  const e = Float64Array.from(x, (v) => Math.exp(v - m));
  let s = 0;
  for (const v of e) s += v;
  for (let i = 0; i < e.length; i++) e[i] /= s;
  return e;
}

/** The distribution the draft is drawn from (Float64Array); one-hot at the first argmax when greedy. */
export function processedProbs(logits, topK, topP, greedy) {
  if (greedy) {
    const p = new Float64Array(logits.length);
    p[argmax(logits)] = 1;
    return p;
  }
  return softmax(filterLogits(logits, topK, topP));
}

/** runtime/sampling.py draw_table: cumsum(exp(logits - max)) in float64, the difference rounded to float32 as numpy
 * subtracts float32 logits. The ONNX device graph returns it as `cdf`. */
export function drawTable(logits) {
  const m = maxOf(logits);
  const out = new Float64Array(logits.length);
  let cum = 0;
  for (let i = 0; i < logits.length; i++) {
    cum += Math.exp(Math.fround(logits[i] - m));
    out[i] = cum;
  }
  return out;
}

/** runtime/sampling.py draw_at: the first index whose table entry exceeds u times the last (u in [0, 1)). */
export function drawAt(table, u) {
  const x = u * table[table.length - 1];
  let lo = 0;
  let hi = table.length;
  while (lo < hi) { // the first entry > x (numpy searchsorted, side right)
    const mid = (lo + hi) >> 1;
    if (table[mid] > x) hi = mid; else lo = mid + 1;
  }
  return Math.min(lo, table.length - 1);
}

/** runtime/sampling.py Sampler.draw: the draft at uniform u from the centre logits: the argmax when greedy; with
 * filters, from the filtered logits' table; else from the graph's draw table `cdf` (or the logits' own). */
export function draw(logits, u, topK, topP, greedy, cdf = null) {
  if (greedy) return argmax(logits);
  if ((topK && topK < logits.length) || topP < 1.0) return drawAt(drawTable(filterLogits(logits, topK, topP)), u);
  return drawAt(cdf ?? drawTable(logits), u);
}
