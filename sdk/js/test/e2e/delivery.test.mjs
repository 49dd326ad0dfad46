// End to end in Node against a real broker: publish/subscribe, heartbeats,
// an abrupt drop and a silently dead network each followed by a resume that
// delivers exactly the missed messages once, in order; client publications
// queued while offline; MessagePack.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Broker } from '../support/broker.mjs';
import { Proxy } from '../support/proxy.mjs';
import { once } from '../support/wait.mjs';
import { collect, connected, makeClient, subscribed } from '../support/clients.mjs';
import { msgpackCodec } from '../../dist/esm/msgpack.js';

let broker;
const clients = [];
const proxies = [];
const client = (url, options) => {
  const c = makeClient(url, options);
  clients.push(c);
  return c;
};
const proxy = async () => {
  const p = await Proxy.start(broker.clientAddr);
  proxies.push(p);
  return p;
};

before(async () => {
  broker = await Broker.start(['--heartbeat', '1']);
});
after(async () => {
  for (const c of clients) c.disconnect();
  for (const p of proxies) await p.close();
  await broker.stop();
});

test('subscribe, then API publications arrive once, in order, with their data', async () => {
  const c = client(broker.wsUrl);
  const info = await connected(c);
  assert.equal(info.resumed, false);
  assert.equal(info.node, 'test-node');
  const sub = await subscribed(c, 'd:news');
  const got = collect(sub);
  for (let i = 1; i <= 5; i++) await broker.publish('d:news', { i });
  await got.count(5);
  assert.deepEqual(got.offsets(), [1, 2, 3, 4, 5]);
  assert.deepEqual(got.map((m) => m.data), [1, 2, 3, 4, 5].map((i) => ({ i })));
  assert.ok(got.every((m) => typeof m.ts === 'number' && m.ts > 1.7e12 && m.epoch === got[0].epoch));
});

test('client publish: resolves with the offset; other subscribers get it', async () => {
  const a = client(broker.wsUrl);
  const b = client(broker.wsUrl);
  await Promise.all([connected(a), connected(b)]);
  const got = collect(await subscribed(b, 'd:chat'));
  const result = await a.publish('d:chat', { text: 'hello' });
  assert.equal(result.channel, 'd:chat');
  assert.equal(result.offset, 1);
  await got.count(1);
  assert.deepEqual(got[0].data, { text: 'hello' });
  assert.equal(got[0].epoch, result.epoch);
});

test('server pings are answered: the session outlives several heartbeats', async () => {
  const c = client(broker.wsUrl);
  const drops = [];
  c.on('disconnected', (e) => drops.push(e));
  await connected(c);
  // The server closes a client silent for two heartbeats (2 s here) with
  // 4005. Wait for the third ping (at least 2.5 s after connected): past that.
  await new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error('not 3 pings in 10 s')), 10_000);
    const check = setInterval(() => {
      if (c.log.received.filter((m) => m.type === 'ping').length >= 3) {
        clearTimeout(timer);
        clearInterval(check);
        res();
      }
    }, 20);
  });
  assert.ok(c.log.sent.filter((m) => m.type === 'pong').length >= 3);
  assert.deepEqual(drops, []);
  assert.equal(c.state, 'connected');
});

test('abrupt drop: messages published while offline arrive once, in order, after the resume', async () => {
  const p = await proxy();
  const c = client(p.wsUrl);
  await connected(c);
  const a = collect(await subscribed(c, 'd:drop-a'));
  const b = collect(await subscribed(c, 'd:drop-b'));
  for (let i = 1; i <= 3; i++) await broker.publish('d:drop-a', i);
  await broker.publish('d:drop-b', 1);
  await a.count(3);
  await b.count(1);

  p.refuse();
  const down = once(c, 'disconnected');
  p.cut();
  assert.equal((await down).reconnect, true);
  for (let i = 4; i <= 6; i++) await broker.publish('d:drop-a', i);
  await broker.publish('d:drop-b', 2);
  const discontinuities = [];
  c.on('discontinuity', (e) => discontinuities.push(e));
  const back = once(c, 'connected');
  p.refuse(false);
  const info = await back;
  assert.equal(info.resumed, true);
  const connect = c.log.sent.filter((m) => m.type === 'connect').pop();
  assert.deepEqual(connect.resume.channels, { 'd:drop-a': 3, 'd:drop-b': 1 });
  // Barrier: a publication after the reconnect must come after every replayed one.
  await broker.publish('d:drop-a', 7);
  await a.count(7);
  await b.count(2);
  assert.deepEqual(a.offsets(), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(a.map((m) => m.data), [1, 2, 3, 4, 5, 6, 7]);
  assert.deepEqual(b.offsets(), [1, 2]);
  assert.deepEqual(discontinuities, []);
});

test('silently dead network: liveness timer reconnects; what the server wrote to the dead socket is not lost', async () => {
  const p = await proxy();
  const c = client(p.wsUrl, { livenessTimeoutMs: 2500 });
  await connected(c);
  const a = collect(await subscribed(c, 'd:silent'));
  await broker.publish('d:silent', 1);
  await a.count(1);
  const firstSession = c.session;

  p.freeze(); // no close, no reset: the bytes just stop
  // The server writes these to the old connection; the client never sees them.
  for (let i = 2; i <= 4; i++) await broker.publish('d:silent', i);
  const down = await once(c, 'disconnected');
  assert.equal(down.reason, 'liveness timeout');
  const info = await once(c, 'connected');
  assert.equal(info.resumed, true);
  assert.equal(c.session, firstSession, 'the same session, resumed');
  const connect = c.log.sent.filter((m) => m.type === 'connect').pop();
  assert.deepEqual(connect.resume.channels, { 'd:silent': 1 }, 'the resume names the last offset the app got');
  await broker.publish('d:silent', 5);
  await a.count(5);
  assert.deepEqual(a.offsets(), [1, 2, 3, 4, 5]);
});

test('client publications made while offline are sent once when back', async () => {
  const p = await proxy();
  p.refuse();
  const c = client(p.wsUrl);
  c.connect();
  await once(c, 'disconnected');
  const first = c.publish('d:queued', { n: 1 });
  const second = c.publish('d:queued', { n: 2 });
  assert.equal(c.queuedPublishes, 2);
  p.refuse(false);
  const [r1, r2] = await Promise.all([first, second]);
  assert.deepEqual([r1.offset, r2.offset], [1, 2]);
  assert.equal(c.queuedPublishes, 0);
  // Barrier: an API publication after both; history must hold exactly three.
  await broker.publish('d:queued', { n: 'barrier' });
  const history = await broker.history('d:queued');
  assert.deepEqual(history.messages.map((m) => m.data), [{ n: 1 }, { n: 2 }, { n: 'barrier' }]);
  const sent = c.log.sent.filter((m) => m.type === 'publish');
  assert.equal(sent.length, 2, 'each sent once');
  assert.notEqual(sent[0].idempotency_key, sent[1].idempotency_key);
});

test('MessagePack codec (tether.v1.msgpack): subscribe, receive, publish', async () => {
  const c = client(broker.wsUrl, { codec: msgpackCodec });
  await connected(c);
  const got = collect(await subscribed(c, 'd:mp'));
  const data = { nested: { list: [1, 2.5, 'three', null, true] }, unicode: 'héllo ✓' };
  await broker.publish('d:mp', data);
  const mine = await c.publish('d:mp', { from: 'msgpack' });
  await got.count(2);
  assert.deepEqual(got[0].data, data);
  assert.deepEqual(got[1].data, { from: 'msgpack' });
  assert.equal(mine.offset, 2);
  assert.equal(c.log.sent.length, 0, 'no text frames on a MessagePack connection');
});
