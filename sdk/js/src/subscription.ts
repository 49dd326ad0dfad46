/**
 * One channel subscription: its handlers, and the position (epoch, last
 * delivered offset) that makes delivery exactly-once and in order within an
 * epoch. The client owns the connection; a subscription only decides what
 * to deliver and when the app must reload (`discontinuity`).
 */
import { Emitter } from './emitter.js';
import type { TetherError } from './errors.js';
import type { Json, Position } from './protocol.js';

/** A publication delivered to the app; `T` is what the app says `data` holds. */
export interface Message<T = Json> {
  channel: string;
  epoch: string;
  offset: number;
  data: T;
  /** Unix milliseconds when it was published. */
  ts: number;
}

/**
 * The app's copy of a channel can no longer be trusted: reload it from your
 * backend, then carry on with the messages that follow.
 * - `not_recovered`: the server could not replay from where this client was
 *   (history too short, resume window passed, or the epoch changed).
 * - `epoch_changed`: a message arrived in a new epoch (the channel's history was lost).
 * - `gap`: offsets jumped (should not happen while the server says `recovered`).
 */
export interface Discontinuity {
  channel: string;
  reason: 'not_recovered' | 'epoch_changed' | 'gap';
  /** Where this client was, if it knew. */
  previous?: Position | undefined;
  /** Where the channel is now: messages after `offset` follow. */
  position: { epoch: string; offset: number };
}

export interface SubscribedEvent {
  channel: string;
  epoch: string;
  /** The channel's latest offset on the server. */
  offset: number;
  /** True when the server replays everything after this client's position. */
  recovered: boolean;
}

export interface UnsubscribedEvent {
  channel: string;
  /** `client` when the app unsubscribed; otherwise the server's reason. */
  reason: string;
}

export interface SubscriptionEvents {
  message: Message;
  subscribed: SubscribedEvent;
  unsubscribed: UnsubscribedEvent;
  discontinuity: Discontinuity;
  error: TetherError;
}

/** What a subscription needs from its client. */
export interface SubscriptionHost {
  unsubscribe(sub: Subscription): void;
  ack(sub: Subscription): void;
  delivered(sub: Subscription, message: Message): void;
  discontinuity(event: Discontinuity): void;
  listenerThrew(error: unknown, where: string): void;
}

export type SubscriptionState = 'subscribing' | 'subscribed' | 'unsubscribed';

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  /** `subscribing` until the server confirms (and again while offline). */
  state: SubscriptionState = 'subscribing';
  /** The epoch of the last delivered message (or of the last `subscribed`). */
  epoch: string | undefined;
  /** The offset of the last message delivered to the app. */
  offset: number | undefined;
  /** Highest offset that may be acked (delivered, or named by `ack()` in manual mode). */
  ackable = 0;
  /** Highest offset acked in this epoch. */
  acked = 0;
  private readonly host: SubscriptionHost;

  constructor(host: SubscriptionHost, channel: string, since?: Position) {
    super();
    this.host = host;
    this.channel = channel;
    if (since) {
      this.epoch = since.epoch;
      this.offset = since.offset;
    }
  }

  /** The last delivered position, when the epoch and an offset are known. */
  position(): Position | undefined {
    return this.epoch !== undefined && this.offset !== undefined
      ? { epoch: this.epoch, offset: this.offset }
      : undefined;
  }

  /** Stops the subscription; no message is delivered after this call. */
  unsubscribe(): void {
    this.host.unsubscribe(this);
  }

  /**
   * Acks every message up to `offset` (default: the last delivered). Only
   * needed with `ack: 'manual'`; cumulative, sent at once when connected.
   */
  ack(offset: number | undefined = this.offset): void {
    if (offset !== undefined && offset > this.ackable) this.ackable = offset;
    this.host.ack(this);
  }

  protected override onThrow(error: unknown, event: string): void {
    this.host.listenerThrew(error, `subscription ${this.channel} ${event} listener`);
  }

  /** @internal The server confirmed (subscribed, or restored by a resume). */
  _subscribed(epoch: string, offset: number, recovered: boolean): void {
    const previous = this.position();
    this.state = 'subscribed';
    if (!recovered) {
      this.reset(epoch, offset);
      if (previous) this.discontinuity('not_recovered', previous);
    } else if (this.epoch === undefined || this.epoch !== epoch) {
      // Recovered without a position of ours (restored by a resume before
      // the first `subscribed` came): take whatever is replayed.
      this.reset(epoch, undefined);
    }
    this.emit('subscribed', { channel: this.channel, epoch, offset, recovered });
  }

  /** @internal A `message` for this channel: delivered at most once, in order. */
  _deliver(message: Message): void {
    if (this.state === 'unsubscribed') return;
    if (this.epoch !== undefined && message.epoch !== this.epoch) {
      const previous = this.position();
      this.reset(message.epoch, message.offset - 1);
      this.discontinuity('epoch_changed', previous);
    } else if (this.offset !== undefined) {
      if (message.offset <= this.offset) return; // already delivered
      if (message.offset > this.offset + 1) {
        const previous = this.position();
        this.offset = message.offset - 1;
        this.discontinuity('gap', previous);
      }
    }
    this.epoch = message.epoch;
    this.offset = message.offset;
    this.emit('message', message);
    this.host.delivered(this, message);
  }

  /** @internal Ended by the app or the server. */
  _ended(reason: string): void {
    if (this.state === 'unsubscribed') return;
    this.state = 'unsubscribed';
    this.emit('unsubscribed', { channel: this.channel, reason });
  }

  /** @internal */
  _failed(error: TetherError): void {
    this.state = 'unsubscribed';
    this.emit('error', error);
  }

  /** @internal */
  _emitError(error: TetherError): void {
    this.emit('error', error);
  }

  private reset(epoch: string, offset: number | undefined): void {
    this.epoch = epoch;
    this.offset = offset;
    this.ackable = this.acked = 0;
  }

  private discontinuity(reason: Discontinuity['reason'], previous: Position | undefined): void {
    const event: Discontinuity = {
      channel: this.channel,
      reason,
      previous,
      position: { epoch: this.epoch as string, offset: this.offset ?? 0 },
    };
    this.emit('discontinuity', event);
    this.host.discontinuity(event);
  }
}
