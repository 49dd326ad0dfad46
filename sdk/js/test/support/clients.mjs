// Helpers for end-to-end tests: an SDK client over `ws` that records the
// frames it sends and receives, and collectors that wait for deliveries.
import WebSocket from 'ws';
import { TetherClient } from '../../dist/esm/index.js';
import { once, WAIT_MS } from './wait.mjs';

/** A `ws` WebSocket that keeps every frame it sends and receives. */
export function spyWebSocket() {
  const log = { sent: [], received: [], sockets: 0 };
  class SpyWebSocket extends WebSocket {
    constructor(...args) {
      super(...args);
      log.sockets++;
      this.addEventListener('message', (e) => {
        if (typeof e.data === 'string') log.received.push(JSON.parse(e.data));
      });
    }
    send(data, ...rest) {
      if (typeof data === 'string') log.sent.push(JSON.parse(data));
      return super.send(data, ...rest);
    }
  }
  return { SpyWebSocket, log };
}

/** A client over `ws` with a short backoff (tests should not wait long). */
export function makeClient(url, options = {}) {
  const spy = spyWebSocket();
  const client = new TetherClient(url, { WebSocket: spy.SpyWebSocket, backoff: { baseMs: 50, maxMs: 300 }, ...options });
  client.log = spy.log;
  const errors = [];
  client.on('error', (e) => errors.push(e));
  client.errors = errors;
  return client;
}

/** Records `(offset, data)` of every message a subscription delivers. */
export function collect(sub) {
  const got = [];
  const waiters = [];
  sub.on('message', (m) => {
    got.push(m);
    for (const w of [...waiters]) if (got.length >= w.n) (waiters.splice(waiters.indexOf(w), 1), w.res());
  });
  got.offsets = () => got.map((m) => m.offset);
  got.count = (n, ms = WAIT_MS) =>
    got.length >= n
      ? Promise.resolve()
      : new Promise((res, rej) => {
          const timer = setTimeout(() => rej(new Error(`${sub.channel}: ${got.length} of ${n} messages after ${ms} ms`)), ms);
          waiters.push({ n, res: () => (clearTimeout(timer), res()) });
        });
  return got;
}

/** Connects and waits for `connected`. */
export async function connected(client) {
  const p = once(client, 'connected');
  client.connect();
  return p;
}

/** Subscribes and waits for the server's confirmation. */
export async function subscribed(client, channel, handler) {
  const sub = client.subscribe(channel, handler);
  await once(sub, 'subscribed');
  return sub;
}
