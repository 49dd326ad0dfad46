// End to end in Node: when the server cannot replay, the app is told
// (`discontinuity`) — history too short for what was missed, or a broker
// restart (new epoch) after a graceful shutdown (4010, reconnect: true).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { Broker } from '../support/broker.mjs';
import { Proxy } from '../support/proxy.mjs';
import { once } from '../support/wait.mjs';
import { collect, connected, makeClient, subscribed } from '../support/clients.mjs';

const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

test('more missed than --history-size 2 holds: discontinuity (not_recovered), then live messages', async () => {
  const broker = await Broker.start(['--history-size', '2']);
  cleanup.push(() => broker.stop());
  const p = await Proxy.start(broker.clientAddr);
  cleanup.push(() => p.close());
  const c = makeClient(p.wsUrl);
  cleanup.push(() => c.disconnect());
  await connected(c);
  const sub = await subscribed(c, 'r:short');
  const got = collect(sub);
  await broker.publish('r:short', 1);
  await got.count(1);

  p.refuse();
  const down = once(c, 'disconnected');
  p.cut();
  await down;
  for (let i = 2; i <= 5; i++) await broker.publish('r:short', i); // history keeps 4, 5 only
  const discontinuity = once(sub, 'discontinuity');
  p.refuse(false);
  const event = await discontinuity;
  assert.equal(event.reason, 'not_recovered');
  assert.deepEqual(event.previous, { epoch: got[0].epoch, offset: 1 });
  assert.deepEqual(event.position, { epoch: got[0].epoch, offset: 5 });
  await broker.publish('r:short', 6);
  await got.count(2);
  assert.deepEqual(got.offsets(), [1, 6], 'no partial replay: live messages after the reported position');
});

test('graceful shutdown: 4010 with reconnect; a restarted broker (new epoch) gives discontinuity, then offsets restart', async () => {
  const first = await Broker.start();
  const p = await Proxy.start(first.clientAddr);
  cleanup.push(() => p.close());
  const c = makeClient(p.wsUrl);
  cleanup.push(() => c.disconnect());
  await connected(c);
  const sub = await subscribed(c, 'r:restart');
  const got = collect(sub);
  await first.publish('r:restart', 'a');
  await first.publish('r:restart', 'b');
  await got.count(2);
  const oldEpoch = got[0].epoch;

  const down = once(c, 'disconnected', (e) => e.code !== 1006);
  const status = await first.terminate();
  assert.deepEqual(status, { code: 0, signal: null }, 'the broker exits 0 on SIGTERM');
  const event = await down;
  assert.equal(event.code, 4010);
  assert.equal(event.reconnect, true);

  const second = await Broker.start();
  cleanup.push(() => second.stop());
  p.target = second.clientAddr;
  const discontinuity = once(sub, 'discontinuity');
  const info = await once(c, 'connected');
  assert.equal(info.resumed, false, 'the new broker does not know the old session');
  const d = await discontinuity;
  assert.equal(d.reason, 'not_recovered');
  assert.deepEqual(d.previous, { epoch: oldEpoch, offset: 2 });
  assert.notEqual(d.position.epoch, oldEpoch);
  await second.publish('r:restart', 'c'); // offset 1 of the new epoch: not a duplicate
  await got.count(3);
  assert.deepEqual(got.map((m) => [m.offset, m.data]), [[1, 'a'], [2, 'b'], [1, 'c']]);
});
