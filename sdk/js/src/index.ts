/**
 * `@tether/client`: the JSON core of the Tether SDK (no runtime
 * dependency). MessagePack: `@tether/client/msgpack`; React Native
 * AppState/NetInfo hooks: `@tether/client/react-native`.
 */
export {
  TetherClient,
  VERSION,
  type AckMode,
  type ClientEvents,
  type ClientOptions,
  type ClientState,
  type ConnectedEvent,
  type DisconnectedEvent,
  type PublishOptions,
  type PublishResult,
  type SubscribeOptions,
  type WebSocketConstructor,
  type WebSocketLike,
} from './client.js';
export {
  Subscription,
  type Discontinuity,
  type Message,
  type SubscribedEvent,
  type SubscriptionEvents,
  type SubscriptionState,
  type UnsubscribedEvent,
} from './subscription.js';
export { TetherError, type ErrorCode } from './errors.js';
export { jsonCodec, type Codec } from './codec.js';
export { backoffDelay, DEFAULT_BACKOFF, type BackoffOptions } from './backoff.js';
export { NO_RECONNECT_CODES, type Json, type Position, type ServerErrorCode } from './protocol.js';
