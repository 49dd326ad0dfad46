/**
 * The wire messages of Tether protocol v1 (PROTOCOL.md §3, §4) as
 * TypeScript types, and the close codes of §8. Types only, plus one small
 * table: no I/O.
 */

/** Any JSON value (what `data` may be). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a channel: offsets compare only within one epoch. */
export interface Position {
  epoch: string;
  offset: number;
}

/** Error codes of §4 (`error.code`), plus the SDK's own (see {@link TetherError}). */
export type ServerErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'conflict'
  | 'too_large'
  | 'rate_limited'
  | 'unavailable'
  | 'internal';

/** A message from the server, decoded. Unknown fields are kept but untyped. */
export interface ServerMessage {
  type: string;
  id?: number;
  channel?: string;
  epoch?: string;
  offset?: number;
  data?: Json;
  ts?: number;
  recovered?: boolean;
  // connected
  session?: string;
  resume_token?: string;
  heartbeat?: number;
  resumed?: boolean;
  channels?: Record<string, { epoch: string; offset: number; recovered: boolean }>;
  node?: string;
  // refreshed
  expires?: number;
  // error / disconnect / unsubscribed
  code?: string | number;
  message?: string;
  reason?: string;
  reconnect?: boolean;
  retry_after_ms?: number;
}

/** A message to the server. */
export type ClientMessage = { type: string; [field: string]: unknown };

/**
 * Close codes (§8) after which a client must not reconnect on its own:
 * 4001 protocol error, 4003 bad or missing token, 4009 message too large.
 * 4011 (token expired) reconnects only with a new token from `getToken`.
 */
export const NO_RECONNECT_CODES: readonly number[] = [4001, 4003, 4009];

/** Close code 4011: the token expired. */
export const TOKEN_EXPIRED = 4011;
