// Size check: the JSON core (`@tether/client`, what an app that imports only
// it ships) minified by esbuild and gzipped at level 9 must stay within
// 12 KiB. Prints the figure.
import { build } from 'esbuild';
import { gzipSync } from 'node:zlib';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const LIMIT = 12 * 1024;
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = await build({
  absWorkingDir: root,
  entryPoints: ['src/index.ts'],
  bundle: true,
  minify: true,
  format: 'esm',
  target: 'es2018',
  write: false,
  logLevel: 'warning',
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 }).length;
const kib = (n) => (n / 1024).toFixed(2);
console.log(`size: JSON core ${kib(code.length)} KiB minified, ${kib(gz)} KiB minified+gzip (${gz} bytes; limit ${kib(LIMIT)} KiB)`);
if (gz > LIMIT) {
  console.error('size check failed: the JSON core is over 12 KiB minified+gzip');
  process.exit(1);
}
