/**
 * `@tether/client/msgpack`: the `tether.v1.msgpack` codec (one MessagePack
 * map per binary frame, §2), built on the optional peer dependency
 * `@msgpack/msgpack`. Pass it as `codec` to `TetherClient`.
 */
import { decode, encode } from '@msgpack/msgpack';
import type { Codec } from './codec.js';
import type { ServerMessage } from './protocol.js';

export const msgpackCodec: Codec = {
  subprotocol: 'tether.v1.msgpack',
  binary: true,
  encode: (message) => encode(message),
  decode: (frame) => {
    if (typeof frame === 'string') throw new Error('text frame on a MessagePack connection');
    const bytes = frame instanceof ArrayBuffer ? new Uint8Array(frame) : (frame as Uint8Array);
    return decode(bytes) as ServerMessage;
  },
};
