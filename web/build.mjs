// Bundles the browser's scripts, each one IIFE, minified, with a source
// map beside it:
//   web/src/main.ts      -> web/dist/app.js     the console
//   web/src/auditPage.ts -> web/dist/audit.js   the audit page (log and recordings)
//   web/src/replay.ts    -> web/dist/replay.js  the player of one recording
// Run by `npm run build`, and by `npm ci` through the package's `prepare`
// script, so the files exist before cargo embeds web/dist. xterm.js is not
// bundled: the pages load it from the pinned npm package, which conch
// serves as it is.

import { build } from 'esbuild';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const WEB = path.dirname(fileURLToPath(import.meta.url));

const ENTRIES = [
  ['main.ts', 'app.js'],
  ['auditPage.ts', 'audit.js'],
  ['replay.ts', 'replay.js'],
];

// One page's script each (not one bundle with code splitting): a page
// loads one file, and each stays an IIFE with nothing global.
await Promise.all(ENTRIES.map(([source, out]) => build({
  entryPoints: [path.join(WEB, 'src', source)],
  outfile: path.join(WEB, 'dist', out),
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: ['es2022'],
  minify: true,
  sourcemap: 'linked',
  charset: 'utf8',
  legalComments: 'none',
  logLevel: 'warning',
})));
