// The web demo in headless Chromium (Debian's `chromium` package, driven by playwright-core): device-only
// generation from a local static server, and CIAR against a real `ciar serve` on 127.0.0.1 when the project's
// virtual environment has it. Skipped, with the reason, when Chromium is not installed.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { startServer } from '../../serve.mjs';

const CHROMIUM = process.env.CHROMIUM ?? ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find(existsSync);
const CIAR = process.env.CIAR_BIN ?? fileURLToPath(new URL('../../../../.venv/bin/ciar', import.meta.url));
const noChromium = CHROMIUM ? false : 'no Chromium: apt-get install chromium (or set CHROMIUM=/path/to/chrome)';
const noServe = !existsSync(CIAR) ? `no ${CIAR} (make install)`
  : spawnSync(CIAR, ['serve', '--help'], { stdio: 'ignore' }).status !== 0 ? '`ciar serve --help` fails' : false;

const APK_WEB = process.env.CIAR_APK_WEB; // assets/web unpacked from the APK (tests/test_android_demo.py)
let browser;
let site;

before(async () => {
  if (noChromium) return;
  const { chromium } = await import('playwright-core');
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] });
  site = await startServer(APK_WEB ? { root: APK_WEB } : {});
});

after(async () => {
  await browser?.close();
  site?.server.close();
});

/** Open the demo with URL parameters, let it generate, return what the page shows. */
async function run(query) {
  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(`${site.url}?auto=1&${query}`);
  await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null, { timeout: 180000 });
  const shown = await page.evaluate(() => {
    const pixels = (id) => {
      const c = document.getElementById(id);
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const colours = new Set();
      for (let i = 0; i < d.length; i += 4) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      return { width: c.width, height: c.height, colours: colours.size, opaque: d[3] === 255 };
    };
    const text = (id) => document.getElementById(id).textContent;
    return { state: document.body.dataset.state, status: text('status'), log: text('log'), result: window.ciarResult,
      image: pixels('image'), umap: pixels('umap'), tokens: text('s-tokens'), ms: text('s-ms'), unverified: text('s-unverified') };
  });
  await page.close();
  return { ...shown, errors };
}

test('the APK assets alone run the demo in Chromium', { skip: noChromium || (APK_WEB ? false : 'CIAR_APK_WEB not set'), timeout: 240000 }, async (t) => {
  const s = await run('deviceOnly=1&seed=1');
  t.diagnostic(`APK assets: ${JSON.stringify(s.result)}`);
  assert.equal(s.state, 'done', `${s.status}\n${s.log}`);
  assert.deepEqual(s.errors, []);
  assert.equal(s.result.tokens, 256);
  assert.ok(s.image.colours > 8);
});

test('device-only generation in Chromium draws the image and the uncertainty map and shows the stats', { skip: noChromium, timeout: 240000 }, async (t) => {
  const s = await run('deviceOnly=1&seed=3&rate=0.9');
  t.diagnostic(`device only: ${JSON.stringify(s.result)}`);
  assert.equal(s.state, 'done', `${s.status}\n${s.log}`);
  assert.deepEqual(s.errors, []);
  assert.equal(s.tokens, '256');
  assert.equal(s.result.tokens, 256);
  assert.equal(s.result.local + s.result.unverified, 256);
  assert.equal(s.result.unverified, s.result.sent);
  assert.ok(s.result.sent > 0, 'rate 0.9 sends some drafts');
  assert.equal(s.unverified, String(s.result.unverified));
  assert.ok(Number(s.ms) > 0, `per-token ms shown: ${s.ms}`);
  assert.equal(s.image.width, 64);
  assert.ok(s.image.opaque && s.image.colours > 8, `image colours: ${s.image.colours}`);
  assert.equal(s.umap.width, 256);
  assert.ok(s.umap.colours > 8);
});

test('CIAR against a real `ciar serve` on 127.0.0.1: prefix and verdicts from the cloud', { skip: noChromium || noServe, timeout: 300000 }, async (t) => {
  const server = spawn(CIAR, ['serve', '--host', '127.0.0.1', '--port', '0', '--log-level', 'warning'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  server.stderr.on('data', (d) => { stderr += d; });
  try {
    const url = await new Promise((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`ciar serve did not start in 120 s:\n${out}\n${stderr}`)), 120000);
      server.stdout.on('data', (d) => {
        out += d;
        const m = /listening on (wss?:\/\/\S+)/.exec(out);
        if (m) { clearTimeout(timer); resolve(m[1]); }
      });
      server.on('exit', (code) => { clearTimeout(timer); reject(new Error(`ciar serve exited with ${code}:\n${stderr}`)); });
    });
    const s = await run(`cloud=${encodeURIComponent(url)}&seed=3&rate=0.9`);
    assert.equal(s.state, 'done', `${s.status}\n${s.log}`);
    assert.deepEqual(s.errors, []);
    const r = s.result;
    t.diagnostic(`with ${url}: ${JSON.stringify(r)}`);
    assert.equal(r.cloudState, 'closed', `cloud: ${r.cloudReason}\n${s.log}`);
    assert.equal(r.tokens, 256);
    assert.equal(r.unverified, 0);
    assert.equal(r.prefix, 15);
    assert.ok(r.sent > 20 && r.cloud >= r.prefix + r.sent, JSON.stringify(r));
    assert.ok(s.image.colours > 8);
  } finally {
    server.kill('SIGTERM');
  }
});
