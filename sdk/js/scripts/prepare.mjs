// npm's `prepare`: builds dist/ when the package is installed from the
// repository (`npm install <repo>/sdk/js`, or from git), where dist/ is not
// committed. npm runs it after `npm install` / `npm ci` here, before
// `npm pack` / `npm publish`, and for a dependency given as a path or a git
// URL. The build needs the dev dependencies (esbuild, typescript): when they
// are not installed (a path install links this folder without them), they
// are installed first from the lockfile with `npm ci` (the npm registry is
// the only network it needs).
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const have = (dep) => existsSync(join(root, 'node_modules', dep, 'package.json'));

if (!have('esbuild') || !have('typescript')) {
  console.error('@tether/client prepare: installing the build tools (npm ci)');
  const npm = process.env.npm_execpath;
  const [cmd, args] = npm && npm.endsWith('.js') ? [process.execPath, [npm]] : ['npm', []];
  // --ignore-scripts: this script is itself a lifecycle script of the package.
  execFileSync(cmd, [...args, 'ci', '--ignore-scripts', '--no-audit', '--no-fund', '--include=dev'], {
    cwd: root,
    stdio: ['ignore', 'inherit', 'inherit'],
  });
}
execFileSync(process.execPath, [join(root, 'scripts', 'build.mjs')], { cwd: root, stdio: ['ignore', 'inherit', 'inherit'] });
