#!/usr/bin/env node
// Entry point of the `understudy` command. understudy runs its TypeScript
// directly on Node 24 (type stripping); the project pins Node 24 in
// node_modules, so an older `node` on PATH hands over to that one.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const major = Number(process.versions.node.split(".")[0]);
if (major < 24) {
  const pinned = fileURLToPath(new URL("../node_modules/node/bin/node", import.meta.url));
  if (!existsSync(pinned)) {
    console.error(`understudy needs Node.js 24 or later (this is ${process.version}); run \`npm ci\` in the project to install the pinned runtime`);
    process.exit(1);
  }
  const r = spawnSync(pinned, [fileURLToPath(import.meta.url), ...process.argv.slice(2)], { stdio: "inherit" });
  process.exit(r.status ?? 1);
}
await import("../agent/cli.ts");
