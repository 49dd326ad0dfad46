// Starts a real `broker` process on free loopback ports, the way the Rust
// harness does (tests/src/lib.rs, TestBroker): port 0 everywhere, the bound
// addresses read from the log lines, ready when ` ready` is logged. No fixed
// ports, no sleeps.
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../../../..');

/** `$TETHER_BROKER_BIN`, else the workspace's debug build. */
export function brokerBin() {
  const bin = process.env.TETHER_BROKER_BIN || join(repo, 'target', 'debug', 'broker');
  if (!existsSync(bin)) throw new Error(`broker binary not found at ${bin} (build it, or set TETHER_BROKER_BIN)`);
  return bin;
}

const running = new Set();
process.on('exit', () => {
  for (const b of running) b.kill();
});

export class Broker {
  /** Starts a broker with `args` after the test defaults, on a fresh data dir. */
  static async start(args = [], { dataDir } = {}) {
    const b = new Broker();
    b.ownDir = !dataDir;
    b.dataDir = dataDir ?? mkdtempSync(join(tmpdir(), 'tether-sdk-'));
    b.log = [];
    b.child = spawn(
      brokerBin(),
      ['--client-addr', '127.0.0.1:0', '--api-addr', '127.0.0.1:0', '--quic-addr', 'off', '--node-id', 'test-node', '--data-dir', b.dataDir, ...args],
      { env: { ...process.env, TETHER_LOG: 'info', RUST_LOG: '' }, stdio: ['ignore', 'ignore', 'pipe'] },
    );
    running.add(b);
    b.exited = new Promise((res) => b.child.on('exit', (code, signal) => res({ code, signal })));
    const lines = createInterface({ input: b.child.stderr });
    await new Promise((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`broker not ready in 30 s; log:\n${b.log.join('\n')}`)), 30_000);
      b.child.on('exit', () => rej(new Error(`broker exited early; log:\n${b.log.join('\n')}`)));
      lines.on('line', (line) => {
        b.log.push(line);
        if (process.env.TETHER_TEST_LOG) console.error('[broker]', line);
        if (line.includes('listening')) {
          const addr = /addr="?([0-9.:\[\]]+)/.exec(line)?.[1];
          if (line.includes('listener="client"')) b.clientAddr = addr;
          if (line.includes('listener="api"')) b.apiAddr = addr;
        }
        if (line.includes(' ready')) {
          clearTimeout(timer);
          if (!b.clientAddr || !b.apiAddr) rej(new Error(`no listening addresses logged:\n${b.log.join('\n')}`));
          else res();
        }
      });
    });
    return b;
  }

  get wsUrl() {
    return `ws://${this.clientAddr}/v1/ws`;
  }

  api(path) {
    return `http://${this.apiAddr}${path}`;
  }

  /** `POST /v1/publish`; returns the JSON answer, throws on a non-200. */
  async publish(channel, data, extra = {}) {
    const r = await fetch(this.api('/v1/publish'), {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(this.apiKey ? { authorization: `Bearer ${this.apiKey}` } : {}) },
      body: JSON.stringify({ channel, data, ...extra }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`publish: ${r.status} ${JSON.stringify(body)}`);
    return body;
  }

  async history(channel, query = '') {
    const r = await fetch(this.api(`/v1/channels/${encodeURIComponent(channel)}/history${query}`));
    return r.json();
  }

  /** SIGTERM; resolves with the exit status. */
  async terminate() {
    this.child.kill('SIGTERM');
    const status = await this.exited;
    this.cleanup();
    return status;
  }

  kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
    this.cleanup();
  }

  async stop() {
    this.kill();
    await this.exited;
  }

  cleanup() {
    running.delete(this);
    if (this.ownDir) rmSync(this.dataDir, { recursive: true, force: true });
  }
}
