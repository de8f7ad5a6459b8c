// The page: load the bundle once, then Generate runs the device loop (loop.js), device-only or with the cloud
// (CloudClient), drawing the uncertainty grid live and the image at the end. URL parameters (for tests and
// links): ?prompt=...&cloud=ws://...&token=...&deviceOnly=0|1&seed=N&rate=R&auto=1 (start at once).
import * as ort from './vendor/ort/ort.wasm.min.mjs';
import { CloudClient, DeviceGenerator, drawRGBA, LocalVerifier, PREFIX, uncertaintyRGBA } from './loop.js';

ort.env.wasm.wasmPaths = new URL('./vendor/ort/', import.meta.url).href;
ort.env.wasm.numThreads = 1; // no cross-origin isolation in a WebView: one thread
ort.env.wasm.proxy = false;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SETTINGS = ['cloud-url', 'token', 'device-only'];
let generator = null;

function log(text) {
  $('log').textContent += `${new Date().toISOString().slice(11, 19)} ${text}\n`;
}

function setState(state, text) {
  document.body.dataset.state = state;
  if (text) $('status').textContent = text;
}

function restoreSettings() {
  try {
    for (const id of SETTINGS) {
      const v = localStorage.getItem(`ciar.${id}`);
      if (v == null) continue;
      if ($(id).type === 'checkbox') $(id).checked = v === '1'; else $(id).value = v;
    }
  } catch { /* no storage: defaults */ }
  if (params.has('prompt')) $('prompt').value = params.get('prompt');
  if (params.has('cloud')) { $('cloud-url').value = params.get('cloud'); $('device-only').checked = false; }
  if (params.has('token')) $('token').value = params.get('token');
  if (params.has('deviceOnly')) $('device-only').checked = params.get('deviceOnly') !== '0';
  if (params.has('seed')) $('seed').value = params.get('seed');
  if (params.has('rate')) $('cloud-rate').value = params.get('rate');
}

function saveSettings() {
  try {
    for (const id of SETTINGS) localStorage.setItem(`ciar.${id}`, $(id).type === 'checkbox' ? ($(id).checked ? '1' : '0') : $(id).value);
  } catch { /* not persisted */ }
}

const CELL_COLOURS = { local: '#bbb', sent: '#e61e1e', prefix: '#285ae6' };

function drawCell(ctx, t, colour, grid) {
  const size = ctx.canvas.width / grid;
  ctx.fillStyle = colour;
  ctx.fillRect((t % grid) * size, Math.floor(t / grid) * size, size - 1, size - 1);
}

function showStats(s, lastMs) {
  $('s-tokens').textContent = s.tokens;
  $('s-local').textContent = s.local;
  $('s-cloud').textContent = s.cloud;
  $('s-unverified').textContent = s.unverified;
  $('s-sent').textContent = s.sent;
  if (s.step_ms_p50 != null) $('s-ms').textContent = s.step_ms_p50.toFixed(2);
  if (lastMs != null) $('s-last').textContent = lastMs.toFixed(2);
  if (s.seconds != null) $('s-seconds').textContent = s.seconds.toFixed(2);
}

async function generate(event) {
  event?.preventDefault();
  saveSettings();
  const deviceOnly = $('device-only').checked;
  const url = $('cloud-url').value.trim();
  if (!deviceOnly && !/^wss?:\/\//.test(url)) {
    setState('error', 'Enter a cloud URL (ws://host:port) or switch on "device only".');
    return;
  }
  $('generate').disabled = true;
  setState('running', deviceOnly ? 'Generating on this device…' : `Generating with the cloud at ${url}…`);
  const grid = generator.grid;
  const umap = $('umap').getContext('2d');
  umap.clearRect(0, 0, umap.canvas.width, umap.canvas.height);
  const verifier = deviceOnly ? new LocalVerifier() : new CloudClient(url, {
    authToken: $('token').value, client: 'ciar-web/0.1', featureDim: generator.manifest.model.feature_dim, onEvent: log,
  });
  try {
    const tau = generator.tau(null, Number($('cloud-rate').value), { cloud: !deviceOnly });
    const seed = BigInt(Math.max(0, Math.floor(Number($('seed').value) || 0)));
    const result = await generator.generate($('prompt').value, {
      seed, tau, verifier, yieldEvery: 4,
      onStep: (e) => {
        e.source.forEach((src, i) => {
          const t = e.t - e.source.length + i;
          drawCell(umap, t, src === PREFIX ? CELL_COLOURS.prefix : (i === 0 && e.sent) ? CELL_COLOURS.sent : CELL_COLOURS.local, grid);
        });
        showStats({ ...e.stats, step_ms_p50: e.stepMsP50 }, e.t < generator.T ? e.ms : null); // the last position runs no step
      },
    });
    for (let t = 0; t < result.stats.prefix; t++) drawCell(umap, t, CELL_COLOURS.prefix, grid);
    drawRGBA($('image'), result.image);
    const prefix = Array.from(result.source, (s) => s === PREFIX);
    drawRGBA($('umap'), uncertaintyRGBA(result.image.data, result.image.height, result.image.width, result.sent, prefix, 4));
    showStats(result.stats);
    const cloudNote = deviceOnly ? 'device only' : verifier.state === 'offline' ? `cloud unavailable (${verifier.reason}); device only` : 'with the cloud';
    window.ciarResult = { ...result.stats, mode: deviceOnly ? 'device' : 'cloud', cloudState: verifier.state ?? 'none', cloudReason: verifier.reason ?? '' };
    log(`done: ${JSON.stringify(window.ciarResult)}`);
    setState('done', `Done (${cloudNote}): ${result.stats.tokens} tokens in ${result.stats.seconds.toFixed(2)} s.`);
  } catch (e) {
    setState('error', `Error: ${e.message}`);
    log(e.stack ?? String(e));
  } finally {
    $('generate').disabled = false;
  }
}

async function main() {
  restoreSettings();
  $('form').addEventListener('submit', generate);
  try {
    const t0 = performance.now();
    generator = await DeviceGenerator.load(ort, async (path) => {
      const r = await fetch(`bundle/${path}`);
      if (!r.ok) throw new Error(`HTTP ${r.status} for bundle/${path}`);
      return new Uint8Array(await r.arrayBuffer());
    });
    const m = generator.manifest;
    log(`bundle ${m.format}-${m.quantize}: ${m.model.vocab_size} tokens, ${m.model.grid}x${m.model.grid} grid, ` +
      `loaded in ${((performance.now() - t0) / 1000).toFixed(2)} s (onnxruntime-web ${ort.env.versions?.web ?? '?'})`);
    $('generate').disabled = false;
    $('generate').textContent = 'Generate';
    setState('ready', 'Ready.');
    if (params.get('auto') === '1') await generate();
  } catch (e) {
    setState('error', `Cannot load the device bundle: ${e.message}`);
    log(e.stack ?? String(e));
  }
}

main();
