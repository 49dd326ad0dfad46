// Builds dist/: ESM (dist/esm) and CommonJS (dist/cjs) bundles of each
// entry point with esbuild, and their .d.ts with tsc. dist/cjs has a
// package.json of its own saying "commonjs", so the .d.ts files there are
// read as CommonJS declarations.
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const dist = join(root, 'dist');
const entries = ['index', 'msgpack', 'react-native'];

rmSync(dist, { recursive: true, force: true });
for (const [format, dir] of [['esm', 'esm'], ['cjs', 'cjs']]) {
  await build({
    absWorkingDir: root,
    entryPoints: entries.map((e) => `src/${e}.ts`),
    outdir: join(dist, dir),
    bundle: true,
    format,
    platform: 'neutral',
    target: 'es2018',
    external: ['@msgpack/msgpack'],
    sourcemap: true,
    logLevel: 'warning',
  });
}
writeFileSync(join(dist, 'cjs', 'package.json'), '{"type": "commonjs"}\n');
execFileSync(
  process.execPath,
  [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json', '--emitDeclarationOnly', '--outDir', join(dist, 'esm')],
  { stdio: 'inherit', cwd: root },
);
mkdirSync(join(dist, 'cjs'), { recursive: true });
for (const f of readdirSync(join(dist, 'esm'))) if (f.endsWith('.d.ts')) cpSync(join(dist, 'esm', f), join(dist, 'cjs', f));
console.log('built dist/esm and dist/cjs');
