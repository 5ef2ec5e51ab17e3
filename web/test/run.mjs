// Unit tests of the pure browser modules: each web/test/*.test.ts is
// bundled by esbuild (with the modules it imports) into a temporary folder
// and run there by node's own test runner. No DOM is needed: what these
// tests cover never touches one.

import { build } from 'esbuild';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const tests = readdirSync(HERE).filter((f) => f.endsWith('.test.ts')).sort();
const out = mkdtempSync(path.join(os.tmpdir(), 'conch-unit-'));
let status = 1;
try {
  await build({
    entryPoints: tests.map((f) => path.join(HERE, f)),
    outdir: out,
    outExtension: { '.js': '.mjs' },
    bundle: true,
    format: 'esm',
    platform: 'node',
    target: ['node20'],
    sourcemap: 'inline',
    logLevel: 'warning',
  });
  const files = readdirSync(out).filter((f) => f.endsWith('.test.mjs')).sort().map((f) => path.join(out, f));
  const run = spawnSync(process.execPath, ['--enable-source-maps', '--test', ...files], { stdio: 'inherit' });
  status = run.status ?? 1;
} finally {
  rmSync(out, { recursive: true, force: true });
}
process.exit(status);
