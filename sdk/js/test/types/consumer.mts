// Type-checked (not run) by test/e2e/package.test.mjs: an ESM app using the
// published entry points by name, with the DOM WebSocket and with `ws`.
import { TetherClient, TetherError, type Message, type Discontinuity } from '@tether/client';
import { msgpackCodec } from '@tether/client/msgpack';
import { attachReactNative } from '@tether/client/react-native';
import WebSocket from 'ws';

const browser = new TetherClient('wss://example.test/v1/ws', { WebSocket: globalThis.WebSocket, ack: 'manual' });
const node = new TetherClient('ws://127.0.0.1:1/v1/ws', { WebSocket, codec: msgpackCodec, getToken: async () => 'jwt' });
const sub = browser.subscribe('news', (m: Message) => m.offset.toFixed());
sub.on('discontinuity', (d: Discontinuity) => d.position.epoch.toUpperCase());
node.on('error', (e: TetherError) => e.code);
node.publish('chat', { a: [1, 'x', null] }, { idempotencyKey: 'k', retry: false }).then((r) => r.offset + 1);
attachReactNative(browser, {
  AppState: { currentState: 'active', addEventListener: (_t: 'change', _l: (s: string) => void) => ({ remove() {} }) },
  NetInfo: { addEventListener: (_l: (s: { isConnected: boolean | null; type?: string }) => void) => () => {} },
});
interface Chat {
  text: string;
}
browser.subscribe<Chat>('chat', (m) => m.data.text.toUpperCase());
const typed: Chat = { text: 'interfaces are accepted as data' };
browser.publish('chat', typed);
// @ts-expect-error the handler's message is typed
browser.subscribe<Chat>('chat2', (m) => m.data.nope);
