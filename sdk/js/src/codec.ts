/**
 * Codecs turn protocol messages into WebSocket frames and back (§2). The
 * JSON codec is built in; MessagePack lives in the separate entry point
 * `@tether/client/msgpack` so the core carries no dependency.
 */
import type { ClientMessage, ServerMessage } from './protocol.js';

/** How messages are framed on the WebSocket. */
export interface Codec {
  /** The subprotocol offered on the upgrade, e.g. `tether.v1.json`. */
  readonly subprotocol: string;
  /** Binary frames (`binaryType = 'arraybuffer'`) rather than text frames. */
  readonly binary: boolean;
  encode(message: ClientMessage): string | Uint8Array;
  decode(frame: unknown): ServerMessage;
}

/** `tether.v1.json`: one JSON object per text frame. */
export const jsonCodec: Codec = {
  subprotocol: 'tether.v1.json',
  binary: false,
  encode: (message) => JSON.stringify(message),
  decode: (frame) =>
    JSON.parse(typeof frame === 'string' ? frame : new TextDecoder().decode(frame as ArrayBuffer)),
};
