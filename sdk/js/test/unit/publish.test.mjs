// The publish queue with a fake WebSocket: queued while offline, sent once
// per connection until `published`, bounded, timed out, at-most-once on request.
import { test, beforeEach, afterEach, mock } from 'node:test';
import assert from 'node:assert/strict';
import { TetherClient } from '../../dist/esm/index.js';
import { FakeWebSocket } from '../support/fake-ws.mjs';

beforeEach(() => {
  FakeWebSocket.reset();
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_800_000_000_000 });
});
afterEach(() => mock.timers.reset());

const make = (options = {}) => new TetherClient('ws://t/v1/ws', { WebSocket: FakeWebSocket, random: () => 0.5, ...options });
const answer = (ws, p, offset) => ws.receive({ type: 'published', id: p.id, channel: p.channel, epoch: 'E', offset });

test('a publish made offline is queued and sent once when connected', async () => {
  const c = make();
  const result = c.publish('chat', { text: 'hi' });
  assert.equal(c.queuedPublishes, 1);
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  const sent = ws.ofType('publish');
  assert.equal(sent.length, 1);
  assert.deepEqual(sent[0].data, { text: 'hi' });
  assert.equal(typeof sent[0].idempotency_key, 'string');
  answer(ws, sent[0], 7);
  assert.deepEqual(await result, { channel: 'chat', epoch: 'E', offset: 7 });
  assert.equal(c.queuedPublishes, 0);
});

test('subscribes go before queued publishes on (re)connect', () => {
  const c = make();
  c.subscribe('chat');
  c.publish('chat', 1);
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  assert.deepEqual(ws.sent.map((m) => m.type), ['connect', 'subscribe', 'publish']);
});

test('connection lost before published: sent again once on the next connection, same key, never twice on one', async () => {
  const c = make();
  c.connect();
  let ws = FakeWebSocket.last;
  ws.accept();
  const result = c.publish('chat', 'x', { idempotencyKey: 'k-1' });
  assert.equal(ws.ofType('publish').length, 1);
  ws.receive({ type: 'ping' }); // other traffic does not resend
  ws.serverClose(1006);
  mock.timers.tick(250);
  ws = FakeWebSocket.last;
  ws.accept({ resumed: true });
  ws.receive({ type: 'ping' });
  const again = ws.ofType('publish');
  assert.equal(again.length, 1, 'sent once on the new connection');
  assert.equal(again[0].idempotency_key, 'k-1');
  answer(ws, again[0], 3);
  assert.equal((await result).offset, 3);
  assert.equal(c.queuedPublishes, 0);
});

test('retry: false -> unknown_outcome when the connection dies before the answer', async () => {
  const c = make();
  c.connect();
  let ws = FakeWebSocket.last;
  ws.accept();
  const result = c.publish('chat', 'x', { retry: false });
  ws.serverClose(1006);
  await assert.rejects(result, { code: 'unknown_outcome' });
  mock.timers.tick(250);
  FakeWebSocket.last.accept();
  assert.equal(FakeWebSocket.last.ofType('publish').length, 0, 'not sent again');
});

test('retry: false publications that were never sent are still sent when back online', async () => {
  const c = make();
  const result = c.publish('chat', 'x', { retry: false });
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  answer(ws, ws.lastOfType('publish'), 1);
  assert.equal((await result).offset, 1);
});

test('a server error rejects the publication and it is not retried', async () => {
  const c = make();
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  const result = c.publish('news', 'x');
  ws.receive({ type: 'error', id: ws.lastOfType('publish').id, code: 'forbidden', message: 'no publish' });
  await assert.rejects(result, { code: 'forbidden', channel: 'news' });
  assert.equal(c.queuedPublishes, 0);
});

test('the queue is bounded: the publication over maxQueuedPublishes is refused', async () => {
  const c = make({ maxQueuedPublishes: 2 });
  c.publish('a', 1);
  c.publish('a', 2);
  await assert.rejects(c.publish('a', 3), { code: 'queue_full' });
  assert.equal(c.queuedPublishes, 2);
});

test('publishTimeoutMs: an unanswered publication is rejected with timeout and never sent later', async () => {
  const c = make({ publishTimeoutMs: 5000 });
  const result = c.publish('a', 1);
  mock.timers.tick(5000);
  await assert.rejects(result, { code: 'timeout' });
  c.connect();
  FakeWebSocket.last.accept();
  assert.equal(FakeWebSocket.last.ofType('publish').length, 0);
});

test('a client closed for good rejects queued and new publications', async () => {
  const c = make();
  const queued = c.publish('a', 1);
  c.connect();
  FakeWebSocket.last.serverClose(4003, 'bad token');
  await assert.rejects(queued, { code: 'closed' });
  await assert.rejects(c.publish('a', 2), { code: 'closed' });
});

test('disconnect() keeps queued publications for the next connect()', async () => {
  const c = make();
  c.connect();
  FakeWebSocket.last.accept();
  c.disconnect();
  const result = c.publish('a', 1);
  c.connect();
  const ws = FakeWebSocket.last;
  ws.accept();
  answer(ws, ws.lastOfType('publish'), 9);
  assert.equal((await result).offset, 9);
});
