// What the device loop asks of the cloud (runtime/verifier.py): open(params) -> prefix tokens, verify(...) ->
// {n_accepted, next_token, verified}, close(). LocalVerifier is the offline stand-in; CloudClient speaks the ciar
// wire protocol over a browser WebSocket (binaryType "arraybuffer", one frame per message) and falls back to
// device-only (drafts kept, counted as unverified) on any error or when there is no cloud.
import {
  decode, encode, ERROR_NAMES, isRetryable, makeLimits, ProtocolError, validateMessage,
} from './protocol.js';

const UNVERIFIED = Object.freeze({ n_accepted: 1, next_token: null, verified: false });

/** Offline: no prefix; every draft the gate would send is kept as drafted and reported unverified. */
export class LocalVerifier {
  async open() { return []; }
  async verify() { return UNVERIFIED; }
  async close() {}
}

class CloudError extends Error {
  constructor(message, code = null) { super(message); this.name = 'CloudError'; this.code = code; }
}

export class CloudClient {
  /**
   * url: ws:// or wss:// address of `ciar serve`. options: authToken (bearer), client (name sent in Hello),
   * featureDim (the bundle's interval feature columns: sent when the server's Welcome announces the same F),
   * WebSocket (constructor; default the global one), timeoutMs per reply, retries for BUSY / RATE_LIMITED /
   * TIMEOUT, onEvent(text) for a log.
   */
  constructor(url, options = {}) {
    this.url = url;
    this.authToken = options.authToken ?? '';
    this.clientName = options.client ?? 'ciar-web/0.1';
    this.featureDim = options.featureDim ?? 0;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.timeoutMs = options.timeoutMs ?? 15000;
    this.retries = options.retries ?? 2;
    this.onEvent = options.onEvent ?? (() => {});
    this.state = 'idle'; // idle -> online -> closed, or offline (with this.reason) after any failure
    this.reason = '';
    this.limits = makeLimits(); // what we accept before Welcome; then the server's own
    this.stats = { framesUp: 0, framesDown: 0, bytesUp: 0, bytesDown: 0, verifies: 0 };
    this.inbox = [];
    this.waiting = null;
  }

  /** WebSocket + Hello -> Welcome. Throws CloudError. */
  async connect() {
    if (!this.WebSocket) throw new CloudError('no WebSocket in this runtime');
    const ws = new this.WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.inbox = [];
    this.limits = makeLimits();
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new CloudError(`no connection to ${this.url} in ${this.timeoutMs} ms`)), this.timeoutMs);
      ws.onopen = () => { clearTimeout(timer); resolve(); };
      ws.onerror = () => { clearTimeout(timer); reject(new CloudError(`cannot connect to ${this.url}`)); };
    });
    const mine = (fn) => (ev) => { if (this.ws === ws) fn(ev); }; // ignore a previous connection's events
    ws.onmessage = mine((ev) => this.deliver(ev.data));
    ws.onclose = mine((ev) => this.deliver(new CloudError(`connection closed (${ev.code ?? ''} ${ev.reason ?? ''})`.trim())));
    ws.onerror = mine(() => this.deliver(new CloudError('connection error')));
    const welcome = await this.request({ type: 'Hello', auth_token: this.authToken, client: this.clientName }, 'Welcome');
    this.limits = welcome.limits;
    this.model = welcome.model;
    this.state = 'online';
    this.onEvent(`connected to ${this.url}: model ${welcome.model || '?'}, feature_dim ${welcome.limits.feature_dim}`);
    return welcome;
  }

  deliver(item) {
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w(item);
    } else {
      this.inbox.push(item);
    }
  }

  nextItem() {
    if (this.inbox.length) return Promise.resolve(this.inbox.shift());
    return new Promise((resolve) => {
      const timer = setTimeout(() => { this.waiting = null; resolve(new CloudError(`no reply in ${this.timeoutMs} ms`)); }, this.timeoutMs);
      this.waiting = (item) => { clearTimeout(timer); resolve(item); };
    });
  }

  send(message) {
    const frame = encode(message);
    this.ws.send(frame);
    this.stats.framesUp++;
    this.stats.bytesUp += frame.length;
  }

  /** Send one request and wait for its answer of type `expect`; an Error frame becomes a CloudError. */
  async request(message, expect) {
    this.send(message);
    const item = await this.nextItem();
    if (item instanceof Error) throw item;
    if (typeof item === 'string') throw new CloudError('the server sent a text message (BAD_FRAME)');
    this.stats.framesDown++;
    this.stats.bytesDown += item.byteLength;
    const reply = decode(item, this.limits);
    if (reply.type === 'Error') throw new CloudError(`${ERROR_NAMES[reply.code]}: ${reply.text}`, reply.code);
    if (reply.type !== expect) throw new CloudError(`expected ${expect}, got ${reply.type}`);
    return reply;
  }

  goOffline(error) {
    if (this.state !== 'offline') this.onEvent(`cloud unavailable, device only from here: ${error.message}`);
    this.state = 'offline';
    this.reason = error.message;
    try { this.ws?.close(); } catch { /* already closed */ }
  }

  /** Start a session (connecting first if needed); returns the prefix tokens the cloud wrote ([] if offline). */
  async open(params) {
    try {
      if (this.state === 'idle' || this.state === 'closed') await this.connect();
      if (this.state !== 'online') return [];
      this.useFeatures = this.featureDim > 0 && this.limits.feature_dim === this.featureDim;
      const open = validateMessage({ type: 'Open', ...params, seed: BigInt.asUintN(64, BigInt(params.seed)),
        use_interval_features: this.useFeatures }, this.limits);
      const opened = await this.request(open, 'Opened');
      if (opened.tokens.length !== params.prefix_tokens) {
        throw new CloudError(`Opened carries ${opened.tokens.length} prefix tokens, asked for ${params.prefix_tokens}`);
      }
      this.session = opened.session;
      this.seq = 0;
      return Array.from(opened.tokens);
    } catch (e) {
      this.goOffline(e);
      return [];
    }
  }

  /** Accepted tokens since the last sync (positions start..), their feature rows, then one draft with its q. */
  async verify(start, tokens, featureRows, draft, qIds, qProbs, draftFeatures) {
    if (this.state !== 'online' || this.session == null) return UNVERIFIED;
    try {
      const features = this.useFeatures ? [...featureRows, draftFeatures] : null;
      const message = validateMessage({ type: 'Verify', session: this.session, seq: this.seq + 1, start,
        tokens: Array.from(tokens), drafts: [draft], q: [{ ids: qIds, probs: qProbs.map((p) => Math.max(p, 2 ** -24)) }],
        features }, this.limits);
      let verdict;
      for (let attempt = 0; ; attempt++) {
        try {
          verdict = await this.request(message, 'Verdict');
          break;
        } catch (e) {
          if (!(e instanceof CloudError) || !isRetryable(e.code) || attempt >= this.retries) throw e;
          await new Promise((r) => setTimeout(r, 100 * 2 ** attempt)); // the seq was not consumed: resend it
        }
      }
      if (verdict.session !== this.session || verdict.seq !== message.seq) {
        throw new CloudError(`Verdict for session ${verdict.session} seq ${verdict.seq}, expected ${this.session} seq ${message.seq}`);
      }
      if (verdict.n_accepted > 1 || (verdict.n_accepted === 0 && verdict.next_token == null)) {
        throw new CloudError(`Verdict a=${verdict.n_accepted} next=${verdict.next_token} does not answer one draft`);
      }
      this.seq = message.seq;
      this.stats.verifies++;
      return { n_accepted: verdict.n_accepted, next_token: verdict.next_token, verified: true };
    } catch (e) {
      this.goOffline(e instanceof ProtocolError ? new CloudError(`protocol: ${e.message}`) : e);
      return UNVERIFIED;
    }
  }

  /** Close the session and the connection (no reply is expected). */
  async close() {
    if (this.state === 'online') {
      try {
        if (this.session != null) this.send({ type: 'Close', session: this.session, reason: 'done' });
        this.ws.close();
        this.ws = null;
      } catch { /* closing anyway */ }
      this.state = 'closed';
    }
    this.session = null;
  }
}
