// The React Native hooks with fake AppState / NetInfo objects, a fake
// WebSocket and fake timers: background grace, foreground without backoff,
// reconnect on network change.
import { test, beforeEach, afterEach, mock } from 'node:test';
import assert from 'node:assert/strict';
import { TetherClient } from '../../dist/esm/index.js';
import { attachAppState, attachNetInfo, attachReactNative } from '../../dist/esm/react-native.js';
import { FakeWebSocket } from '../support/fake-ws.mjs';

beforeEach(() => {
  FakeWebSocket.reset();
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_800_000_000_000 });
});
afterEach(() => mock.timers.reset());

class FakeAppState {
  currentState = 'active';
  listeners = new Set();
  addEventListener(type, fn) {
    assert.equal(type, 'change');
    this.listeners.add(fn);
    return { remove: () => this.listeners.delete(fn) };
  }
  set(state) {
    this.currentState = state;
    for (const fn of this.listeners) fn(state);
  }
}

class FakeNetInfo {
  listeners = new Set();
  addEventListener(fn) {
    this.listeners.add(fn);
    fn({ isConnected: true, type: 'wifi' }); // NetInfo reports the current state at once
    return () => this.listeners.delete(fn);
  }
  set(state) {
    for (const fn of this.listeners) fn(state);
  }
}

function connected() {
  const c = new TetherClient('ws://t/v1/ws', { WebSocket: FakeWebSocket, random: () => 0.99 });
  c.connect();
  FakeWebSocket.last.accept();
  return c;
}

test('background: the connection is closed after the grace period (default 30 s), not before', () => {
  const c = connected();
  const app = new FakeAppState();
  attachAppState(c, app);
  app.set('background');
  mock.timers.tick(29_999);
  assert.equal(c.state, 'connected');
  mock.timers.tick(1);
  assert.equal(c.state, 'idle');
  assert.equal(FakeWebSocket.last.closedByClient, 1000);
  mock.timers.tick(3600_000);
  assert.equal(FakeWebSocket.all.length, 1, 'no reconnect while in the background');
});

test('foreground after the grace period: reconnects at once (no backoff) and resumes', () => {
  const c = connected();
  const app = new FakeAppState();
  attachAppState(c, app, { backgroundGraceMs: 5000 });
  app.set('background');
  mock.timers.tick(5000);
  app.set('active');
  assert.equal(FakeWebSocket.all.length, 2, 'a new socket without any timer running');
  assert.equal(FakeWebSocket.last.accept().resume.token, 'rt1');
});

test('back to the foreground within the grace period: the connection is kept', () => {
  const c = connected();
  const app = new FakeAppState();
  attachAppState(c, app, { backgroundGraceMs: 5000 });
  app.set('background');
  mock.timers.tick(4000);
  app.set('active');
  mock.timers.tick(30_000);
  FakeWebSocket.last.receive({ type: 'ping' });
  assert.equal(c.state, 'connected');
  assert.equal(FakeWebSocket.all.length, 1);
});

test("'inactive' (iOS transient) does not close the connection", () => {
  const c = connected();
  const app = new FakeAppState();
  attachAppState(c, app, { backgroundGraceMs: 1000 });
  app.set('inactive');
  mock.timers.tick(10_000);
  FakeWebSocket.last.receive({ type: 'ping' });
  assert.equal(c.state, 'connected');
});

test('foreground while waiting to reconnect skips the backoff wait', () => {
  const c = connected();
  const app = new FakeAppState();
  attachAppState(c, app);
  FakeWebSocket.last.serverClose(1006);
  assert.equal(c.state, 'waiting');
  app.set('background');
  app.set('active');
  assert.equal(FakeWebSocket.all.length, 2);
});

test('foreground does not revive a client closed by a no-reconnect code', () => {
  const c = connected();
  const app = new FakeAppState();
  attachAppState(c, app, { backgroundGraceMs: 10 });
  FakeWebSocket.last.serverClose(4003);
  app.set('background');
  mock.timers.tick(10);
  app.set('active');
  assert.equal(c.state, 'closed');
  assert.equal(FakeWebSocket.all.length, 1);
});

test('NetInfo: the initial report does nothing; back online reconnects at once', () => {
  const c = connected();
  const net = new FakeNetInfo();
  attachNetInfo(c, net);
  assert.equal(FakeWebSocket.all.length, 1);
  net.set({ isConnected: false, type: 'none' });
  FakeWebSocket.last.serverClose(1006);
  assert.equal(c.state, 'waiting');
  net.set({ isConnected: true, type: 'cellular' });
  assert.equal(FakeWebSocket.all.length, 2, 'no backoff wait');
});

test('NetInfo: another network while connected drops the socket and resumes at once', () => {
  const c = connected();
  const net = new FakeNetInfo();
  attachNetInfo(c, net);
  net.set({ isConnected: true, type: 'wifi' });
  assert.equal(FakeWebSocket.all.length, 1, 'same network: nothing');
  net.set({ isConnected: true, type: 'cellular' });
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(FakeWebSocket.all[0].closedByClient, 1000);
  assert.equal(FakeWebSocket.last.accept().resume.token, 'rt1');
});

test('NetInfo does not wake a client the app disconnected', () => {
  const c = connected();
  const net = new FakeNetInfo();
  attachNetInfo(c, net);
  c.disconnect();
  net.set({ isConnected: true, type: 'cellular' });
  assert.equal(c.state, 'idle');
  assert.equal(FakeWebSocket.all.length, 1);
});

test('attachReactNative wires both and detaches both', () => {
  const c = connected();
  const app = new FakeAppState();
  const net = new FakeNetInfo();
  const detach = attachReactNative(c, { AppState: app, NetInfo: net, backgroundGraceMs: 100 });
  detach();
  assert.equal(app.listeners.size, 0);
  assert.equal(net.listeners.size, 0);
  app.set('background');
  mock.timers.tick(1000);
  assert.equal(c.state, 'connected');
});
