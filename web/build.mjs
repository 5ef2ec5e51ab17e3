// Bundles the console's script: web/src/main.ts -> web/dist/app.js (one
// IIFE, minified, with a source map beside it). Run by `npm run build`, and
// by `npm ci` through the package's `prepare` script, so the file exists
// before cargo embeds it. xterm.js is not bundled: the page loads it from
// the pinned npm package, which conch serves as it is.

import { build } from 'esbuild';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const WEB = path.dirname(fileURLToPath(import.meta.url));

await build({
  entryPoints: [path.join(WEB, 'src', 'main.ts')],
  outfile: path.join(WEB, 'dist', 'app.js'),
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: ['es2022'],
  minify: true,
  sourcemap: 'linked',
  charset: 'utf8',
  legalComments: 'none',
  logLevel: 'warning',
});
