// docs/openapi.json from docs/openapi.yaml: the same OpenAPI document in
// JSON, which the broker serves at GET /v1/openapi.json and Schemathesis
// reads (scripts/schemathesis.sh). The YAML is the one to edit; run this
// after every change:
//
//   node sdk/js/scripts/openapi-json.mjs          # writes docs/openapi.json
//   node sdk/js/scripts/openapi-json.mjs --check  # exits 1 if it is stale
//
// The SDK test suite (test/openapi-json.test.mjs) fails while the two differ.
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';

export const YAML_PATH = fileURLToPath(new URL('../../../docs/openapi.yaml', import.meta.url));
export const JSON_PATH = fileURLToPath(new URL('../../../docs/openapi.json', import.meta.url));

/** The text docs/openapi.json must have: the YAML's document, 2-space indented, one trailing newline. */
export function openapiJsonText(yamlText = readFileSync(YAML_PATH, 'utf8')) {
  // uniqueKeys and the core schema: a duplicated key or a YAML-1.1-only
  // scalar (yes/no, 0777) is an error here rather than a silent surprise.
  const doc = YAML.parse(yamlText, { uniqueKeys: true, schema: 'core', prettyErrors: true });
  return `${JSON.stringify(doc, null, 2)}\n`;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const want = openapiJsonText();
  if (process.argv.includes('--check')) {
    let have = '';
    try {
      have = readFileSync(JSON_PATH, 'utf8');
    } catch {}
    if (have !== want) {
      console.error('docs/openapi.json is stale: run node sdk/js/scripts/openapi-json.mjs');
      process.exit(1);
    }
    console.log('docs/openapi.json matches docs/openapi.yaml');
  } else {
    writeFileSync(JSON_PATH, want);
    console.log(`wrote docs/openapi.json (${want.length} bytes)`);
  }
}
