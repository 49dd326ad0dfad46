// `npm install <repo>/sdk/js` into a fresh app, as docs/sdk-js.md tells an
// app developer to do: the package's `prepare` builds dist/ (not in git)
// on the way, and the app can import it by name, as ESM and CommonJS.
// The copy of the package stands for a fresh clone (no dist/); its
// node_modules is a link to this one's, so the build tools are there
// without the network (scripts/prepare.mjs installs them with `npm ci` when
// they are missing, which needs the npm registry).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = fileURLToPath(new URL('../../', import.meta.url));
const pkg = JSON.parse(readFileSync(join(here, 'package.json'), 'utf8'));
const tmp = mkdtempSync(join(tmpdir(), 'tether-install-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

test('npm install <repo>/sdk/js builds dist/ through prepare; the app imports the package (ESM, CommonJS)', () => {
  const copy = join(tmp, 'repo', 'sdk', 'js');
  mkdirSync(copy, { recursive: true });
  for (const entry of ['package.json', 'package-lock.json', 'README.md', 'tsconfig.json', 'src', 'scripts', 'msgpack', 'react-native', 'examples'])
    cpSync(join(here, entry), join(copy, entry), { recursive: true });
  symlinkSync(join(here, 'node_modules'), join(copy, 'node_modules'), 'dir');
  assert.equal(existsSync(join(copy, 'dist')), false);

  const app = join(tmp, 'app');
  mkdirSync(app);
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', private: true }));
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '--loglevel=error', copy], {
    cwd: app,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, npm_config_update_notifier: 'false' },
  });
  assert.deepEqual(JSON.parse(readFileSync(join(app, 'package.json'), 'utf8')).dependencies, { '@tether/client': 'file:../repo/sdk/js' });
  for (const f of ['esm/index.js', 'esm/index.d.ts', 'cjs/index.js', 'esm/msgpack.js', 'esm/react-native.js'])
    assert.ok(existsSync(join(copy, 'dist', f)), `prepare built dist/${f}`);

  writeFileSync(
    join(app, 'esm.mjs'),
    `import { TetherClient, VERSION } from '@tether/client';
     import { attachReactNative } from '@tether/client/react-native';
     console.log(JSON.stringify([typeof TetherClient, VERSION, typeof attachReactNative]));`,
  );
  writeFileSync(join(app, 'cjs.cjs'), `const { TetherClient, VERSION } = require('@tether/client'); console.log(JSON.stringify([typeof TetherClient, VERSION]));`);
  const run = (file) => JSON.parse(execFileSync(process.execPath, [file], { cwd: app, encoding: 'utf8' }));
  assert.deepEqual(run('esm.mjs'), ['function', pkg.version, 'function']);
  assert.deepEqual(run('cjs.cjs'), ['function', pkg.version]);
  // The browser bundle the guide's page loads, at the path the guide gives.
  const bundle = join(app, 'node_modules', '@tether', 'client', 'dist', 'esm', 'index.js');
  assert.match(readFileSync(bundle, 'utf8'), /TetherClient/);
});
