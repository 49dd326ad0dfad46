// Connection logic under fake timers and a fake WebSocket: reconnect with
// backoff, close codes that forbid reconnecting, retry_after_ms, liveness,
// heartbeats, connect timeout, token refresh and 4011.
import { test, beforeEach, afterEach, mock } from 'node:test';
import assert from 'node:assert/strict';
import { TetherClient } from '../../dist/esm/index.js';
import { FakeWebSocket } from '../support/fake-ws.mjs';

const T0 = 1_800_000_000_000;
const flush = () => new Promise((r) => setImmediate(r));

beforeEach(() => {
  FakeWebSocket.reset();
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: T0 });
});
afterEach(() => mock.timers.reset());

function client(options = {}) {
  return new TetherClient('ws://tether.test/v1/ws', { WebSocket: FakeWebSocket, random: () => 0.5, ...options });
}

function jwt(exp) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256' })}.${b64({ sub: 'u', exp })}.sig`;
}

test('connect offers the JSON subprotocol and sends connect first', () => {
  const c = client({ token: 'T', device: 'dev-1' });
  c.connect();
  const ws = FakeWebSocket.last;
  assert.deepEqual(ws.protocols, ['tether.v1.json']);
  const connect = ws.accept();
  assert.equal(ws.sent[0].type, 'connect');
  assert.equal(connect.token, 'T');
  assert.equal(connect.device, 'dev-1');
  assert.equal(connect.client.name, '@tether/client');
  assert.equal(connect.resume, undefined, 'nothing to resume on the first connect');
  assert.equal(c.state, 'connected');
  assert.equal(c.session, 's1');
});

test('reconnects after an abnormal close with full-jitter exponential backoff', () => {
  const c = client();
  const delays = [];
  c.on('disconnected', (e) => delays.push(e.delayMs));
  c.connect();
  for (let i = 0; i < 5; i++) {
    const ws = FakeWebSocket.last;
    const n = FakeWebSocket.all.length;
    ws.serverClose(1006);
    assert.equal(c.state, 'waiting');
    const delay = delays[delays.length - 1];
    mock.timers.tick(delay - 1);
    assert.equal(FakeWebSocket.all.length, n, 'no new socket before the delay');
    mock.timers.tick(1);
    assert.equal(FakeWebSocket.all.length, n + 1, 'a new socket after the delay');
  }
  // random() = 0.5: half of 500, 1000, 2000, 4000, 8000
  assert.deepEqual(delays, [250, 500, 1000, 2000, 4000]);
  // A successful connect resets the backoff.
  FakeWebSocket.last.accept();
  FakeWebSocket.last.serverClose(4000);
  assert.equal(delays[delays.length - 1], 250);
});

for (const code of [4001, 4003, 4009]) {
  test(`never reconnects after close ${code}`, () => {
    const c = client();
    const events = [];
    c.on('disconnected', (e) => events.push(e));
    c.connect();
    FakeWebSocket.last.accept();
    FakeWebSocket.last.serverClose(code, 'no');
    mock.timers.tick(24 * 3600 * 1000);
    assert.equal(FakeWebSocket.all.length, 1);
    assert.equal(c.state, 'closed');
    assert.deepEqual(events, [{ code, reason: 'no', reconnect: false }]);
    assert.equal(c.closedBy.code, code);
  });
}

for (const code of [1000, 1006, 4000, 4005, 4008, 4010, 4029]) {
  test(`reconnects after close ${code}`, () => {
    const c = client();
    c.connect();
    FakeWebSocket.last.accept();
    FakeWebSocket.last.serverClose(code);
    mock.timers.tick(30_000);
    assert.equal(FakeWebSocket.all.length, 2);
  });
}

test('disconnect {reconnect: false} wins over the close code', () => {
  const c = client();
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  ws.receive({ type: 'disconnect', code: 4000, reason: 'go away', reconnect: false });
  ws.serverClose(4000);
  mock.timers.tick(24 * 3600 * 1000);
  assert.equal(FakeWebSocket.all.length, 1);
  assert.equal(c.state, 'closed');
});

test('retry_after_ms: no attempt before the advised delay, jitter on top', () => {
  const c = client({ random: () => 0.999 });
  let event;
  c.on('disconnected', (e) => (event = e));
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  ws.receive({ type: 'disconnect', code: 4029, reason: 'rate limited', reconnect: true, retry_after_ms: 5000 });
  ws.serverClose(4029);
  assert.equal(event.code, 4029);
  assert.equal(event.delayMs, 5000 + 499);
  mock.timers.tick(4999);
  assert.equal(FakeWebSocket.all.length, 1, 'not before retry_after_ms');
  mock.timers.tick(500);
  assert.equal(FakeWebSocket.all.length, 2);
});

test('answers a server ping with pong', () => {
  const c = client();
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  ws.receive({ type: 'ping' });
  assert.deepEqual(ws.sent[ws.sent.length - 1], { type: 'pong' });
});

test('liveness: 1.5 x heartbeat of silence drops the socket and reconnects; any frame resets it', () => {
  const c = client();
  const events = [];
  c.on('disconnected', (e) => events.push(e));
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept({ heartbeat: 20 }); // timeout max(30 s, 25 s) = 30 s
  mock.timers.tick(29_000);
  ws.receive({ type: 'ping' });
  mock.timers.tick(29_999);
  assert.equal(c.state, 'connected', 'the ping at 29 s restarted the timer');
  mock.timers.tick(1);
  assert.equal(c.state, 'waiting', '30 s without a frame');
  assert.equal(events[0].reason, 'liveness timeout');
  assert.equal(events[0].reconnect, true);
  assert.notEqual(ws.closedByClient, null, 'the dead socket was closed');
  mock.timers.tick(events[0].delayMs);
  assert.equal(FakeWebSocket.all.length, 2);
});

test('liveness default for the default 25 s heartbeat is 37.5 s; livenessTimeoutMs overrides', () => {
  const c = client();
  c.connect();
  FakeWebSocket.last.accept();
  mock.timers.tick(37_499);
  assert.equal(c.state, 'connected');
  mock.timers.tick(1);
  assert.equal(c.state, 'waiting');

  const d = client({ livenessTimeoutMs: 3000 });
  d.connect();
  FakeWebSocket.last.accept({ heartbeat: 1 });
  mock.timers.tick(2999);
  assert.equal(d.state, 'connected');
  mock.timers.tick(1);
  assert.equal(d.state, 'waiting');
});

test('a frame from a socket the client gave up on is ignored', () => {
  const c = client({ livenessTimeoutMs: 1000 });
  const seen = [];
  c.subscribe('a', (m) => seen.push(m.offset));
  c.connect();
  const old = FakeWebSocket.last;
  old.accept();
  old.receive({ type: 'subscribed', id: old.lastOfType('subscribe').id, channel: 'a', epoch: 'e', offset: 0, recovered: false });
  mock.timers.tick(1000);
  old.receive({ type: 'message', channel: 'a', epoch: 'e', offset: 1, data: 1, ts: 0 });
  old.serverClose(4000);
  assert.deepEqual(seen, []);
  assert.equal(c.state, 'waiting');
});

test('connect timeout: no connected within connectTimeoutMs -> retry', () => {
  const c = client({ connectTimeoutMs: 2000 });
  let event;
  c.on('disconnected', (e) => (event = e));
  c.connect();
  FakeWebSocket.last.open();
  mock.timers.tick(1999);
  assert.equal(c.state, 'connecting');
  mock.timers.tick(1);
  assert.equal(event.reason, 'connect timeout');
  assert.equal(c.state, 'waiting');
});

test('disconnect() stops reconnecting; connect() resumes at once', () => {
  const c = client();
  c.connect();
  FakeWebSocket.last.accept();
  c.disconnect();
  assert.equal(c.state, 'idle');
  assert.equal(FakeWebSocket.last.closedByClient, 1000);
  mock.timers.tick(3600_000);
  assert.equal(FakeWebSocket.all.length, 1);
  c.connect();
  assert.equal(FakeWebSocket.all.length, 2, 'no backoff wait for an explicit connect');
  assert.deepEqual(FakeWebSocket.last.accept().resume, { token: 'rt1', channels: {} });
});

test('reconnectNow() skips the backoff wait', () => {
  const c = client({ random: () => 0.99 });
  c.connect();
  FakeWebSocket.last.serverClose(1006);
  assert.equal(c.state, 'waiting'); // for 495 ms
  c.reconnectNow();
  assert.equal(FakeWebSocket.all.length, 2);
  // and drops a live connection at once, resuming it
  FakeWebSocket.last.accept();
  c.reconnectNow();
  assert.equal(FakeWebSocket.all.length, 3);
  assert.equal(FakeWebSocket.last.accept().resume.token, 'rt1');
});

test('the token is refreshed before it expires, then again from refreshed.expires', async () => {
  const exp = T0 / 1000 + 120;
  let n = 0;
  const c = client({ token: jwt(exp), getToken: () => `new-${++n}`, livenessTimeoutMs: 1e9 });
  const refreshed = [];
  c.on('refreshed', (e) => refreshed.push(e.expires));
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  mock.timers.tick(89_999); // 30 s margin
  await flush();
  assert.equal(ws.ofType('refresh').length, 0);
  mock.timers.tick(1);
  await flush();
  const r = ws.lastOfType('refresh');
  assert.equal(r.token, 'new-1');
  ws.receive({ type: 'refreshed', id: r.id, expires: exp + 100 });
  assert.deepEqual(refreshed, [exp + 100]);
  mock.timers.tick(99_999); // (exp + 100) - now = 130 s; minus 30 s margin
  await flush();
  assert.equal(ws.ofType('refresh').length, 1);
  mock.timers.tick(1);
  await flush();
  assert.equal(ws.lastOfType('refresh').token, 'new-2');
  // a reconnect uses the refreshed token
  ws.serverClose(4000);
  mock.timers.tick(1000);
  assert.equal(FakeWebSocket.last.accept().token, 'new-1');
});

test('a short-lived token is refreshed at half its remaining life', async () => {
  const c = client({ token: jwt(T0 / 1000 + 10), getToken: () => 'fresh' });
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  mock.timers.tick(4_999);
  await flush();
  assert.equal(ws.ofType('refresh').length, 0);
  mock.timers.tick(1);
  await flush();
  assert.equal(ws.ofType('refresh').length, 1);
});

test('a failed refresh is reported and retried; the old token stays', async () => {
  const c = client({ token: jwt(T0 / 1000 + 60), getToken: () => 'bad' });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  mock.timers.tick(30_000);
  await flush();
  const r = ws.lastOfType('refresh');
  ws.receive({ type: 'error', id: r.id, code: 'unauthorized', message: 'bad token' });
  assert.deepEqual(errors, ['unauthorized']);
  mock.timers.tick(5000);
  await flush();
  assert.equal(ws.ofType('refresh').length, 2, 'retried after 5 s');
});

test('4011: getToken is called and the client reconnects with the new token', async () => {
  const tokens = ['second'];
  const c = client({ token: 'first', getToken: () => tokens.shift() });
  c.connect();
  FakeWebSocket.last.accept();
  FakeWebSocket.last.receive({ type: 'disconnect', code: 4011, reason: 'token expired', reconnect: true });
  FakeWebSocket.last.serverClose(4011);
  assert.equal(c.state, 'waiting');
  mock.timers.tick(250);
  await flush();
  const connect = FakeWebSocket.last.accept();
  assert.equal(connect.token, 'second');
  assert.equal(connect.resume.token, 'rt1');
});

test('4011 without getToken ends the client', () => {
  const c = client({ token: 'first' });
  c.connect();
  FakeWebSocket.last.accept();
  FakeWebSocket.last.serverClose(4011);
  mock.timers.tick(3600_000);
  assert.equal(c.state, 'closed');
  assert.equal(FakeWebSocket.all.length, 1);
});

test('an expired token is replaced through getToken before connecting', async () => {
  const c = client({ token: jwt(T0 / 1000 - 1), getToken: async () => 'fresh' });
  c.connect();
  assert.equal(FakeWebSocket.all.length, 0, 'waits for getToken');
  await flush();
  assert.equal(FakeWebSocket.last.accept().token, 'fresh');
});

test('getToken failing: error event, then retry with backoff', async () => {
  let calls = 0;
  const c = client({
    getToken: async () => {
      if (++calls === 1) throw new Error('auth service down');
      return 'ok';
    },
  });
  const errors = [];
  c.on('error', (e) => errors.push(e.code));
  c.connect();
  await flush();
  assert.deepEqual(errors, ['token']);
  assert.equal(c.state, 'waiting');
  mock.timers.tick(250);
  await flush();
  assert.equal(FakeWebSocket.last.accept().token, 'ok');
});

test('a listener that throws is reported as an error event, delivery goes on', () => {
  const c = client();
  const errors = [];
  c.on('error', (e) => errors.push(e));
  c.on('connected', () => {
    throw new Error('boom');
  });
  c.connect();
  FakeWebSocket.last.accept();
  assert.equal(c.state, 'connected');
  assert.equal(errors[0].code, 'handler');
  assert.equal(errors[0].cause.message, 'boom');
});

test('no WebSocket implementation (Node 20 without `ws`): connect() throws a clear error', () => {
  assert.equal(globalThis.WebSocket, undefined, 'Node 20 has no global WebSocket');
  const c = new TetherClient('ws://t/v1/ws');
  assert.throws(() => c.connect(), /pass options.WebSocket/);
  assert.equal(c.state, 'idle');
});
