// Full-jitter exponential backoff: the bounds and the defaults the README documents.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { backoffDelay, DEFAULT_BACKOFF } from '../../dist/esm/index.js';

test('defaults are base 500 ms, cap 30 s', () => {
  assert.deepEqual({ ...DEFAULT_BACKOFF }, { baseMs: 500, maxMs: 30_000 });
});

test('the n-th delay is uniform in [0, min(max, base * 2^n))', () => {
  const top = () => 0.999999;
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 7, 8].map((n) => backoffDelay(n, {}, top)),
    [499, 999, 1999, 3999, 7999, 15999, 29999, 29999, 29999],
  );
  for (let n = 0; n < 40; n++) assert.equal(backoffDelay(n, {}, () => 0), 0, 'full jitter starts at 0');
  assert.equal(backoffDelay(3, { baseMs: 100, maxMs: 1000 }, () => 0.5), 400);
  assert.equal(backoffDelay(1000, { baseMs: 100, maxMs: 1000 }, () => 0.5), 500, 'huge attempt numbers stay capped');
});

test('with Math.random the delays spread over the whole range', () => {
  const delays = Array.from({ length: 2000 }, () => backoffDelay(2));
  assert.ok(delays.every((d) => d >= 0 && d < 2000));
  assert.ok(Math.min(...delays) < 200 && Math.max(...delays) > 1800, 'jitter covers the range');
});
