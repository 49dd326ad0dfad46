// The example page an app developer starts from (examples/live-feed.html,
// docs/sdk-js.md), as they would open it: served over HTTP with the built
// ESM bundle beside it, in headless chromium, against a real broker behind
// the test TCP proxy. What the test reads is what a person sees on the
// page: the status line and the list of messages. docs/sdk-js.md shows
// the same page (checked here too).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { Broker } from '../support/broker.mjs';
import { Proxy } from '../support/proxy.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const pkg = new URL('../../', import.meta.url);
let server, context, broker, proxy, profile;

before(async () => {
  broker = await Broker.start();
  proxy = await Proxy.start(broker.clientAddr);
  // A static server for the package folder, as `python3 -m http.server
  // --directory sdk/js` would be (only what the page loads).
  server = http.createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const types = { '.html': 'text/html', '.js': 'text/javascript', '.map': 'application/json' };
    const type = types[path.slice(path.lastIndexOf('.'))];
    if (!/^\/(examples\/[\w-]+\.html|dist\/esm\/[\w-]+\.js(\.map)?)$/.test(path) || !type) return res.writeHead(404).end();
    try {
      res.writeHead(200, { 'content-type': type }).end(readFileSync(new URL(`.${path}`, pkg)));
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  profile = mkdtempSync(join(tmpdir(), 'tether-chromium-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await context?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await new Promise((r) => (server ? server.close(r) : r()));
  await proxy?.close();
  await broker?.stop();
});

test('docs/sdk-js.md shows this page, with the bundle path of an installed package', () => {
  const guide = readFileSync(new URL('../../../../docs/sdk-js.md', import.meta.url), 'utf8');
  const shown = [...guide.matchAll(/```html\n([\s\S]*?)```/g)].map((m) => m[1]).find((b) => b.includes('<title>Tether live feed</title>'));
  assert.ok(shown, 'the guide has the page');
  const file = readFileSync(new URL('examples/live-feed.html', pkg), 'utf8');
  assert.ok(file.includes('"@tether/client": "../dist/esm/index.js"'));
  assert.equal(shown, file.replace('"../dist/esm/index.js"', '"./node_modules/@tether/client/dist/esm/index.js"'), 'edit both: sdk/js/examples/live-feed.html and docs/sdk-js.md');
});

test('examples/live-feed.html: a live feed that survives a network drop, every message once, in order', async () => {
  const page = context.pages()[0] ?? (await context.newPage());
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e));
  const ws = encodeURIComponent(proxy.wsUrl);
  await page.goto(`http://127.0.0.1:${server.address().port}/examples/live-feed.html?channel=ex:feed&ws=${ws}`);

  const status = () => page.textContent('#status');
  const waitStatus = (text) =>
    page.waitForFunction((t) => document.getElementById('status').textContent === t, text, { timeout: 15_000, polling: 20 });
  const feed = () =>
    page.$$eval('#feed li', (items) => items.map((li) => [Number(li.dataset.offset), li.lastChild.textContent]));
  const waitFeed = (n) =>
    page.waitForFunction((k) => document.querySelectorAll('#feed li').length >= k, n, { timeout: 15_000, polling: 20 });
  const publish = (i) => broker.publish('ex:feed', { text: `message ${i}` });

  await waitStatus('live');
  assert.equal(await page.textContent('h1'), '#ex:feed');
  for (const i of [1, 2]) await publish(i);
  await waitFeed(2);
  assert.deepEqual(await feed(), [[1, 'message 1'], [2, 'message 2']]);

  // The network drops (connections reset, new ones refused) and messages are
  // published meanwhile: the page says so, then catches up on its own.
  proxy.refuse();
  proxy.cut();
  await waitStatus('reconnecting…');
  assert.equal(await page.getAttribute('#status', 'data-state'), 'reconnecting');
  for (const i of [3, 4, 5]) await publish(i);
  assert.equal((await feed()).length, 2, 'nothing arrives while the network is down');
  proxy.refuse(false);
  await waitStatus('live');
  await waitFeed(5);
  await publish(6); // barrier: a live message after the replayed ones
  await waitFeed(6);
  assert.deepEqual(await feed(), [1, 2, 3, 4, 5, 6].map((i) => [i, `message ${i}`]));
  assert.equal(await status(), 'live');
  assert.equal(await page.isHidden('#gap'), true, 'no discontinuity notice: nothing was lost');
  assert.ok(proxy.connections >= 2, 'it reconnected through the proxy');
  assert.deepEqual(pageErrors, []);
});

test('examples/live-feed.html: a broker restart loses history; the page says so and goes on live', async () => {
  // The page is still open from the test above, on the first broker.
  const page = context.pages()[0];
  const second = await Broker.start();
  try {
    await broker.stop();
    proxy.target = second.clientAddr;
    proxy.cut();
    await page.waitForFunction(() => !document.getElementById('gap').hidden, null, { timeout: 15_000, polling: 20 });
    assert.match(await page.textContent('#gap'), /could not be recovered \(not_recovered\)/);
    await page.waitForFunction(() => document.getElementById('status').textContent === 'live', null, { timeout: 15_000, polling: 20 });
    await second.publish('ex:feed', { text: 'after the restart' });
    await page.waitForFunction(() => document.querySelectorAll('#feed li').length === 7, null, { timeout: 15_000, polling: 20 });
    const last = await page.$eval('#feed li:last-child', (li) => [Number(li.dataset.offset), li.lastChild.textContent]);
    assert.deepEqual(last, [1, 'after the restart']);
  } finally {
    await second.stop();
  }
});
