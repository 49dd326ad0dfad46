// HS256 JWTs for tests, minted with node:crypto.
import { createHmac } from 'node:crypto';

const b64 = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

export function mintJwt(secret, claims) {
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

/** A token for `sub` expiring between `ttlSec` and `ttlSec` + 1 s from now (`exp` is whole seconds). */
export function tokenFor(secret, sub, ttlSec, extra = {}) {
  return mintJwt(secret, { sub, exp: Math.ceil(Date.now() / 1000 + ttlSec), ...extra });
}
