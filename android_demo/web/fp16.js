// IEEE 754 half precision <-> JavaScript numbers (float64), round to nearest, ties to even, like numpy's
// float64 -> float16 cast. Values too large for fp16 become +-inf (the protocol then refuses them); NaN -> 0x7e00.

function roundHalfEven(v) {
  const f = Math.floor(v);
  const d = v - f; // exact: v < 2^53 here
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** The fp16 bit pattern (0..0xffff) nearest to the number x. */
export function toHalfBits(x) {
  if (Number.isNaN(x)) return 0x7e00;
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a >= 65520) return sign | 0x7c00; // 65504 + half an ulp rounds (to even) up to 2^16: overflow
  if (a < 2 ** -14) return sign | roundHalfEven(a * 2 ** 24); // subnormal (1024 becomes the smallest normal)
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1; // log2 can be off by one next to a power of two
  else if (2 ** (e + 1) <= a) e += 1;
  let mant = roundHalfEven((a / 2 ** e - 1) * 1024); // exact: scaling by powers of two
  if (mant === 1024) {
    mant = 0;
    e += 1;
  }
  if (e > 15) return sign | 0x7c00;
  return sign | ((e + 15) << 10) | mant;
}

/** The number an fp16 bit pattern stands for. */
export function fromHalfBits(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** x rounded to the nearest fp16 value. */
export function roundToHalf(x) {
  return fromHalfBits(toHalfBits(x));
}
