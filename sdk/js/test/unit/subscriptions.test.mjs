// Delivery logic with a fake WebSocket: once and in offset order within an
// epoch, discontinuities, resume naming every channel's last offset,
// re-subscribing after a fresh session, server-ended subscriptions, acks.
import { test, beforeEach, afterEach, mock } from 'node:test';
import assert from 'node:assert/strict';
import { TetherClient } from '../../dist/esm/index.js';
import { FakeWebSocket } from '../support/fake-ws.mjs';

beforeEach(() => {
  FakeWebSocket.reset();
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_800_000_000_000 });
});
afterEach(() => mock.timers.reset());

const msg = (channel, offset, epoch = 'E1') => ({ type: 'message', channel, epoch, offset, data: { n: offset }, ts: 1 });

function connected(options = {}) {
  const c = new TetherClient('ws://t/v1/ws', { WebSocket: FakeWebSocket, random: () => 0.5, ...options });
  c.connect();
  FakeWebSocket.last.accept();
  return c;
}

function confirm(ws, channel, fields = {}) {
  const s = ws.sent.filter((m) => m.type === 'subscribe' && m.channel === channel).pop();
  ws.receive({ type: 'subscribed', id: s.id, channel, epoch: 'E1', offset: 0, recovered: false, ...fields });
  return s;
}

test('messages are delivered once, in offset order; duplicates and older offsets are dropped', () => {
  const c = connected();
  const ws = FakeWebSocket.last;
  const got = [];
  const all = [];
  c.on('message', (m) => all.push(`${m.channel}:${m.offset}`));
  const sub = c.subscribe('news', (m) => got.push(m.offset));
  const s = confirm(ws, 'news', { offset: 3 });
  assert.equal(s.since, undefined, 'first subscribe has no since');
  assert.equal(sub.state, 'subscribed');
  for (const o of [4, 5, 5, 3, 6, 4, 7]) ws.receive(msg('news', o));
  assert.deepEqual(got, [4, 5, 6, 7]);
  assert.deepEqual(all, ['news:4', 'news:5', 'news:6', 'news:7']);
  assert.deepEqual(sub.position(), { epoch: 'E1', offset: 7 });
});

test('messages for channels not subscribed, or after unsubscribe(), are not delivered', () => {
  const c = connected();
  const ws = FakeWebSocket.last;
  const got = [];
  const sub = c.subscribe('a', (m) => got.push(m.offset));
  confirm(ws, 'a');
  ws.receive(msg('b', 1));
  ws.receive(msg('a', 1));
  sub.unsubscribe();
  assert.equal(ws.lastOfType('unsubscribe').channel, 'a');
  ws.receive(msg('a', 2));
  assert.deepEqual(got, [1]);
  assert.equal(sub.state, 'unsubscribed');
  assert.throws(() => c.subscribe('b', () => {}) && c.subscribe('b'), /already subscribed/);
});

test('an epoch change and an offset gap surface as discontinuity', () => {
  const c = connected();
  const ws = FakeWebSocket.last;
  const events = [];
  c.on('discontinuity', (e) => events.push(e));
  const got = [];
  c.subscribe('a', (m) => got.push(`${m.epoch}/${m.offset}`));
  confirm(ws, 'a', { offset: 1 });
  ws.receive(msg('a', 2));
  ws.receive(msg('a', 5)); // gap: 3, 4 missing
  ws.receive(msg('a', 1, 'E2')); // history lost: new epoch
  ws.receive(msg('a', 2, 'E2'));
  assert.deepEqual(got, ['E1/2', 'E1/5', 'E2/1', 'E2/2']);
  assert.deepEqual(
    events.map((e) => [e.reason, e.previous, e.position]),
    [
      ['gap', { epoch: 'E1', offset: 2 }, { epoch: 'E1', offset: 4 }],
      ['epoch_changed', { epoch: 'E1', offset: 5 }, { epoch: 'E2', offset: 0 }],
    ],
  );
});

test('on reconnect, connect.resume names the last delivered offset of every channel', () => {
  const c = connected();
  let ws = FakeWebSocket.last;
  c.subscribe('a');
  c.subscribe('b');
  c.subscribe('never-confirmed');
  confirm(ws, 'a', { offset: 10 });
  confirm(ws, 'b', { offset: 0 });
  for (const o of [11, 12]) ws.receive(msg('a', o));
  ws.receive(msg('b', 1));
  ws.serverClose(1006);
  mock.timers.tick(250);
  ws = FakeWebSocket.last;
  const connect = ws.accept({
    resumed: true,
    resume_token: 'rt2',
    channels: { a: { epoch: 'E1', offset: 14, recovered: true }, b: { epoch: 'E1', offset: 1, recovered: true } },
  });
  assert.deepEqual(connect.resume, { token: 'rt1', channels: { a: 12, b: 1 } });
  // restored channels are not subscribed again; the one the old session lacked is
  assert.deepEqual(ws.ofType('subscribe').map((s) => s.channel), ['never-confirmed']);
  const got = [];
  c.getSubscription('a').on('message', (m) => got.push(m.offset));
  for (const o of [12, 13, 14]) ws.receive(msg('a', o));
  assert.deepEqual(got, [13, 14], 'replay continues after 12, without a duplicate');
  // the next resume uses the newest token
  ws.serverClose(4010);
  mock.timers.tick(250);
  assert.equal(FakeWebSocket.last.accept().resume.token, 'rt2');
});

test('recovered: false in connected.channels -> discontinuity, then live messages', () => {
  const c = connected();
  let ws = FakeWebSocket.last;
  const sub = c.subscribe('a');
  confirm(ws, 'a', { offset: 5 });
  ws.receive(msg('a', 6));
  ws.serverClose(1006);
  mock.timers.tick(250);
  ws = FakeWebSocket.last;
  const events = [];
  sub.on('discontinuity', (e) => events.push(e));
  ws.accept({ resumed: true, channels: { a: { epoch: 'E1', offset: 40, recovered: false } } });
  assert.deepEqual(events, [
    { channel: 'a', reason: 'not_recovered', previous: { epoch: 'E1', offset: 6 }, position: { epoch: 'E1', offset: 40 } },
  ]);
  const got = [];
  sub.on('message', (m) => got.push(m.offset));
  ws.receive(msg('a', 41));
  assert.deepEqual(got, [41]);
});

test('a fresh session (resumed: false) re-subscribes with since; recovered: false -> discontinuity', () => {
  const c = connected();
  let ws = FakeWebSocket.last;
  c.subscribe('a');
  c.subscribe('b');
  confirm(ws, 'a', { offset: 2 });
  confirm(ws, 'b', { offset: 9, epoch: 'EB' });
  ws.serverClose(4010);
  mock.timers.tick(250);
  ws = FakeWebSocket.last;
  ws.accept({ resumed: false });
  const subs = ws.ofType('subscribe');
  assert.deepEqual(subs.map((s) => [s.channel, s.since]), [
    ['a', { epoch: 'E1', offset: 2 }],
    ['b', { epoch: 'EB', offset: 9 }],
  ]);
  const events = [];
  c.on('discontinuity', (e) => events.push(e.channel));
  confirm(ws, 'a', { offset: 4, recovered: true });
  confirm(ws, 'b', { offset: 1, epoch: 'NEW', recovered: false });
  assert.deepEqual(events, ['b']);
  const got = [];
  c.on('message', (m) => got.push(`${m.channel}${m.offset}`));
  for (const m of [msg('a', 3), msg('a', 4), msg('b', 2, 'NEW')]) ws.receive(m);
  assert.deepEqual(got, ['a3', 'a4', 'b2']);
});

test('subscribe with since (a stored position): recovered: false -> discontinuity', () => {
  const c = connected();
  const ws = FakeWebSocket.last;
  const events = [];
  const sub = c.subscribe('a', undefined, { since: { epoch: 'OLD', offset: 7 } });
  sub.on('discontinuity', (e) => events.push(e.reason));
  const s = confirm(ws, 'a', { offset: 3, epoch: 'E1', recovered: false });
  assert.deepEqual(s.since, { epoch: 'OLD', offset: 7 });
  assert.deepEqual(events, ['not_recovered']);
});

test('unsubscribed without id (server-ended) ends the subscription with its reason; not re-subscribed', () => {
  const c = connected();
  let ws = FakeWebSocket.last;
  const sub = c.subscribe('a');
  c.subscribe('b');
  confirm(ws, 'a');
  confirm(ws, 'b');
  const ended = [];
  sub.on('unsubscribed', (e) => ended.push(e));
  c.on('unsubscribed', (e) => ended.push(e));
  ws.receive({ type: 'unsubscribed', channel: 'a', reason: 'token no longer allows this channel' });
  assert.equal(sub.state, 'unsubscribed');
  assert.equal(ended.length, 2);
  assert.equal(ended[0].reason, 'token no longer allows this channel');
  assert.equal(c.getSubscription('a'), undefined);
  ws.serverClose(1006);
  mock.timers.tick(250);
  ws = FakeWebSocket.last;
  const connect = ws.accept({ resumed: false });
  assert.deepEqual(Object.keys(connect.resume.channels), ['b']);
  assert.deepEqual(ws.ofType('subscribe').map((s) => s.channel), ['b']);
});

test('a restored channel the app unsubscribed while offline is unsubscribed on the server', () => {
  const c = connected();
  let ws = FakeWebSocket.last;
  const sub = c.subscribe('a');
  confirm(ws, 'a');
  ws.serverClose(1006);
  sub.unsubscribe();
  mock.timers.tick(250);
  ws = FakeWebSocket.last;
  ws.accept({ resumed: true, channels: { a: { epoch: 'E1', offset: 0, recovered: true } } });
  assert.equal(ws.lastOfType('unsubscribe').channel, 'a');
});

test('a refused subscribe fails the subscription with the server error', () => {
  const c = connected();
  const ws = FakeWebSocket.last;
  const sub = c.subscribe('user:bob');
  const errors = [];
  sub.on('error', (e) => errors.push([e.code, e.channel]));
  const s = ws.lastOfType('subscribe');
  ws.receive({ type: 'error', id: s.id, code: 'forbidden', message: 'not yours' });
  assert.deepEqual(errors, [['forbidden', 'user:bob']]);
  assert.equal(sub.state, 'unsubscribed');
  assert.equal(c.getSubscription('user:bob'), undefined);
});

test("ack 'batch' (default): one cumulative ack per channel per interval", () => {
  const c = connected();
  const ws = FakeWebSocket.last;
  c.subscribe('a');
  c.subscribe('b');
  confirm(ws, 'a');
  confirm(ws, 'b');
  for (const o of [1, 2, 3]) ws.receive(msg('a', o));
  ws.receive(msg('b', 1));
  assert.equal(ws.ofType('ack').length, 0);
  mock.timers.tick(999);
  assert.equal(ws.ofType('ack').length, 0);
  mock.timers.tick(1);
  assert.deepEqual(ws.ofType('ack'), [
    { type: 'ack', channel: 'a', offset: 3 },
    { type: 'ack', channel: 'b', offset: 1 },
  ]);
  mock.timers.tick(10_000);
  assert.equal(ws.ofType('ack').length, 2, 'nothing new, no ack');
});

test("ack 'auto': every delivered message is acked at once", () => {
  const c = connected({ ack: 'auto' });
  const ws = FakeWebSocket.last;
  c.subscribe('a');
  confirm(ws, 'a');
  ws.receive(msg('a', 1));
  ws.receive(msg('a', 1));
  ws.receive(msg('a', 2));
  assert.deepEqual(ws.ofType('ack').map((a) => a.offset), [1, 2]);
});

test("ack 'manual': nothing until sub.ack(), which sends at once", () => {
  const c = connected({ ack: 'manual' });
  const ws = FakeWebSocket.last;
  const sub = c.subscribe('a');
  confirm(ws, 'a');
  for (const o of [1, 2, 3]) ws.receive(msg('a', o));
  mock.timers.tick(30_000);
  assert.equal(ws.ofType('ack').length, 0);
  sub.ack(2);
  assert.deepEqual(ws.ofType('ack'), [{ type: 'ack', channel: 'a', offset: 2 }]);
  sub.ack();
  assert.deepEqual(ws.lastOfType('ack'), { type: 'ack', channel: 'a', offset: 3 });
});
