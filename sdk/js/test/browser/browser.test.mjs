// The SDK in a real headless browser (Debian chromium through
// playwright-core) against a real broker: the built ESM bundle served on
// localhost, the browser's own WebSocket. Publish/subscribe, an abrupt drop
// and a silently dead network each followed by an exactly-once resume,
// discontinuity after a broker restart, token refresh and 4011, and 4003.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { Broker } from '../support/broker.mjs';
import { Proxy } from '../support/proxy.mjs';
import { tokenFor } from '../support/jwt.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SECRET = 'browser-test-secret-0123456789-abcdef';
const dist = new URL('../../dist/esm/', import.meta.url);
let server, context, page, broker, authBroker, profile;
const proxies = [];
const tokens = {}; // name -> function returning the next token

before(async () => {
  [broker, authBroker] = await Promise.all([Broker.start(['--heartbeat', '1']), Broker.start(['--jwt-secret', SECRET])]);
  server = http.createServer((req, res) => {
    const file = { '/': 'page.html', '/index.js': 'index.js', '/index.js.map': 'index.js.map' }[req.url];
    if (!file) return res.writeHead(404).end();
    const body = file === 'page.html' ? readFileSync(new URL('page.html', import.meta.url)) : readFileSync(new URL(file, dist));
    res.writeHead(200, { 'content-type': file.endsWith('.html') ? 'text/html' : 'text/javascript' }).end(body);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  profile = mkdtempSync(join(tmpdir(), 'tether-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  await context.exposeFunction('testGetToken', (name) => tokens[name]());
  page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e));
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => window.ready === true);
  assert.deepEqual(pageErrors, []);
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await new Promise((r) => (server ? server.close(r) : r()));
  for (const p of proxies) await p.close();
  await Promise.all([broker?.stop(), authBroker?.stop()]);
});

const proxy = async (b = broker) => {
  const p = await Proxy.start(b.clientAddr);
  proxies.push(p);
  return p;
};
const make = (name, url, options) => page.evaluate(([n, u, o]) => window.make(n, u, o), [name, url, options]);
const run = (name, code) => page.evaluate(([n, c]) => new Function('c', 'log', `return (${c})`)(window.clients[n].c, window.clients[n].log), [name, code]);
const waitFor = (name, code, timeout = 10_000) =>
  page.waitForFunction(([n, c]) => new Function('c', 'log', `return (${c})`)(window.clients[n].c, window.clients[n].log), [name, code], { timeout, polling: 20 });
const count = (name, event) => run(name, `log.events.filter((e) => e[0] === '${event}').length`);
const messages = (name, channel) => run(name, `log.messages['${channel}'] ?? []`);
const subscribe = async (name, channel) => {
  await run(name, `(c.subscribe('${channel}'), true)`);
  await waitFor(name, `c.getSubscription('${channel}').state === 'subscribed'`);
};

test('browser: subscribe, API publications arrive in order; a client publish is published once', async () => {
  await make('pub', broker.wsUrl);
  await run('pub', 'c.connect()');
  await waitFor('pub', `c.state === 'connected'`);
  await subscribe('pub', 'b:news');
  for (let i = 1; i <= 4; i++) await broker.publish('b:news', { i });
  await waitFor('pub', `(log.messages['b:news'] ?? []).length === 4`);
  assert.deepEqual(await messages('pub', 'b:news'), [1, 2, 3, 4].map((i) => [i, { i }]));
  const result = await run('pub', `c.publish('b:news', { from: 'browser' })`);
  assert.equal(result.offset, 5);
  await waitFor('pub', `log.messages['b:news'].length === 5`);
  assert.deepEqual((await broker.history('b:news')).messages.map((m) => m.data).pop(), { from: 'browser' });
});

test('browser: abrupt drop, publications while offline, resume delivers each once, in order', async () => {
  const p = await proxy();
  await make('drop', p.wsUrl);
  await run('drop', 'c.connect()');
  await waitFor('drop', `c.state === 'connected'`);
  await subscribe('drop', 'b:drop');
  for (let i = 1; i <= 2; i++) await broker.publish('b:drop', i);
  await waitFor('drop', `(log.messages['b:drop'] ?? []).length === 2`);
  p.refuse();
  p.cut();
  await waitFor('drop', `c.state !== 'connected'`);
  for (let i = 3; i <= 5; i++) await broker.publish('b:drop', i);
  p.refuse(false);
  await waitFor('drop', `log.events.filter((e) => e[0] === 'connected').length === 2`);
  const connected = await run('drop', `log.events.filter((e) => e[0] === 'connected')[1][1]`);
  assert.equal(connected.resumed, true);
  assert.deepEqual(await run('drop', `log.sent.filter((m) => m.type === 'connect')[1].resume.channels`), { 'b:drop': 2 });
  await broker.publish('b:drop', 6); // barrier
  await waitFor('drop', `log.messages['b:drop'].length >= 6`);
  assert.deepEqual((await messages('drop', 'b:drop')).map(([o]) => o), [1, 2, 3, 4, 5, 6]);
  assert.equal(await count('drop', 'discontinuity'), 0);
});

test('browser: silently dead network: liveness timeout, resume, nothing lost', async () => {
  const p = await proxy();
  await make('silent', p.wsUrl, { livenessTimeoutMs: 2500 });
  await run('silent', 'c.connect()');
  await waitFor('silent', `c.state === 'connected'`);
  await subscribe('silent', 'b:silent');
  await broker.publish('b:silent', 1);
  await waitFor('silent', `(log.messages['b:silent'] ?? []).length === 1`);
  p.freeze();
  for (let i = 2; i <= 3; i++) await broker.publish('b:silent', i);
  await waitFor('silent', `log.events.some((e) => e[0] === 'disconnected' && e[1].reason === 'liveness timeout')`);
  await waitFor('silent', `log.events.filter((e) => e[0] === 'connected').length === 2`);
  await broker.publish('b:silent', 4);
  await waitFor('silent', `log.messages['b:silent'].length >= 4`);
  assert.deepEqual((await messages('silent', 'b:silent')).map(([o]) => o), [1, 2, 3, 4]);
});

test('browser: SIGTERM -> 4010 with reconnect; restarted broker -> discontinuity, new epoch delivered', async () => {
  const first = await Broker.start();
  const p = await proxy(first);
  await make('restart', p.wsUrl);
  await run('restart', 'c.connect()');
  await waitFor('restart', `c.state === 'connected'`);
  await subscribe('restart', 'b:restart');
  await first.publish('b:restart', 'old');
  await waitFor('restart', `(log.messages['b:restart'] ?? []).length === 1`);
  await first.terminate();
  await waitFor('restart', `log.events.some((e) => e[0] === 'disconnected')`);
  const down = await run('restart', `log.events.find((e) => e[0] === 'disconnected')[1]`);
  assert.equal(down.code, 4010);
  assert.equal(down.reconnect, true);
  const second = await Broker.start();
  try {
    p.target = second.clientAddr;
    await waitFor('restart', `log.events.some((e) => e[0] === 'discontinuity')`);
    const d = await run('restart', `log.events.find((e) => e[0] === 'discontinuity')[1]`);
    assert.equal(d.reason, 'not_recovered');
    await second.publish('b:restart', 'new');
    await waitFor('restart', `log.messages['b:restart'].length === 2`);
    assert.deepEqual(await messages('restart', 'b:restart'), [[1, 'old'], [1, 'new']]);
  } finally {
    await run('restart', 'c.disconnect()');
    await second.stop();
  }
});

test('browser: token refreshed before expiry; 4011 -> getToken -> reconnect', async () => {
  let n = 0;
  let release;
  const stalled = new Promise((r) => (release = r));
  tokens.auth = () => {
    n++;
    if (n === 1) return tokenFor(SECRET, 'bea', 3); // refreshed at ~1.5 s
    if (n === 2) return tokenFor(SECRET, 'bea', 2); // the refresh: short again
    if (n === 3) return stalled; // next refresh: too slow, the server closes 4011
    return tokenFor(SECRET, 'bea', 600);
  };
  await make('auth', authBroker.wsUrl, { tokenFromTest: true });
  await run('auth', 'c.connect()');
  await waitFor('auth', `log.events.some((e) => e[0] === 'refreshed')`);
  await waitFor('auth', `log.events.some((e) => e[0] === 'disconnected')`, 15_000);
  const down = await run('auth', `log.events.find((e) => e[0] === 'disconnected')[1]`);
  assert.equal(down.code, 4011);
  assert.equal(down.reconnect, true);
  await waitFor('auth', `log.events.filter((e) => e[0] === 'connected').length === 2`);
  release(tokenFor(SECRET, 'bea', 600));
  assert.equal(n, 4);
  assert.equal(await run('auth', `log.events.filter((e) => e[0] === 'connected')[1][1].resumed`), true);
  await run('auth', 'c.disconnect()');
});

test('browser: 4003 (bad token) ends the client; no further attempt', async () => {
  await make('bad', authBroker.wsUrl, { token: tokenFor('wrong-secret', 'eve', 600), backoff: { baseMs: 1, maxMs: 1 } });
  await run('bad', 'c.connect()');
  await waitFor('bad', `c.state === 'closed'`);
  const down = await run('bad', `log.events.find((e) => e[0] === 'disconnected')[1]`);
  assert.deepEqual([down.code, down.reconnect], [4003, false]);
  // Barrier: another client's full round trip, far longer than a 1 ms backoff.
  await make('good', authBroker.wsUrl, { token: tokenFor(SECRET, 'gil', 600) });
  await run('good', 'c.connect()');
  await waitFor('good', `c.state === 'connected'`);
  await subscribe('good', 'b:barrier');
  await authBroker.publish('b:barrier', 1);
  await waitFor('good', `(log.messages['b:barrier'] ?? []).length === 1`);
  assert.equal(await run('bad', 'log.sockets'), 1);
  await run('good', 'c.disconnect()');
});
