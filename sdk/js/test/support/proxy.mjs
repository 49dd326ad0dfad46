// A TCP proxy on loopback between a client and the broker, so a test can
// break the network under a real client (Node or browser): `cut()` resets
// every connection (an abrupt drop), `freeze()` stops moving bytes in both
// directions without closing anything (a network that died silently), and
// `target` can point at another broker (a restart behind the same URL).
import net from 'node:net';

export class Proxy {
  static async start(target) {
    const p = new Proxy();
    p.target = target;
    p.pairs = new Set();
    p.connections = 0;
    p.server = net.createServer((client) => p.accept(client));
    await new Promise((res) => p.server.listen(0, '127.0.0.1', res));
    p.addr = `127.0.0.1:${p.server.address().port}`;
    return p;
  }

  get wsUrl() {
    return `ws://${this.addr}/v1/ws`;
  }

  accept(client) {
    this.connections++;
    if (this.refusing) {
      client.destroy();
      return;
    }
    const [host, port] = [this.target.slice(0, this.target.lastIndexOf(':')), Number(this.target.slice(this.target.lastIndexOf(':') + 1))];
    const upstream = net.connect(port, host);
    const pair = { client, upstream, frozen: false };
    this.pairs.add(pair);
    const end = () => {
      this.pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    for (const [from, to] of [[client, upstream], [upstream, client]]) {
      from.on('data', (chunk) => {
        if (!pair.frozen) to.write(chunk);
      });
      from.on('error', end);
      from.on('close', () => !pair.frozen && end());
    }
  }

  /** Resets every current connection, as a dropped network does. */
  cut() {
    for (const pair of this.pairs) {
      pair.client.resetAndDestroy?.() ?? pair.client.destroy();
      pair.upstream.destroy();
    }
    this.pairs.clear();
  }

  /** While true, new connections are closed at once (the network is down). */
  refuse(on = true) {
    this.refusing = on;
  }

  /** Current connections stop carrying bytes either way; nothing is closed. */
  freeze() {
    for (const pair of this.pairs) {
      pair.frozen = true;
      pair.client.pause();
      pair.upstream.pause();
    }
  }

  async close() {
    for (const pair of this.pairs) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    await new Promise((res) => this.server.close(res));
  }
}
