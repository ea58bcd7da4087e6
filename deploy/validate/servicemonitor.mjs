// Validate ServiceMonitor objects (JSON array on stdin) offline with the prometheus-operator models of npm
// @kubernetes-models/prometheus-operator: ajv validators generated from prometheus-operator's Go API types
// (types, required fields, enums). Those validators accept unknown keys, as the API server does only in
// non-strict field validation, so keys of spec and of each endpoint are also checked against the fields the
// package declares. Usage: node servicemonitor.mjs NODE_MODULES_DIR < objects.json; exit 1 on any error.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const pkg = join(modules, "@kubernetes-models", "prometheus-operator", "monitoring.coreos.com", "v1");
const { ServiceMonitor } = await import(pathToFileURL(join(pkg, "ServiceMonitor.js")).href);

function declaredFields(typeFile) {
  const text = readFileSync(join(pkg, typeFile), "utf8");
  return new Set([...text.matchAll(/^\s+"([A-Za-z0-9]+)"\??:/gm)].map((m) => m[1]));
}

const specFields = declaredFields("ServiceMonitorSpec.d.ts");
const endpointFields = declaredFields("Endpoint.d.ts");
const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const obj of objects) {
  const name = `${obj.kind}/${obj.metadata?.name}`;
  const problems = [];
  try {
    new ServiceMonitor(obj).validate();
  } catch (e) {
    problems.push(e.message);
  }
  for (const key of Object.keys(obj.spec ?? {})) {
    if (!specFields.has(key)) problems.push(`spec.${key}: unknown field`);
  }
  (obj.spec?.endpoints ?? []).forEach((ep, i) => {
    for (const key of Object.keys(ep)) {
      if (!endpointFields.has(key)) problems.push(`spec.endpoints[${i}].${key}: unknown field`);
    }
  });
  if (problems.length) {
    failed += 1;
    console.log(`ERROR ${name}: ${problems.join("; ")}`);
  } else {
    console.log(`OK ${name} (${specFields.size} spec fields, ${endpointFields.size} endpoint fields known)`);
  }
}
process.exit(failed ? 1 : 0);
