// The routes the broker's backend API serves, read from its router's source
// (broker/src/api/mod.rs): every `.route("path", get(..).post(..))` call.
// Routers built another way (`nest`, `route_service`, a router from another
// file merged in) are refused, so that a route cannot hide from the check
// that the OpenAPI document describes all of them.
import { readFileSync } from 'node:fs';

export const ROUTER_SOURCE = new URL('../../../../broker/src/api/mod.rs', import.meta.url);
const METHODS = ['get', 'post', 'put', 'delete', 'patch', 'head', 'options'];

/** Rust source without comments; string literals kept (paths are in them). */
function stripComments(src) {
  let out = '';
  for (let i = 0; i < src.length; ) {
    if (src[i] === '"') {
      const end = stringEnd(src, i);
      out += src.slice(i, end);
      i = end;
    } else if (src.startsWith('//', i)) {
      while (i < src.length && src[i] !== '\n') i++;
    } else if (src.startsWith('/*', i)) {
      const end = src.indexOf('*/', i + 2);
      i = end < 0 ? src.length : end + 2;
    } else out += src[i++];
  }
  return out;
}

/** The index just past the string literal that opens at `i`. */
function stringEnd(src, i) {
  for (let j = i + 1; j < src.length; j++) {
    if (src[j] === '\\') j++;
    else if (src[j] === '"') return j + 1;
  }
  throw new Error('unterminated string in the router source');
}

/** The index of the bracket that closes the one opening at `open`. */
function closing(src, open) {
  let depth = 0;
  for (let j = open; j < src.length; j++) {
    const c = src[j];
    if (c === '"') j = stringEnd(src, j) - 1;
    else if ('([{'.includes(c)) depth++;
    else if (')]}'.includes(c) && --depth === 0) return j;
  }
  throw new Error('unbalanced brackets in the router source');
}

/** `[{method, path}]` for every route in the router source. */
export function routerRoutes(source = readFileSync(ROUTER_SOURCE, 'utf8')) {
  const src = stripComments(source);
  for (const unsupported of ['.nest(', '.nest_service(', '.route_service('])
    if (src.includes(unsupported)) throw new Error(`the router uses ${unsupported}: teach test/support/routes.mjs to read it`);
  // `.merge(x)` only of a router built in this file (`let x = Router::new()…`).
  for (const [, merged] of src.matchAll(/\.merge\(\s*([^)]*?)\s*\)/g))
    if (!/^\w+$/.test(merged) || !new RegExp(`let\\s+${merged}\\s*=\\s*Router::new\\(\\)`).test(src))
      throw new Error(`the router merges ${merged}, not built in this file: teach test/support/routes.mjs to read it`);
  const routes = [];
  const call = /\.route\(\s*"([^"]+)"\s*,/g;
  for (let m; (m = call.exec(src)); ) {
    const open = src.indexOf('(', m.index);
    const args = src.slice(m.index + m[0].length, closing(src, open));
    // The method router: `get(handler)`, chained as `.post(handler)`; only
    // calls at the top level of the argument count (not inside handlers).
    let depth = 0;
    const found = [];
    for (let j = 0; j < args.length; j++) {
      const c = args[j];
      if (c === '"') j = stringEnd(args, j) - 1;
      else if ('([{'.includes(c)) depth++;
      else if (')]}'.includes(c)) depth--;
      else if (depth === 0 && /[a-z_]/.test(c) && !/[\w]/.test(args[j - 1] ?? '')) {
        const word = /^[a-z_]\w*/.exec(args.slice(j))[0];
        if (args[j + word.length] === '(') {
          if (!METHODS.includes(word)) throw new Error(`route ${m[1]}: unknown method router call ${word}(…)`);
          found.push(word.toUpperCase());
        }
        j += word.length - 1;
      }
    }
    if (!found.length) throw new Error(`route ${m[1]}: no method found in ${args.trim().slice(0, 80)}`);
    for (const method of found) routes.push({ method, path: m[1] });
  }
  return routes;
}
