// The package as an app installs it: ESM and CommonJS entry points by name
// (package self-reference through "exports"), the same API from both, no
// runtime dependency in the core, and a CommonJS client against a real broker.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import WebSocket from 'ws';
import * as esm from '@tether/client';
import * as esmRn from '@tether/client/react-native';
import { Broker } from '../support/broker.mjs';
import { once } from '../support/wait.mjs';

const require = createRequire(import.meta.url);
const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url)));
let broker;
after(() => broker?.stop());

test('package.json: ESM + CommonJS exports with types, Node >= 20, no runtime dependency', () => {
  assert.equal(pkg.type, 'module');
  assert.equal(pkg.sideEffects, false);
  assert.equal(pkg.engines.node, '>=20');
  assert.match(pkg.version, /^\d+\.\d+\.\d+$/);
  assert.equal(pkg.dependencies, undefined, 'no runtime dependencies');
  assert.equal(pkg.peerDependenciesMeta['@msgpack/msgpack'].optional, true);
  for (const entry of ['.', './msgpack', './react-native']) {
    const e = pkg.exports[entry];
    for (const cond of ['import', 'require']) assert.ok(e[cond].types && e[cond].default, `${entry} ${cond}`);
  }
  const core = readFileSync(new URL('../../dist/esm/index.js', import.meta.url), 'utf8');
  assert.doesNotMatch(core, /^\s*import\s/m, 'the core bundle imports nothing');
  assert.doesNotMatch(core, /require\(/);
});

test('require() and import give the same API', () => {
  const cjs = require('@tether/client');
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  assert.equal(typeof cjs.TetherClient, 'function');
  assert.equal(cjs.VERSION, pkg.version);
  assert.deepEqual(Object.keys(require('@tether/client/react-native')).sort(), Object.keys(esmRn).sort());
  assert.equal(require('@tether/client/msgpack').msgpackCodec.subprotocol, 'tether.v1.msgpack');
});

test('a CommonJS client connects to a real broker and receives', async () => {
  broker = await Broker.start();
  const { TetherClient } = require('@tether/client');
  const c = new TetherClient(broker.wsUrl, { WebSocket });
  c.connect();
  await once(c, 'connected');
  const sub = c.subscribe('p:cjs');
  await once(sub, 'subscribed');
  const got = once(sub, 'message');
  await broker.publish('p:cjs', { via: 'require' });
  assert.deepEqual((await got).data, { via: 'require' });
  c.disconnect();
});
