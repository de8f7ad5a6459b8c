// A static server for the web demo on 127.0.0.1 (development and the headless-browser test), with the same URL
// layout as the APK's assets:
//   /                 this folder (index.html, app.js, loop.js, ...)
//   /vendor/ort/      node_modules/onnxruntime-web/dist (run `npm ci` first)
//   /bundle/          the device bundle (default: runtime/bundles/onnx-int8)
// Usage: node serve.mjs [--port 8080] [--bundle DIR]    prints "serving http://127.0.0.1:PORT/"
//        node serve.mjs --root DIR    serves DIR alone (e.g. the assets/web folder unpacked from the APK)
import { createServer } from 'node:http';
import { readFile, stat } from 'node:fs/promises';
import { extname, join, normalize, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = fileURLToPath(new URL('.', import.meta.url));
export const DEFAULT_BUNDLE = resolve(HERE, '../../runtime/bundles/onnx-int8');
const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css',
  '.json': 'application/json', '.wasm': 'application/wasm', '.onnx': 'application/octet-stream',
  '.npy': 'application/octet-stream', '.png': 'image/png',
};

function route(path, bundleDir, root) {
  const mounts = root ? [['/', root]]
    : [['/vendor/ort/', join(HERE, 'node_modules/onnxruntime-web/dist')], ['/bundle/', bundleDir], ['/', HERE]];
  for (const [prefix, dir] of mounts) {
    if (path.startsWith(prefix)) {
      const file = normalize(join(dir, decodeURIComponent(path.slice(prefix.length)) || 'index.html'));
      return file.startsWith(resolve(dir) + sep) ? file : null; // no escaping the mount with ..
    }
  }
  return null;
}

/** Start the server; resolves to {server, url}. */
export function startServer({ port = 0, host = '127.0.0.1', bundleDir = DEFAULT_BUNDLE, root = null } = {}) {
  const server = createServer(async (req, res) => {
    const file = route(new URL(req.url, 'http://x').pathname, bundleDir, root);
    try {
      if (!file || !(await stat(file)).isFile()) throw new Error('not found');
      const body = await readFile(file);
      res.writeHead(200, { 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream', 'Cache-Control': 'no-store' });
      res.end(body);
    } catch {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      res.end(`not found: ${req.url}\n`);
    }
  });
  return new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(port, host, () => ok({ server, url: `http://${host}:${server.address().port}/` }));
  });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const arg = (name, dflt) => { const i = process.argv.indexOf(name); return i > 0 ? process.argv[i + 1] : dflt; };
  const root = arg('--root', null);
  const { url } = await startServer({ port: Number(arg('--port', 8080)), bundleDir: resolve(arg('--bundle', DEFAULT_BUNDLE)),
    root: root && resolve(root) });
  console.log(`serving ${url}`);
}
