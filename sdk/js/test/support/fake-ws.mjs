// A fake WebSocket for unit tests: records what the client sends and lets
// the test play the server. Every instance is kept in FakeWebSocket.all.
export class FakeWebSocket {
  static all = [];
  static reset() {
    FakeWebSocket.all = [];
  }
  static get last() {
    return FakeWebSocket.all[FakeWebSocket.all.length - 1];
  }

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 0;
    this.binaryType = 'blob';
    this.sent = [];
    this.closedByClient = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeWebSocket.all.push(this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(JSON.parse(data));
  }

  close(code) {
    this.closedByClient = code ?? 1005;
    this.readyState = 3;
  }

  // ---- the test plays the server ----
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  /** Opens and answers `connect` with `connected`. */
  accept(fields = {}) {
    this.open();
    const connect = this.sent.find((m) => m.type === 'connect');
    this.receive({ type: 'connected', id: connect.id, session: 's1', resume_token: 'rt1', heartbeat: 25, resumed: false, node: 'n1', ...fields });
    return connect;
  }
  ofType(type) {
    return this.sent.filter((m) => m.type === type);
  }
  lastOfType(type) {
    const all = this.ofType(type);
    return all[all.length - 1];
  }
}
