// An in-memory ciar cloud for the tests: a WebSocket look-alike class whose peer is a small server written with
// protocol.js (Hello -> Welcome, Open -> Opened, Verify -> Verdict by a policy, Close), with failure switches.
import { decode, encode, ErrorCode, makeLimits } from '../protocol.js';

export const SERVER_LIMITS = makeLimits({ max_num_tokens: 256, vocab_size: 1024, feature_dim: 267, max_q_support: 1024 });

export class FakeCloud {
  /** policy(verify) -> {n_accepted, next_token}; options: refuse (no connection), unauthorized, busyOnce,
   * dropAfter (close the connection on that many Verify), prefix(m) -> tokens. */
  constructor(policy, options = {}) {
    this.policy = policy;
    this.options = options;
    this.received = [];
    this.frontier = 0;
    this.session = 0xfedcba9876543210n; // > 2^53: must travel as a BigInt
    this.verifies = 0;
    this.busySent = false;
  }

  reply(message) { return encode(message); }

  /** One frame in; the frames to send back, or 'close'. */
  handle(frame) {
    const m = decode(frame, SERVER_LIMITS);
    this.received.push(m);
    const o = this.options;
    switch (m.type) {
      case 'Hello':
        if (o.unauthorized) return [this.reply({ type: 'Error', code: ErrorCode.UNAUTHORIZED, text: 'bad token' }), 'close'];
        return [this.reply({ type: 'Welcome', limits: SERVER_LIMITS, idle_timeout_ms: 30000, model: 'fake-cloud' })];
      case 'Open': {
        const tokens = Array.from({ length: m.prefix_tokens }, (_, i) => (o.prefix ? o.prefix(i) : (100 + i) % 1024));
        this.frontier = m.prefix_tokens;
        this.total = m.num_tokens;
        return [this.reply({ type: 'Opened', session: this.session, tokens })];
      }
      case 'Verify': {
        if (o.busyOnce && !this.busySent) {
          this.busySent = true;
          return [this.reply({ type: 'Error', code: ErrorCode.BUSY, text: 'busy', session: m.session, seq: m.seq })];
        }
        this.verifies++;
        if (o.dropAfter && this.verifies > o.dropAfter) return ['close'];
        if (m.start !== this.frontier) {
          return [this.reply({ type: 'Error', code: ErrorCode.BAD_POSITION, text: `start ${m.start} != ${this.frontier}`, session: m.session, seq: m.seq })];
        }
        const v = this.policy(m);
        const end = m.start + m.tokens.length + v.n_accepted;
        const next = end < this.total ? v.next_token : null;
        this.frontier = end + (next == null ? 0 : 1);
        return [this.reply({ type: 'Verdict', session: m.session, seq: m.seq, n_accepted: v.n_accepted, next_token: next })];
      }
      default:
        return [];
    }
  }

  /** A WebSocket class connected to this server. */
  socketClass() {
    const server = this;
    return class FakeWebSocket {
      constructor(url) {
        this.url = url;
        this.closed = false;
        setTimeout(() => (server.options.refuse ? this.onerror?.({}) : this.onopen?.({})), 0);
      }
      send(frame) {
        const copy = Uint8Array.from(frame);
        setTimeout(() => {
          if (this.closed) return;
          for (const out of server.handle(copy)) {
            if (out === 'close') this.close(1011, 'server closed');
            else this.onmessage?.({ data: out.buffer.slice(out.byteOffset, out.byteOffset + out.byteLength) });
          }
        }, 0);
      }
      close(code = 1000, reason = '') { // frames sent before close() still arrive, as over a real socket
        if (this.closing) return;
        this.closing = true;
        setTimeout(() => { this.closed = true; this.onclose?.({ code, reason }); }, 0);
      }
    };
  }
}
