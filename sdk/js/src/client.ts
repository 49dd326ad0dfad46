/**
 * The Tether client: one WebSocket at a time, reconnected with full-jitter
 * backoff and resumed so that no message is lost or repeated (§6); server
 * pings answered and a liveness timer of its own (§7); close codes honoured
 * (§8); the token refreshed before it expires (§9); publications queued
 * while offline and sent once per connection until the server answers.
 */
import { backoffDelay, type BackoffOptions } from './backoff.js';
import { jsonCodec, type Codec } from './codec.js';
import { Emitter } from './emitter.js';
import { TetherError, type ErrorCode } from './errors.js';
import {
  NO_RECONNECT_CODES,
  TOKEN_EXPIRED,
  type ClientMessage,
  type Json,
  type Position,
  type ServerMessage,
} from './protocol.js';
import {
  Subscription,
  type Discontinuity,
  type Message,
  type SubscribedEvent,
  type SubscriptionHost,
  type UnsubscribedEvent,
} from './subscription.js';

export const VERSION = '0.1.0';

/** What the SDK needs of a WebSocket: the browser's, React Native's, or `ws`'s. */
export interface WebSocketLike {
  readonly readyState: number;
  binaryType: string;
  // Handler parameters are `any` so that the DOM, React Native and `ws`
  // WebSocket types all fit.
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** How delivered messages are acknowledged to the server (`ack`, §3). */
export type AckMode = 'auto' | 'batch' | 'manual';

export interface ClientOptions {
  /** The JWT for `connect` (when the server requires client auth). */
  token?: string;
  /**
   * Returns a fresh token. Called when there is none, when the current one
   * has expired, before it expires (then sent as `refresh`), and after close
   * 4011. Without it, 4011 ends the client.
   */
  getToken?: () => string | Promise<string>;
  /** WebSocket implementation; default `globalThis.WebSocket` (in Node 20 pass `ws`). */
  WebSocket?: WebSocketConstructor;
  /** Wire encoding; default JSON (`tether.v1.json`). */
  codec?: Codec;
  /** Device id for offline push (`connect.device`). */
  device?: string;
  /** `connect.client`; default `{name: '@tether/client', version, platform: 'js'}`. */
  client?: { name: string; version: string; platform: string };
  /** Reconnect backoff; default `{baseMs: 500, maxMs: 30000}`, full jitter. */
  backoff?: BackoffOptions;
  /** From opening the socket to `connected`, ms. Default 10 000. */
  connectTimeoutMs?: number;
  /**
   * No frame from the server for this long means the connection is dead,
   * ms. Default: 1.5 × the server's heartbeat, at least heartbeat + 5 s
   * (37.5 s for the default 25 s heartbeat).
   */
  livenessTimeoutMs?: number;
  /** Refresh the token this long before `exp` (at most half its remaining life), ms. Default 30 000. */
  refreshMarginMs?: number;
  /** Default `batch`. */
  ack?: AckMode;
  /** With `ack: 'batch'`: most time between a delivery and its ack, ms. Default 1000. */
  ackIntervalMs?: number;
  /** Publications waiting for their answer (queued or in flight). Default 100. */
  maxQueuedPublishes?: number;
  /** A publication not answered within this is rejected with `timeout`, ms; 0 = never. Default 60 000. */
  publishTimeoutMs?: number;
  /** Random source in [0, 1) for the backoff jitter (tests). Default `Math.random`. */
  random?: () => number;
}

export interface PublishOptions {
  /**
   * Sent as `idempotency_key` (the server currently ignores it on client
   * publishes; see the README). Default: a random key per call.
   */
  idempotencyKey?: string;
  /**
   * Whether a publication whose connection died before the answer is sent
   * again on the next connection (at least once). `false`: it is rejected
   * with `unknown_outcome` instead (at most once). Default true.
   */
  retry?: boolean;
}

export interface PublishResult {
  channel: string;
  epoch: string;
  offset: number;
}

export interface SubscribeOptions {
  /** Resume from a position the app stored (e.g. across app restarts). */
  since?: Position;
}

export type ClientState = 'idle' | 'connecting' | 'connected' | 'waiting' | 'closed';

export interface ConnectedEvent {
  session: string;
  resumed: boolean;
  node: string;
  heartbeat: number;
}

export interface DisconnectedEvent {
  /** The close code (the server's `disconnect.code` when it sent one); 1006 when the SDK gave up on the socket. */
  code: number;
  reason: string;
  /** Whether the client will reconnect on its own. */
  reconnect: boolean;
  /** Delay before the next attempt, ms, when reconnecting. */
  delayMs?: number;
}

export interface ClientEvents {
  state: ClientState;
  connecting: { attempt: number };
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  message: Message;
  subscribed: SubscribedEvent;
  unsubscribed: UnsubscribedEvent;
  discontinuity: Discontinuity;
  refreshed: { expires: number };
  error: TetherError;
}

interface QueuedPublish {
  channel: string;
  data: unknown;
  key: string;
  retry: boolean;
  /** The connection it was sent on, 0 while unsent. */
  sentOn: number;
  id: number;
  resolve: (r: PublishResult) => void;
  reject: (e: TetherError) => void;
  timer?: ReturnType<typeof setTimeout>;
}

type Reply = (message: ServerMessage) => void;

const OPEN = 1;
const ABANDONED = 1006;
let keyCounter = 0;

function jwtExpiry(token: string | undefined): number | undefined {
  try {
    const payload = (token as string).split('.')[1] as string;
    const exp = JSON.parse(atob(payload.replace(/-/g, '+').replace(/_/g, '/'))).exp;
    return typeof exp === 'number' ? exp : undefined;
  } catch {
    return undefined;
  }
}

function serverError(m: ServerMessage, channel?: string): TetherError {
  return new TetherError((m.code as ErrorCode) ?? 'internal', m.message ?? 'request failed', channel);
}

export class TetherClient extends Emitter<ClientEvents> {
  readonly url: string;
  /** Connection state; see the README. */
  state: ClientState = 'idle';
  /** The current session id, once connected. */
  session: string | undefined;
  /** The close that put the client in state `closed`. */
  closedBy: DisconnectedEvent | undefined;

  private readonly opts: ClientOptions;
  private readonly codec: Codec;
  private token: string | undefined;
  private needToken = false;
  private ws: WebSocketLike | null = null;
  /** Generation: bumped whenever a socket is replaced, so stale callbacks do nothing. */
  private gen = 0;
  private attempt = 0;
  private nextId = 0;
  private connectId = 0;
  private heartbeat = 25;
  private resumeToken: string | undefined;
  private farewell: ServerMessage | undefined;
  private readonly subs = new Map<string, Subscription>();
  /** Channels the current session has (or has been asked for) on the server. */
  private readonly onServer = new Set<string>();
  private readonly replies = new Map<number, Reply>();
  private readonly queue: QueuedPublish[] = [];
  private retryTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private livenessTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private ackTimer: ReturnType<typeof setTimeout> | undefined;
  private readonly host: SubscriptionHost;

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = url;
    this.opts = options;
    this.codec = options.codec ?? jsonCodec;
    this.token = options.token;
    this.host = {
      unsubscribe: (sub) => this.dropSubscription(sub, 'client', true),
      ack: () => this.flushAcks(),
      delivered: (sub, message) => {
        this.emit('message', message);
        const mode = this.opts.ack ?? 'batch';
        if (mode === 'manual') return;
        sub.ackable = message.offset;
        if (mode === 'auto') this.flushAcks();
        else this.ackTimer ??= setTimeout(() => this.flushAcks(), this.opts.ackIntervalMs ?? 1000);
      },
      discontinuity: (event) => this.emit('discontinuity', event),
      listenerThrew: (error, where) => this.listenerThrew(error, where),
    };
  }

  // ---- public API -------------------------------------------------------

  /**
   * Connects (or, while waiting to reconnect, connects now). Does nothing
   * when already connected or connecting. Allowed again after `closed`.
   */
  connect(): void {
    if (this.state === 'connecting' || this.state === 'connected') return;
    if (!this.opts.WebSocket && !(globalThis as { WebSocket?: unknown }).WebSocket)
      throw new TetherError('closed', 'no WebSocket implementation here: pass options.WebSocket (in Node 20: the `ws` package)');
    clearTimeout(this.retryTimer);
    this.closedBy = undefined;
    void this.open();
  }

  /**
   * Closes the connection and stops reconnecting. Subscriptions, positions
   * and queued publications are kept: a later `connect()` resumes.
   */
  disconnect(): void {
    clearTimeout(this.retryTimer);
    if (this.state === 'idle' || this.state === 'closed') return;
    this.endConnection();
    this.setState('idle');
    this.emit('disconnected', { code: 1000, reason: 'client disconnect', reconnect: false });
  }

  /**
   * Reconnects at once, skipping any backoff wait; a live connection is
   * dropped and resumed. For network changes and app foregrounding.
   */
  reconnectNow(): void {
    if (this.state === 'waiting') this.connect();
    else if (this.state === 'connecting' || this.state === 'connected')
      this.lost(ABANDONED, 'reconnect requested', true);
  }

  /**
   * Subscribes to `channel`; `handler` gets every message once, in offset
   * order (per epoch). `T` is the type the app expects in `data` (not checked).
   */
  subscribe<T = Json>(channel: string, handler?: (message: Message<T>) => void, options: SubscribeOptions = {}): Subscription {
    if (this.subs.has(channel))
      throw new TetherError('already_subscribed', `already subscribed to ${channel}`, channel);
    const sub = new Subscription(this.host, channel, options.since);
    if (handler) sub.on('message', handler as (message: Message) => void);
    this.subs.set(channel, sub);
    if (this.state === 'connected') this.sendSubscribe(sub);
    return sub;
  }

  /** The subscription to `channel`, if any. */
  getSubscription(channel: string): Subscription | undefined {
    return this.subs.get(channel);
  }

  /** Every current subscription. */
  subscriptions(): Subscription[] {
    return [...this.subs.values()];
  }

  /**
   * Publishes `data` on `channel` (where the token allows it). Queued while
   * offline and sent once per connection until `published` arrives.
   */
  publish(channel: string, data: unknown, options: PublishOptions = {}): Promise<PublishResult> {
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') return reject(new TetherError('closed', 'client is closed', channel));
      if (this.queue.length >= (this.opts.maxQueuedPublishes ?? 100))
        return reject(new TetherError('queue_full', 'too many publications waiting', channel));
      const entry: QueuedPublish = {
        channel,
        data,
        key:
          options.idempotencyKey ??
          `${Date.now().toString(36)}-${(++keyCounter).toString(36)}-${Math.random().toString(36).slice(2, 10)}`,
        retry: options.retry ?? true,
        sentOn: 0,
        id: 0,
        resolve,
        reject,
      };
      const timeout = this.opts.publishTimeoutMs ?? 60_000;
      if (timeout > 0)
        entry.timer = setTimeout(
          () => this.settle(entry, new TetherError('timeout', 'publication not answered in time', channel)),
          timeout,
        );
      this.queue.push(entry);
      if (this.state === 'connected') this.sendPublish(entry);
    });
  }

  /** Publications waiting for their answer (queued or in flight). */
  get queuedPublishes(): number {
    return this.queue.length;
  }

  // ---- connection lifecycle ---------------------------------------------

  private setState(state: ClientState): void {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', state);
  }

  private async open(): Promise<void> {
    const gen = ++this.gen;
    this.setState('connecting');
    this.emit('connecting', { attempt: this.attempt });
    const { getToken } = this.opts;
    const exp = jwtExpiry(this.token);
    if (getToken && (this.token === undefined || this.needToken || (exp !== undefined && exp * 1000 <= Date.now()))) {
      try {
        const token = await getToken();
        if (!token) throw new Error('getToken returned no token');
        if (gen !== this.gen) return;
        this.token = token;
        this.needToken = false;
      } catch (e) {
        if (gen !== this.gen) return;
        this.emit('error', new TetherError('token', `getToken failed: ${(e as Error)?.message ?? e}`));
        this.retry(ABANDONED, 'getToken failed', 0);
        return;
      }
    }
    const Ctor = (this.opts.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket) as WebSocketConstructor;
    let ws: WebSocketLike;
    try {
      ws = new Ctor(this.url, [this.codec.subprotocol]);
    } catch (e) {
      this.retry(ABANDONED, `WebSocket failed: ${(e as Error)?.message ?? e}`, 0);
      return;
    }
    this.ws = ws;
    if (this.codec.binary) ws.binaryType = 'arraybuffer';
    this.connectTimer = setTimeout(() => this.lost(ABANDONED, 'connect timeout'), this.opts.connectTimeoutMs ?? 10_000);
    ws.onopen = () => gen === this.gen && this.sendConnect();
    ws.onmessage = (event: { data: unknown }) => {
      if (gen !== this.gen) return;
      let message: ServerMessage;
      try {
        message = this.codec.decode(event.data);
      } catch {
        this.emit('error', new TetherError('protocol', 'undecodable frame from the server'));
        return;
      }
      this.onFrame(message);
    };
    ws.onclose = (event: { code?: number; reason?: string }) =>
      gen === this.gen && this.lost(event.code ?? ABANDONED, event.reason || 'connection closed');
    ws.onerror = () => {};
  }

  private sendConnect(): void {
    this.connectId = ++this.nextId;
    const message: ClientMessage = {
      type: 'connect',
      id: this.connectId,
      client: this.opts.client ?? { name: '@tether/client', version: VERSION, platform: 'js' },
    };
    if (this.token !== undefined) message.token = this.token;
    if (this.opts.device !== undefined) message.device = this.opts.device;
    if (this.resumeToken !== undefined) {
      const channels: Record<string, number> = {};
      for (const sub of this.subs.values()) {
        const position = sub.position();
        if (position) channels[sub.channel] = position.offset;
      }
      message.resume = { token: this.resumeToken, channels };
    }
    this.send(message);
  }

  /**
   * Closes the socket (if any) and forgets everything tied to it. `hard`:
   * the connection is presumed dead, so `ws`'s `terminate()` is used where
   * it exists rather than waiting for a close handshake that cannot come.
   */
  private endConnection(hard = false): void {
    const ws = this.ws;
    this.gen++;
    this.ws = null;
    this.session = undefined;
    for (const timer of [this.connectTimer, this.livenessTimer, this.refreshTimer, this.ackTimer]) clearTimeout(timer);
    this.ackTimer = undefined;
    if (ws) {
      ws.onopen = ws.onmessage = null;
      ws.onclose = ws.onerror = () => {};
      try {
        const terminate = (ws as { terminate?: () => void }).terminate;
        if (hard && terminate) terminate.call(ws);
        else ws.close(1000);
      } catch {
        /* already closing */
      }
    }
    this.replies.clear();
    this.onServer.clear();
    for (const sub of this.subs.values()) if (sub.state === 'subscribed') sub.state = 'subscribing';
    for (const entry of [...this.queue]) {
      if (entry.sentOn === 0) continue;
      if (entry.retry) entry.sentOn = 0;
      else this.settle(entry, new TetherError('unknown_outcome', 'connection lost before the answer', entry.channel));
    }
  }

  /** The current connection ended (closed by the server, or given up by the SDK). */
  private lost(code: number, reason: string, immediate = false): void {
    const farewell = this.farewell;
    this.farewell = undefined;
    this.endConnection(code === ABANDONED);
    if (farewell) {
      code = Number(farewell.code ?? code);
      reason = farewell.reason ?? reason;
    }
    let reconnect = farewell?.reconnect ?? !NO_RECONNECT_CODES.includes(code);
    if (code === TOKEN_EXPIRED) {
      if (this.opts.getToken) this.needToken = true;
      else reconnect = false;
    }
    if (!reconnect) this.close(code, reason);
    else if (immediate) {
      this.emit('disconnected', { code, reason, reconnect: true, delayMs: 0 });
      void this.open();
    } else this.retry(code, reason, farewell?.retry_after_ms ?? 0);
  }

  private retry(code: number, reason: string, advisedMs: number): void {
    const delayMs = advisedMs + backoffDelay(this.attempt++, this.opts.backoff, this.opts.random);
    this.setState('waiting');
    this.emit('disconnected', { code, reason, reconnect: true, delayMs });
    this.retryTimer = setTimeout(() => this.open(), delayMs);
  }

  /** Ends the client for good (a close code that says not to reconnect). */
  private close(code: number, reason: string): void {
    this.endConnection();
    const event = { code, reason, reconnect: false };
    this.closedBy = event;
    this.setState('closed');
    for (const entry of [...this.queue]) this.settle(entry, new TetherError('closed', `client closed: ${reason}`, entry.channel));
    this.emit('disconnected', event);
  }

  private send(message: ClientMessage): void {
    const ws = this.ws;
    if (ws && ws.readyState === OPEN) {
      try {
        ws.send(this.codec.encode(message));
      } catch {
        /* the close event follows */
      }
    }
  }

  private request(message: ClientMessage, reply: Reply): void {
    const id = ++this.nextId;
    this.replies.set(id, reply);
    this.send({ ...message, id });
  }

  private alive(): void {
    clearTimeout(this.livenessTimer);
    const beat = this.heartbeat * 1000;
    const timeout = this.opts.livenessTimeoutMs ?? Math.max(beat * 1.5, beat + 5000);
    this.livenessTimer = setTimeout(() => this.lost(ABANDONED, 'liveness timeout'), timeout);
  }

  // ---- incoming ---------------------------------------------------------

  private onFrame(m: ServerMessage): void {
    if (this.state === 'connected') this.alive();
    switch (m.type) {
      case 'connected':
        if (m.id === this.connectId) this.onConnected(m);
        return;
      case 'ping':
        this.send({ type: 'pong' });
        return;
      case 'message': {
        const sub = this.subs.get(m.channel as string);
        if (sub)
          sub._deliver({
            channel: m.channel as string,
            epoch: m.epoch as string,
            offset: m.offset as number,
            data: m.data as Json,
            ts: m.ts as number,
          });
        return;
      }
      case 'disconnect':
        this.farewell = m;
        return;
      case 'unsubscribed':
        if (m.id === undefined) {
          this.onServer.delete(m.channel as string);
          const sub = this.subs.get(m.channel as string);
          if (sub) this.dropSubscription(sub, m.reason ?? 'server', false);
          return;
        }
    }
    if (m.id !== undefined) {
      const reply = this.replies.get(m.id);
      this.replies.delete(m.id);
      reply?.(m);
    } else if (m.type === 'error') this.emit('error', serverError(m));
  }

  private onConnected(m: ServerMessage): void {
    clearTimeout(this.connectTimer);
    this.attempt = 0;
    this.session = m.session;
    this.resumeToken = m.resume_token;
    this.heartbeat = m.heartbeat ?? 25;
    this.setState('connected');
    this.alive();
    const restored = (m.resumed && m.channels) || {};
    for (const channel of Object.keys(restored)) {
      const sub = this.subs.get(channel);
      if (!sub) {
        this.request({ type: 'unsubscribe', channel }, () => {});
        continue;
      }
      const info = restored[channel] as { epoch: string; offset: number; recovered: boolean };
      this.onServer.add(channel);
      sub._subscribed(info.epoch, info.offset, info.recovered);
      this.emit('subscribed', { channel, ...info });
    }
    for (const sub of this.subs.values()) if (!this.onServer.has(sub.channel)) this.sendSubscribe(sub);
    for (const entry of this.queue) if (entry.sentOn === 0) this.sendPublish(entry);
    this.flushAcks();
    this.scheduleRefresh(undefined);
    this.emit('connected', {
      session: m.session as string,
      resumed: !!m.resumed,
      node: m.node as string,
      heartbeat: this.heartbeat,
    });
  }

  // ---- subscriptions ----------------------------------------------------

  private sendSubscribe(sub: Subscription): void {
    this.onServer.add(sub.channel);
    const message: ClientMessage = { type: 'subscribe', channel: sub.channel };
    const since = sub.position();
    if (since) message.since = since;
    this.request(message, (reply) => {
      if (this.subs.get(sub.channel) !== sub) return;
      if (reply.type === 'subscribed') {
        const event = {
          channel: sub.channel,
          epoch: reply.epoch as string,
          offset: reply.offset as number,
          recovered: !!reply.recovered,
        };
        sub._subscribed(event.epoch, event.offset, event.recovered);
        this.emit('subscribed', event);
      } else {
        this.onServer.delete(sub.channel);
        this.subs.delete(sub.channel);
        const error = serverError(reply, sub.channel);
        sub._failed(error);
        this.emit('error', error);
      }
    });
  }

  private dropSubscription(sub: Subscription, reason: string, tellServer: boolean): void {
    if (this.subs.get(sub.channel) !== sub) return;
    this.subs.delete(sub.channel);
    if (tellServer && this.onServer.delete(sub.channel)) this.request({ type: 'unsubscribe', channel: sub.channel }, () => {});
    sub._ended(reason);
    this.emit('unsubscribed', { channel: sub.channel, reason });
  }

  private flushAcks(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    if (this.state !== 'connected') return;
    for (const sub of this.subs.values()) {
      if (sub.state === 'subscribed' && sub.ackable > sub.acked) {
        sub.acked = sub.ackable;
        this.send({ type: 'ack', channel: sub.channel, offset: sub.acked });
      }
    }
  }

  // ---- publications -----------------------------------------------------

  private sendPublish(entry: QueuedPublish): void {
    entry.sentOn = this.gen;
    entry.id = ++this.nextId;
    this.replies.set(entry.id, (reply) => {
      if (reply.type === 'published')
        this.settle(entry, {
          channel: reply.channel as string,
          epoch: reply.epoch as string,
          offset: reply.offset as number,
        });
      else this.settle(entry, serverError(reply, entry.channel));
    });
    this.send({ type: 'publish', id: entry.id, channel: entry.channel, data: entry.data, idempotency_key: entry.key });
  }

  private settle(entry: QueuedPublish, outcome: PublishResult | TetherError): void {
    const i = this.queue.indexOf(entry);
    if (i < 0) return;
    this.queue.splice(i, 1);
    clearTimeout(entry.timer);
    if (entry.sentOn === this.gen) this.replies.delete(entry.id);
    if (outcome instanceof TetherError) entry.reject(outcome);
    else entry.resolve(outcome);
  }

  // ---- token refresh ----------------------------------------------------

  private scheduleRefresh(expires: number | undefined): void {
    clearTimeout(this.refreshTimer);
    const exp = expires ?? jwtExpiry(this.token);
    if (!this.opts.getToken || exp === undefined) return;
    const remaining = exp * 1000 - Date.now();
    const delay = Math.max(0, remaining - Math.min(this.opts.refreshMarginMs ?? 30_000, remaining / 2));
    const gen = this.gen;
    this.refreshTimer = setTimeout(() => gen === this.gen && this.refresh(), delay);
  }

  private async refresh(): Promise<void> {
    const gen = this.gen;
    const again = () => {
      if (gen === this.gen) this.refreshTimer = setTimeout(() => gen === this.gen && this.refresh(), 5000);
    };
    let token: string;
    try {
      token = await (this.opts.getToken as () => string | Promise<string>)();
      if (!token) throw new Error('getToken returned no token');
    } catch (e) {
      this.emit('error', new TetherError('token', `getToken failed: ${(e as Error)?.message ?? e}`));
      return again();
    }
    if (gen !== this.gen) return;
    this.request({ type: 'refresh', token }, (reply) => {
      if (reply.type === 'refreshed') {
        this.token = token;
        this.emit('refreshed', { expires: reply.expires as number });
        this.scheduleRefresh(reply.expires);
      } else {
        this.emit('error', serverError(reply));
        again();
      }
    });
  }

  // ---- listener errors --------------------------------------------------

  protected override onThrow(error: unknown, event: string): void {
    if (event === 'error') super.onThrow(error, event);
    else this.listenerThrew(error, `client ${event} listener`);
  }

  private listenerThrew(error: unknown, where: string): void {
    const e = new TetherError('handler', `${where} threw: ${(error as Error)?.message ?? error}`);
    (e as { cause?: unknown }).cause = error;
    this.emit('error', e);
  }
}
