// The device generation loop on onnxruntime-web: the JS twin of runtime/generator.py (with runtime/backend.py's
// OnnxBackend and runtime/images.py). `ort` (the onnxruntime-web module) is passed in, so the same code runs in a
// browser, an Android WebView and Node.
//
// Per image: caption -> caption_encoder.onnx -> prefix embeddings for the CFG rows [cond; uncond] -> prefill of
// device.onnx; then per position the graph gives the processed centre logits (CFG and temperature are inside the
// graph), U, the interval features and the draw table; the draft is drawn (top-k / top-p; the position's uniform of
// numpy's default_rng(seed), as the Python runtime draws it, so a seed gives its image), kept if U < tau, else
// sent with every unsynced token to the verifier (the cloud); while the cloud verifies, the device writes the draft
// into its cache, so after the verdict it feeds one token. Then vq_decoder.onnx draws the image.
import { chooseTau, loadBundle, readNpy, Tokenizer, tauFor } from './bundle.js';
import { draw, processedProbs, uniforms } from './sampling.js';

export { chooseTau, tauFor };
import { LocalVerifier } from './cloud.js';

export { CloudClient, LocalVerifier } from './cloud.js';
export const LOCAL = 0;
export const PREFIX = 1;
export const VERIFIED = 2;
export const CLOUD = 3;
export const UNVERIFIED = 4; // token sources, as in runtime/generator.py
export const NO_NEIGHBOUR = -1;

/** runtime/generator.py neighbour_ids: the ids left of (j - 1) and above (j - grid) image positions
 * j = start..start+n-1 of `tokens`, -1 where there is none, as the device graph's `neighbours` input (n x 2). */
export function neighbourIds(tokens, start, n, grid) {
  const out = new BigInt64Array(2 * n);
  for (let i = 0; i < n; i++) {
    const j = start + i;
    out[2 * i] = BigInt(j >= 1 ? tokens[j - 1] : NO_NEIGHBOUR);
    out[2 * i + 1] = BigInt(j >= grid ? tokens[j - grid] : NO_NEIGHBOUR);
  }
  return out;
}

const now = () => globalThis.performance.now();

/** Let the page repaint: a message task (unlike nested setTimeout(0), not clamped to 4 ms by browsers). */
function yieldToEventLoop() {
  if (typeof MessageChannel === 'undefined') return new Promise((r) => setTimeout(r, 0));
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => { channel.port1.close(); resolve(); };
    channel.port2.postMessage(0);
  });
}

/** device.onnx with its KV cache: inputs embeds, input_pos, neighbours, k_cache, v_cache, cfg_scale, temperature; outputs
 * centre, u, features, k_new, v_new, cdf (runtime/backend.py OnnxBackend). The graph reads the cache and returns only the
 * step's new rows (n_layer, 2, kv_heads, L, head_dim), which `step` writes into the cache at their positions.
 * (OnnxBackend's pre-bound output buffers are not used: onnxruntime-web 1.30 with pre-allocated CPU output tensors
 * gave drifting U values here.) */
export class OrtDeviceBackend {
  /** `decodeSession`: the same graph with its length fixed to 1, for one-token steps (`DeviceGenerator.create`). */
  constructor(ort, session, manifest, decodeSession = session) {
    const m = manifest.model;
    this.ort = ort;
    this.session = session;
    this.decodeSession = decodeSession;
    this.dim = m.dim;
    this.vocab = m.vocab_size;
    this.featureDim = m.feature_dim;
    this.cacheShape = m.cache_shape;
    const s = manifest.sampling;
    this.scalars = {
      cfg_scale: new ort.Tensor('float32', Float32Array.of(s.cfg_scale), [1]),
      temperature: new ort.Tensor('float32', Float32Array.of(s.temperature || 1.0), [1]),
    };
    this.reset();
  }

  /** A fresh (zero) KV cache. */
  reset() {
    const size = this.cacheShape.reduce((a, b) => a * b, 1);
    this.k = new this.ort.Tensor('float32', new Float32Array(size), this.cacheShape);
    this.v = new this.ort.Tensor('float32', new Float32Array(size), this.cacheShape);
  }

  /** Run embeds (2 * L * dim floats, rows [cond; uncond]) at positions start..start+L-1, with the neighbour ids
   * (2 * L int64, `neighbourIds`) of the positions the outputs predict; returns the last position's
   * {centre: Float32Array(V) of the cond row, u, features: Float32Array(F), cdf: Float64Array(V), its draw table}. */
  async step(embeds, L, start, neighbours) {
    const { ort } = this;
    const pos = new BigInt64Array(L);
    for (let i = 0; i < L; i++) pos[i] = BigInt(start + i);
    const session = L === 1 ? this.decodeSession : this.session;
    const feeds = {
      embeds: new ort.Tensor('float32', embeds, [2, L, this.dim]),
      input_pos: new ort.Tensor('int64', pos, [L]),
      neighbours: new ort.Tensor('int64', neighbours, [L, 2]),
      k_cache: this.k,
      v_cache: this.v,
      ...this.scalars,
    };
    // a bare-gate graph (`ciar export --gate maxprob`) has no Inter-Head and so no `neighbours` input
    if (session.inputNames && !session.inputNames.includes('neighbours')) delete feeds.neighbours;
    const out = await session.run(feeds);
    this.writeRows(this.k.data, out.k_new.data, start, L);
    this.writeRows(this.v.data, out.v_new.data, start, L);
    const V = this.vocab;
    const F = this.featureDim;
    return {
      centre: out.centre.data.subarray((L - 1) * V, L * V), // row 0 (cond, CFG-combined) at the last position
      u: out.u.data[L - 1],
      features: out.features.data.subarray((L - 1) * F, L * F),
      cdf: out.cdf.data.subarray((L - 1) * V, L * V), // the draw table of that centre row (float64)
    };
  }

  /** Write a step's new rows (n_layer, 2, kv_heads, L, head_dim) into a cache (n_layer, 2, kv_heads, S, head_dim) at
   * positions start..start+L-1. */
  writeRows(cache, rows, start, L) {
    const [, , , S, hd] = this.cacheShape;
    const blocks = rows.length / (L * hd); // n_layer * 2 * kv_heads
    for (let b = 0; b < blocks; b++) cache.set(rows.subarray(b * L * hd, (b + 1) * L * hd), (b * S + start) * hd);
  }
}

/** np.rint: round half to even. */
function rint(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d !== 0.5) return Math.round(x);
  return f % 2 === 0 ? f : f + 1;
}

/** The decoder's (H, W, 3) float image as RGBA bytes (clip(rint(x), 0, 255), alpha 255). */
export function toRGBA(image, height, width) {
  const out = new Uint8ClampedArray(height * width * 4);
  for (let p = 0; p < height * width; p++) {
    for (let c = 0; c < 3; c++) out[4 * p + c] = Math.min(255, Math.max(0, rint(image[3 * p + c])));
    out[4 * p + 3] = 255;
  }
  return out;
}

/** runtime/images.py uncertainty_map on RGBA: the image dimmed, drafts that went to the cloud tinted red, the
 * cloud's prefix blue, a faint white grid; `scale` times larger. Returns {data, width, height}. */
export function uncertaintyRGBA(rgba, height, width, sent, prefix, scale = 4) {
  const grid = Math.round(Math.sqrt(sent.length));
  const cell = Math.floor(height / grid) * scale;
  const H = height * scale;
  const W = width * scale;
  const out = new Uint8ClampedArray(H * W * 4);
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      const src = 4 * (Math.floor(y / scale) * width + Math.floor(x / scale));
      const t = Math.min(grid - 1, Math.floor(y / cell)) * grid + Math.min(grid - 1, Math.floor(x / cell));
      const tint = prefix[t] ? [40, 90, 230] : sent[t] ? [230, 30, 30] : null;
      const o = 4 * (y * W + x);
      for (let c = 0; c < 3; c++) {
        const big = rgba[src + c] * 0.6 + 255 * 0.4 * 0.5;
        out[o + c] = y % cell === 0 || x % cell === 0 ? 255 : Math.floor(tint ? 0.45 * big + 0.55 * tint[c] : big);
      }
      out[o + 3] = 255;
    }
  }
  return { data: out, width: W, height: H };
}

function median(values) {
  if (!values.length) return null;
  const s = Float64Array.from(values).sort();
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

function percentile(values, q) { // numpy's default (linear interpolation)
  const s = Float64Array.from(values).sort();
  if (!s.length) return null;
  const i = (q / 100) * (s.length - 1);
  const lo = Math.floor(i);
  return s[lo] + (s[Math.ceil(i)] - s[lo]) * (i - lo);
}

export class DeviceGenerator {
  /** Create the onnxruntime sessions from a loaded bundle ({manifest, files} from loadBundle): the device graph
   * twice, as exported (prefill, blocks of tokens) and with its length fixed to 1 for the one-token decode step
   * (onnxruntime folds the shape arithmetic away: about 13% less time per step), as runtime/backend.py does. */
  static async create(ort, bundle, { threads = 1 } = {}) {
    const opts = { executionProviders: ['wasm'], graphOptimizationLevel: 'all', intraOpNumThreads: threads };
    const [device, caption, decoder] = await Promise.all(['device', 'caption_encoder', 'vq_decoder'].map(
      (role) => ort.InferenceSession.create(bundle.files[role], opts)));
    const length = device.inputMetadata?.find((i) => i.name === 'embeds')?.shape?.[1];
    const decode = typeof length === 'string'
      ? await ort.InferenceSession.create(bundle.files.device, { ...opts, freeDimensionOverrides: { [length]: 1 } })
      : device;
    return new DeviceGenerator(ort, bundle, device, caption, decoder, decode);
  }

  /** Load a bundle through readFile (see bundle.js loadBundle) and create the generator. */
  static async load(ort, readFile, options = {}) {
    return DeviceGenerator.create(ort, await loadBundle(readFile, options), options);
  }

  constructor(ort, bundle, deviceSession, captionSession, decoderSession, decodeSession = deviceSession) {
    const m = bundle.manifest;
    this.ort = ort;
    this.manifest = m;
    this.T = m.model.block_size;
    this.P = m.model.cls_token_num;
    this.grid = m.model.grid;
    this.tokenizer = new Tokenizer(m.caption);
    const emb = readNpy(bundle.files.token_embeddings);
    if (emb.shape.length !== 2 || emb.shape[0] !== m.model.vocab_size || emb.shape[1] !== m.model.dim) {
      throw new Error(`token_embeddings.npy has shape ${emb.shape}, the manifest says (${m.model.vocab_size}, ${m.model.dim})`);
    }
    this.embeddings = emb.data;
    this.backend = new OrtDeviceBackend(ort, deviceSession, m, decodeSession);
    this.captionSession = captionSession;
    this.decoderSession = decoderSession;
  }

  /** tau for a run: as given, else the rate through the bundle's tables (options: {cloud, prefixFraction}). */
  tau(tau = null, cloudRate = null, options = {}) {
    return chooseTau(this.manifest, tau, cloudRate, options).tau;
  }

  /** Prefix embeddings (2, P, dim) of a caption, as a Float32Array. */
  async encodeCaption(text) {
    const { ids, mask } = this.tokenizer.encode(text);
    const n = ids.length;
    const out = await this.captionSession.run({
      ids: new this.ort.Tensor('int64', ids, [1, n]),
      mask: new this.ort.Tensor('bool', mask, [1, n]),
    });
    return out.prefix_embeds.data;
  }

  /** Token embeddings for both CFG rows: 2 * n * dim floats. */
  embed(tokens) {
    const dim = this.embeddings.length / this.manifest.model.vocab_size;
    const n = tokens.length;
    const out = new Float32Array(2 * n * dim);
    tokens.forEach((t, i) => out.set(this.embeddings.subarray(t * dim, (t + 1) * dim), i * dim));
    out.copyWithin(n * dim, 0, n * dim);
    return out;
  }

  /** (1, grid, grid) codes -> the image as {data: RGBA bytes, width, height}. */
  async decode(tokens) {
    const codes = BigInt64Array.from(tokens, (t) => BigInt(t));
    const out = await this.decoderSession.run({ codes: new this.ort.Tensor('int64', codes, [1, this.grid, this.grid]) });
    const [, height, width] = out.image.dims;
    return { data: toRGBA(out.image.data, height, width), width, height };
  }

  /**
   * One image. options: seed (u64), tau, verifier (default LocalVerifier), topK/topP (default: the manifest's),
   * greedy, prefixFraction (default: the manifest's gate.prefix_fraction), onStep(event) after every position,
   * yieldEvery (give the event loop a turn every N positions so a page can repaint; 0: never), decodeImage.
   * Returns {tokens, source, u, sent, image, stats}, like runtime DeviceResult.
   */
  async generate(prompt, options = {}) {
    const m = this.manifest;
    const s = m.sampling;
    const verifier = options.verifier ?? new LocalVerifier();
    const topK = options.topK ?? s.top_k;
    const topP = options.topP ?? s.top_p;
    const greedy = Boolean(options.greedy);
    const seed = BigInt(options.seed ?? 0);
    const tau = options.tau ?? this.tau();
    const { T, P } = this;
    const uniform = uniforms(seed, T); // one per position, numpy's default_rng(seed).random(T)
    const F = m.model.feature_dim;
    const timings = { caption_s: 0, prefill_s: 0, device_s: 0, cloud_s: 0, decode_s: 0 };
    const stepsMs = [];

    let t0 = now();
    const prefixEmbeds = await this.encodeCaption(prompt);
    timings.caption_s = (now() - t0) / 1000;
    const frac = options.prefixFraction ?? m.gate.prefix_fraction;
    const params = { caption: prompt, seed, num_tokens: T, prefix_tokens: Math.floor(frac * T), cfg_scale: s.cfg_scale,
      temperature: s.temperature, top_k: topK, top_p: topP };
    t0 = now();
    const prefix = Array.from(await verifier.open(params));
    timings.cloud_s += (now() - t0) / 1000;

    const tokens = new Int32Array(T);
    const source = new Int8Array(T).fill(LOCAL);
    const uMap = new Float64Array(T).fill(NaN);
    const sent = new Uint8Array(T);
    const features = new Float32Array(T * F);
    t0 = now();
    this.backend.reset();
    // the condition prefix: its last output predicts image position 0, which has no neighbours
    let step = await this.backend.step(prefixEmbeds, P, 0, new BigInt64Array(2 * P).fill(BigInt(NO_NEIGHBOUR)));
    const mPref = prefix.length;
    if (mPref) {
      tokens.set(prefix);
      source.fill(PREFIX, 0, mPref);
      step = await this.backend.step(this.embed(prefix), mPref, P, neighbourIds(tokens, 1, mPref, this.grid));
    }
    timings.prefill_s = (now() - t0) / 1000;
    let t = mPref;
    let synced = mPref; // the cloud knows every token before `synced`
    const row = (i) => features.subarray(i * F, (i + 1) * F);
    while (t < T) {
      t0 = now();
      const draft = draw(step.centre, uniform[t], topK, topP, greedy, step.cdf);
      uMap[t] = step.u;
      features.set(step.features, t * F);
      timings.device_s += (now() - t0) / 1000;
      let next = [draft];
      let ahead = null; // the step after the draft, run while the cloud verifies it
      let aheadMs = 0;
      if (step.u >= tau) {
        sent[t] = 1;
        const probs = processedProbs(step.centre, topK, topP, greedy);
        const qIds = [];
        const qProbs = [];
        probs.forEach((p, i) => { if (p > 0) { qIds.push(i); qProbs.push(p); } });
        const rows = Array.from({ length: t - synced }, (_, i) => row(synced + i));
        const t1 = now();
        const pending = verifier.verify(synced, tokens.slice(synced, t), rows, draft, qIds, qProbs, row(t));
        // the Verify is on the wire: the device writes its draft into its cache meanwhile, so that after the
        // verdict it feeds one token (the bonus after a kept draft, or the correction over a rejected one)
        tokens[t] = draft; // the graph reads it as a neighbour
        if (t + 1 < T) {
          const t2 = now();
          ahead = await this.backend.step(this.embed([draft]), 1, P + t, neighbourIds(tokens, t + 1, 1, this.grid));
          aheadMs = now() - t2;
        }
        const verdict = await pending;
        timings.cloud_s += (now() - t1 - aheadMs) / 1000;
        if (!verdict.verified) {
          source[t] = UNVERIFIED;
        } else if (verdict.n_accepted === 0) {
          next = [verdict.next_token];
          source[t] = CLOUD;
        } else {
          source[t] = VERIFIED;
          if (verdict.next_token != null && t + 1 < T) {
            next.push(verdict.next_token);
            source[t + 1] = CLOUD;
          }
        }
        if (verdict.verified) synced = t + next.length;
      }
      tokens.set(next, t);
      const t1 = now();
      if (t + next.length < T) {
        const from = ahead !== null && next[0] === draft ? 1 : 0; // the cache already holds the draft
        const feed = next.slice(from);
        step = feed.length === 0 ? ahead : await this.backend.step(this.embed(feed), feed.length, P + t + from,
          neighbourIds(tokens, t + from + 1, feed.length, this.grid));
      }
      const dt = now() - t1 + aheadMs;
      timings.device_s += dt / 1000;
      stepsMs.push(dt / next.length);
      t += next.length;
      if (options.onStep) {
        options.onStep({ t, tokens: next, source: Array.from(source.subarray(t - next.length, t)), u: uMap[t - next.length],
          sent: sent[t - next.length] === 1, ms: dt / next.length, stepMsP50: median(stepsMs), stats: counts(source, sent, t) });
      }
      if (options.yieldEvery && (t % options.yieldEvery === 0 || t >= T)) await yieldToEventLoop();
    }
    await verifier.close();
    let image = null;
    if (options.decodeImage !== false) {
      t0 = now();
      image = await this.decode(tokens);
      timings.decode_s = (now() - t0) / 1000;
    }
    const us = Array.from(uMap).filter(Number.isFinite);
    const stats = {
      ...counts(source, sent, T), tau,
      u_mean: us.length ? us.reduce((a, b) => a + b, 0) / us.length : null,
      u_p50: percentile(us, 50), u_p95: percentile(us, 95), step_ms_p50: median(stepsMs),
      ...Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, Math.round(v * 1e4) / 1e4])),
    };
    stats.seconds = Math.round(Object.values(timings).reduce((a, b) => a + b, 0) * 1e4) / 1e4;
    return { tokens, source, u: uMap, sent, image, stats, stepsMs };
  }
}

/** The stats counters over the first `upto` positions (runtime/generator.py's definitions). */
function counts(source, sent, upto) {
  let local = 0; let prefix = 0; let cloud = 0; let unverified = 0; let nSent = 0;
  for (let i = 0; i < upto; i++) {
    const s = source[i];
    if (s === LOCAL) local++;
    if (s === PREFIX) prefix++;
    if (s === PREFIX || s === VERIFIED || s === CLOUD) cloud++;
    if (s === UNVERIFIED) unverified++;
    if (sent[i]) nSent++;
  }
  return { tokens: upto, local, prefix, cloud, unverified, sent: nSent };
}

/** Put RGBA pixels ({data, width, height}) on a canvas (or anything with getContext('2d')). */
export function drawRGBA(canvas, { data, width, height }) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(width, height);
  img.data.set(data);
  ctx.putImageData(img, 0, 0);
}
