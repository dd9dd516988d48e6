// A local try-out of the test control plane (etcd + kube-apiserver on loopback):
//   npm run k8s:up [-- --dir DIR]             in the foreground until Ctrl-C (DIR kept when given)
//   npm run -s k8s:up -- --detach > k8s.env   in the background; prints `export KUBECONFIG=…`
//                                             and `export PATH=…` (kubectl, helm) on stdout
//   npm run k8s:down                          stops the background one and removes its directory
// The background one lives in DIR (default ~/.cache/understudy/local-cluster)
// until k8s:down: its kubeconfig stays valid as long as it runs.
import { spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { startCluster } from "./cluster.ts";

const USAGE = "usage: node test/env/up.ts [--dir DIR] [--detach | --stop]";
let args;
try {
  args = parseArgs({ options: { dir: { type: "string" }, detach: { type: "boolean" }, stop: { type: "boolean" }, "background-child": { type: "boolean" } } }).values;
} catch (e) {
  console.error(`${(e as Error).message}\n${USAGE}`);
  process.exit(2);
}
// UNDERSTUDY_LOCAL_CLUSTER_DIR: another default (the README's test uses its own, so a cluster of yours is left alone).
const DEFAULT_DIR = process.env.UNDERSTUDY_LOCAL_CLUSTER_DIR ?? path.join(process.env.UNDERSTUDY_CACHE ?? path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), ".cache"), "understudy"), "local-cluster");
const bgDir = path.resolve(args.dir ?? DEFAULT_DIR);
const pidFile = path.join(bgDir, "up.pid");
const envFile = path.join(bgDir, "up.env");
const logFile = path.join(bgDir, "up.log");

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function runningPid(): Promise<number | undefined> {
  const pid = Number((await readFile(pidFile, "utf8").catch(() => "")).trim());
  return pid > 0 && alive(pid) ? pid : undefined;
}

function envText(kubeconfig: string, binDir: string): string {
  return `export KUBECONFIG=${kubeconfig}\nexport PATH=${binDir}:$PATH\n`;
}

if (args.stop) {
  const pid = await runningPid();
  if (pid) {
    process.kill(pid, "SIGTERM");
    const deadline = Date.now() + 60_000;
    while (alive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 200));
    if (alive(pid)) {
      console.error(`[k8s] process ${pid} still runs after 60 s; not removing ${bgDir}`);
      process.exit(1);
    }
    console.error(`[k8s] stopped (process ${pid})`);
  } else console.error(`[k8s] no local cluster runs from ${bgDir}`);
  await rm(bgDir, { recursive: true, force: true });
  process.exit(0);
}

if (args.detach) {
  const pid = await runningPid();
  if (pid) {
    // Already up: print how to use it again (idempotent, like the first time).
    process.stdout.write(await readFile(envFile, "utf8"));
    console.error(`[k8s] already running (process ${pid}, ${bgDir}); stop it with: npm run k8s:down`);
    process.exit(0);
  }
  await rm(bgDir, { recursive: true, force: true });
  await mkdir(bgDir, { recursive: true, mode: 0o700 });
  const fd = openSync(logFile, "a");
  const child = spawn(process.execPath, [fileURLToPath(import.meta.url), "--dir", bgDir, "--background-child"], { detached: true, stdio: ["ignore", fd, fd] });
  closeSync(fd);
  child.unref();
  await writeFile(pidFile, `${child.pid}\n`);
  const deadline = Date.now() + 600_000;
  for (;;) {
    const env = await readFile(envFile, "utf8").catch(() => "");
    if (env) {
      process.stdout.write(env);
      console.error(`[k8s] control plane runs in the background (process ${child.pid}, logs in ${bgDir}); stop it with: npm run k8s:down`);
      process.exit(0);
    }
    if (child.exitCode !== null || !alive(child.pid!) || Date.now() > deadline) {
      const log = await readFile(logFile, "utf8").catch(() => "");
      console.error(`[k8s] the control plane did not come up${Date.now() > deadline ? " within 10 minutes" : ""}; ${logFile} ends with:\n${log.trimEnd().split("\n").slice(-30).join("\n")}`);
      process.exit(1);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

const t0 = Date.now();
const dir = args["background-child"] ? bgDir : args.dir;
const cluster = await startCluster({ ...(dir !== undefined && { dir }), log: (s) => console.error(`[k8s] ${s}`) });
if (args["background-child"]) await writeFile(envFile, envText(cluster.kubeconfig, cluster.binDir));
else {
  process.stdout.write(envText(cluster.kubeconfig, cluster.binDir));
  console.error(`# control plane up in ${((Date.now() - t0) / 1000).toFixed(1)} s; Ctrl-C stops it${dir ? "" : " and removes " + cluster.dir}`);
}
console.error(`# server ${cluster.server}  (logs: ${cluster.dir}/kube-apiserver.log, ${cluster.dir}/etcd.log)
# no kubelet or controller-manager: objects are stored, no Pod ever runs, and
# namespaces get no \`default\` ServiceAccount (create your own).`);

let stopping = false;
const shutdown = (sig: string) => {
  if (stopping) return;
  stopping = true;
  console.error(`[k8s] ${sig}: stopping`);
  cluster.stop().then(
    () => process.exit(0),
    (e: unknown) => {
      console.error(e);
      process.exit(1);
    },
  );
};
process.on("SIGINT", () => shutdown("SIGINT"));
process.on("SIGTERM", () => shutdown("SIGTERM"));
// keep the event loop alive until a signal arrives
setInterval(() => {}, 1 << 30);
