// Type-checked (not run): a CommonJS app (require) sees the same types.
import tether = require('@tether/client');
import rn = require('@tether/client/react-native');

const c = new tether.TetherClient('ws://127.0.0.1:1/v1/ws');
c.on('connected', (e) => e.session.length);
const off: () => void = rn.attachNetInfo(c, { addEventListener: () => () => {} });
off();
