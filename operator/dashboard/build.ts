// `npm run dashboard:build`: bundles the page (ui/app.ts with Preact and htm)
// into static/app.js with esbuild, minified, the libraries' licence comments
// kept. The output is committed, so the operator (and its image) serve it
// without a build step; CI rebuilds it and fails if it differs (dashboard:check).
import { build } from "esbuild";
import { statSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const here = (p: string) => fileURLToPath(new URL(p, import.meta.url));
const out = here("./static/app.js");
await build({
  entryPoints: [here("./ui/app.ts")],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["es2022"],
  legalComments: "eof",
  charset: "utf8",
  outfile: out,
  logLevel: "warning",
});
const size = statSync(out).size;
process.stdout.write(`operator/dashboard/static/app.js: ${(size / 1024).toFixed(1)} KiB, ${(gzipSync(readFileSync(out), { level: 9 }).length / 1024).toFixed(1)} KiB gzipped\n`);
