// End to end in Node with client auth (HS256 JWTs minted here): refresh
// before expiry, 4011 -> getToken -> reconnect, 4003 -> never reconnect, a
// refresh whose token no longer allows a channel ends that subscription.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Broker } from '../support/broker.mjs';
import { tokenFor } from '../support/jwt.mjs';
import { once } from '../support/wait.mjs';
import { collect, connected, makeClient, subscribed } from '../support/clients.mjs';

const SECRET = 'sdk-test-secret-0123456789abcdef';
let broker;
const clients = [];
const client = (options) => {
  const c = makeClient(broker.wsUrl, options);
  clients.push(c);
  return c;
};

before(async () => {
  broker = await Broker.start(['--jwt-secret', SECRET]);
});
after(async () => {
  for (const c of clients) c.disconnect();
  await broker.stop();
});

test('the token is refreshed before it expires, on the same session', async () => {
  const minted = [];
  const c = client({
    getToken: () => {
      const t = tokenFor(SECRET, 'alice', minted.length === 0 ? 4 : 600);
      minted.push(t);
      return t;
    },
  });
  const drops = [];
  c.on('disconnected', (e) => drops.push(e));
  await connected(c);
  const session = c.session;
  const refreshed = await once(c, 'refreshed'); // at half of the 4 s
  const exp = JSON.parse(Buffer.from(minted[1].split('.')[1], 'base64url')).exp;
  assert.equal(refreshed.expires, exp);
  assert.equal(c.log.sent.filter((m) => m.type === 'refresh').length, 1);
  assert.equal(c.session, session);
  assert.deepEqual(drops, []);
  assert.equal(c.log.sent.find((m) => m.type === 'connect').token, minted[0]);
});

test('4011 (token expired): getToken is called and the client reconnects and resumes', async () => {
  let release;
  const stalled = new Promise((res) => (release = res));
  const calls = [];
  const c = client({
    getToken: () => {
      calls.push(Date.now());
      if (calls.length === 1) return tokenFor(SECRET, 'bob', 1);
      if (calls.length === 2) return stalled; // the refresh: token service too slow
      return tokenFor(SECRET, 'bob', 600);
    },
  });
  await connected(c);
  const sub = await subscribed(c, 'a:expiry');
  const got = collect(sub);
  const firstSession = c.session;
  const down = await once(c, 'disconnected', () => true, 15_000);
  assert.equal(down.code, 4011);
  assert.equal(down.reconnect, true);
  release(tokenFor(SECRET, 'bob', 600)); // too late: ignored
  const info = await once(c, 'connected');
  assert.equal(calls.length, 3, 'a new token was fetched for the reconnect');
  assert.equal(info.resumed, true);
  assert.equal(c.session, firstSession);
  await broker.publish('a:expiry', 'after');
  await got.count(1);
  assert.deepEqual(got.map((m) => m.data), ['after']);
});

test('4003 (bad token): disconnect says no reconnect, and the client never retries', async () => {
  const c = client({
    getToken: () => tokenFor('not-the-secret', 'mallory', 600),
    backoff: { baseMs: 1, maxMs: 1 },
  });
  const down = once(c, 'disconnected');
  c.connect();
  const event = await down;
  assert.equal(event.code, 4003);
  assert.equal(event.reconnect, false);
  assert.equal(c.state, 'closed');
  // Barrier: a whole round trip of another client takes far longer than the
  // 1 ms backoff this client would use if it retried.
  const other = client({ token: tokenFor(SECRET, 'carol', 600) });
  await connected(other);
  const got = collect(await subscribed(other, 'a:barrier'));
  await broker.publish('a:barrier', 1);
  await got.count(1);
  assert.equal(c.log.sockets, 1, 'one connection attempt only');
  assert.equal(c.state, 'closed');
});

test('client publish under auth: forbidden without the publish claim, accepted with it', async () => {
  const reader = client({ token: tokenFor(SECRET, 'erin', 600) });
  const writer = client({ token: tokenFor(SECRET, 'erin', 600, { publish: true }) });
  await Promise.all([connected(reader), connected(writer)]);
  await assert.rejects(reader.publish('a:pub', 'no'), { name: 'TetherError', code: 'forbidden', channel: 'a:pub' });
  assert.equal(reader.queuedPublishes, 0, 'a refused publication is not retried');
  const r = await writer.publish('a:pub', 'yes');
  assert.equal(r.offset, 1);
  const history = await broker.history('a:pub');
  assert.deepEqual(history.messages.map((m) => m.data), ['yes']);
});

test('a refresh whose token drops a channel: the server ends that subscription (unsubscribed without id)', async () => {
  // PROTOCOL.md §4: `unsubscribed` comes without `id` when the server ends a
  // subscription itself, "e.g. a `refresh` whose token no longer allows the
  // channel" (§9: the `channels` claim).
  let n = 0;
  const c = client({
    getToken: () =>
      ++n === 1
        ? tokenFor(SECRET, 'dave', 2, { channels: ['a:keep', 'a:lose'] })
        : tokenFor(SECRET, 'dave', 600, { channels: ['a:keep'] }),
  });
  await connected(c);
  const keep = collect(await subscribed(c, 'a:keep'));
  const lose = await subscribed(c, 'a:lose');
  const lost = collect(lose);
  const ended = [];
  lose.on('unsubscribed', (e) => ended.push(e));
  await once(c, 'refreshed');
  // Barrier: the server handles the refresh before these publications, so
  // by the time the one on a:keep arrives it has ended a:lose.
  await broker.publish('a:lose', 'must not arrive');
  await broker.publish('a:keep', 'barrier');
  await keep.count(1);
  assert.deepEqual(lost.map((m) => m.data), [], 'no message on a channel the new token does not allow');
  assert.equal(ended.length, 1, 'unsubscribed (without id) for a:lose');
  assert.ok(ended[0].reason && ended[0].reason !== 'client', `a server reason: ${ended[0].reason}`);
  assert.equal(lose.state, 'unsubscribed');
  assert.equal(c.getSubscription('a:lose'), undefined);
});
