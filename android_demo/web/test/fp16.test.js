// fp16 conversion against numpy's float64 -> float16 cast (fixtures/expected.json), and the bit-level edges.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { fromHalfBits, roundToHalf, toHalfBits } from '../fp16.js';

const EXPECTED = JSON.parse(readFileSync(new URL('./fixtures/expected.json', import.meta.url)));

test('toHalfBits equals numpy float16 on 226 values (ties to even, subnormals, overflow)', () => {
  assert.ok(EXPECTED.fp16.length > 200);
  for (const [value, bits] of EXPECTED.fp16) assert.equal(toHalfBits(value), bits, `value ${value}`);
});

test('every fp16 bit pattern survives half -> number -> half', () => {
  for (let h = 0; h < 0x10000; h++) {
    const x = fromHalfBits(h);
    if (Number.isNaN(x)) continue;
    assert.equal(toHalfBits(x), h, `bits 0x${h.toString(16)}`);
  }
});

test('edges: max, overflow, smallest subnormal, ties, NaN', () => {
  assert.equal(fromHalfBits(0x7bff), 65504);
  assert.equal(toHalfBits(65519.99), 0x7bff);
  assert.equal(toHalfBits(65520), 0x7c00); // ties to even past the largest finite: inf
  assert.equal(toHalfBits(-1e9), 0xfc00);
  assert.equal(toHalfBits(2 ** -24), 0x0001);
  assert.equal(toHalfBits(2 ** -25), 0x0000); // a tie between 0 and 2^-24: even is 0
  assert.equal(toHalfBits(3 * 2 ** -25), 0x0002);
  assert.equal(toHalfBits(1 + 2 ** -11), 0x3c00); // tie: down to even
  assert.equal(toHalfBits(1 + 3 * 2 ** -11), 0x3c02); // tie: up to even
  assert.equal(toHalfBits(-0), 0x8000);
  assert.equal(toHalfBits(NaN), 0x7e00);
  assert.equal(roundToHalf(0.1), 0.0999755859375);
});
