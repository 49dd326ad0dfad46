/** The one error type the SDK rejects with and emits. */
import type { ServerErrorCode } from './protocol.js';

/**
 * Codes of the SDK's own, besides the server's (`forbidden`, ...):
 * - `closed`: the client was closed for good (`close()`, or a close code that says no).
 * - `timeout`: a request got no answer in time.
 * - `queue_full`: the offline publish queue is full.
 * - `unknown_outcome`: a publish with `retry: false` was sent, and the connection died before its answer.
 * - `token`: `getToken()` failed or returned nothing.
 * - `already_subscribed`: `subscribe` to a channel this client already has.
 * - `protocol`: the server sent something the SDK cannot read.
 * - `handler`: one of the app's listeners threw (the error is in `cause`).
 */
export type ErrorCode =
  | ServerErrorCode
  | 'closed'
  | 'timeout'
  | 'queue_full'
  | 'unknown_outcome'
  | 'token'
  | 'already_subscribed'
  | 'protocol'
  | 'handler';

export class TetherError extends Error {
  readonly code: ErrorCode;
  /** The channel concerned, if any. */
  readonly channel?: string;

  constructor(code: ErrorCode, message: string, channel?: string) {
    super(message);
    this.name = 'TetherError';
    this.code = code;
    if (channel !== undefined) this.channel = channel;
  }
}
