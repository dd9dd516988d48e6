// A real Kubernetes control plane for tests and local try-outs: etcd and
// kube-apiserver on loopback, set up the way controller-runtime's envtest does
// (no kubelet, no controller-manager, no scheduler), but with RBAC enforced and
// real ServiceAccount tokens, so a test can prove that a chart's RBAC is enough
// by running the operator with its ServiceAccount's token.
import { spawn, type ChildProcess } from "node:child_process";
import { generateKeyPair as generateKeyPairCb } from "node:crypto";
import { accessSync, constants as fsConstants, openSync, closeSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { createServer, type Server } from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import YAML from "yaml";
import { newCA, signLeaf } from "../../common/tls.ts";
import { SETPRIV, installExitHook, live, removeOnExit } from "./exit-cleanup.ts";

const BUILD_SCRIPT = fileURLToPath(new URL("./build-k8s.sh", import.meta.url));
const BINARIES = ["etcd", "kube-apiserver", "kubectl", "helm"] as const;
/** a cold kube-apiserver on 2 busy cores can take a while to run all its post-start hooks */
const START_TIMEOUT_MS = 120_000;
const STOP_TIMEOUT_MS = 15_000;
const RUN_TIMEOUT_MS = 120_000;
/** validity of the cluster's CAs and certificates (they start 5 minutes in the past: see common/tls.ts) */
const CERT_DAYS = 365;
const generateKeyPair = promisify(generateKeyPairCb);

export interface RunResult {
  stdout: string;
  stderr: string;
  /** exit code; 128+signal number if killed by a signal (as a shell reports it) */
  code: number;
}

export interface RunOptions {
  /** written to the command's stdin */
  input?: string;
  /** use this kubeconfig instead of the admin one (e.g. one from writeKubeconfigForToken) */
  kubeconfig?: string;
  /** kill the command after this long (default 120 s); it then reports code 124 like timeout(1) */
  timeoutMs?: number;
}

export interface StartOptions {
  /** where certificates, keys, etcd data and logs go; default a fresh understudy-k8s-* temp dir */
  dir?: string;
  /** progress messages (build, start); default silent */
  log?: (s: string) => void;
  /** keep `dir` after stop() (also: UNDERSTUDY_KEEP_K8S=1) */
  keep?: boolean;
  /** deadline for the control plane to become ready (default 120 s) */
  startTimeoutMs?: number;
}

export interface Cluster {
  dir: string;
  /** https://127.0.0.1:<port> */
  server: string;
  /** kubeconfig of a cluster admin (client certificate with O=system:masters) */
  kubeconfig: string;
  /** the CA that signed the apiserver's serving certificate (what a client must trust) */
  caFile: string;
  /** holds etcd, kube-apiserver, kubectl and helm */
  binDir: string;
  /** run kubectl (admin kubeconfig unless opts.kubeconfig); never throws on a non-zero exit */
  kubectl(args: string[], opts?: RunOptions): Promise<RunResult>;
  /** run helm with its cache/config/data homes inside `dir`; never throws on a non-zero exit */
  helm(args: string[], opts?: RunOptions): Promise<RunResult>;
  /** a ServiceAccount token from the TokenRequest API (`kubectl create token`); default 1 h, minimum 600 s */
  createToken(namespace: string, serviceAccount: string, seconds?: number): Promise<string>;
  /** write a kubeconfig that authenticates with `token` and trusts the cluster CA; returns `file` */
  writeKubeconfigForToken(token: string, file: string): Promise<string>;
  /** SIGTERM kube-apiserver then etcd (SIGKILL after 15 s each); remove `dir` unless kept. Idempotent. */
  stop(): Promise<void>;
}

// ---------------------------------------------------------------------------
// binaries

/**
 * The bin dir of build-k8s.sh, which returns at once (without needing Go) when the
 * binaries are cached, and otherwise builds them: many minutes the first time, so CI
 * should run it before the tests rather than inside a test's timeout.
 */
export async function ensureBinaries(log: (s: string) => void = () => {}): Promise<string> {
  const built = await run("bash", [BUILD_SCRIPT], { env: process.env, timeoutMs: 60 * 60_000, onStderrLine: log });
  const dir = built.stdout.trim().split("\n").pop() ?? "";
  if (built.code !== 0 || !BINARIES.every((b) => isExecutable(path.join(dir, b)))) {
    throw new Error(`${BUILD_SCRIPT} failed (exit ${built.code}):\n${tail(built.stderr, 40)}`);
  }
  return dir;
}

function isExecutable(file: string): boolean {
  try {
    accessSync(file, fsConstants.X_OK);
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------
// child processes

interface RunInternal {
  env: NodeJS.ProcessEnv;
  input?: string;
  timeoutMs?: number;
  onStderrLine?: (s: string) => void;
}

/** Run a command to completion; resolves whatever the exit code (spawn failures become code 127). */
function run(bin: string, args: string[], o: RunInternal): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(bin, args, { env: o.env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    let partial = "";
    let timedOut = false;
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => {
      stderr += d;
      if (!o.onStderrLine) return;
      const lines = (partial + d).split("\n");
      partial = lines.pop() ?? "";
      for (const l of lines) o.onStderrLine(l);
    });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, o.timeoutMs ?? RUN_TIMEOUT_MS);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ stdout, stderr: `${stderr}${e.message}\n`, code: 127 });
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      if (timedOut) resolve({ stdout, stderr: `${stderr}\ntimed out after ${o.timeoutMs ?? RUN_TIMEOUT_MS} ms: ${bin} ${args.join(" ")}\n`, code: 124 });
      else resolve({ stdout, stderr, code: code ?? 128 + (signal ? (os.constants.signals[signal] ?? 0) : 0) });
    });
    // EPIPE when the command exits without reading stdin is not our failure: its exit code tells
    child.stdin.on("error", () => {});
    child.stdin.end(o.input ?? "");
  });
}

/**
 * A server process whose stdout+stderr go to `logFile`. Under setpriv --pdeathsig it
 * gets SIGKILL from the kernel when the test process dies in any way, kill -9 included,
 * so a crashed runner never leaves etcd or kube-apiserver behind holding ports.
 */
interface Daemon {
  name: string;
  child: ChildProcess;
  logFile: string;
  exited: Promise<void>;
}


function startDaemon(name: string, bin: string, args: string[], logFile: string): Daemon {
  installExitHook();
  const fd = openSync(logFile, "a");
  const [cmd, argv] = SETPRIV ? [SETPRIV, ["--pdeathsig", "KILL", "--", bin, ...args]] : [bin, args];
  let child: ChildProcess;
  try {
    // own session: a Ctrl-C in the terminal reaches only us, and stop() shuts down in order
    child = spawn(cmd, argv, { stdio: ["ignore", fd, fd], detached: true });
  } finally {
    closeSync(fd); // the child has its own copy
  }
  // a test that forgets stop() must still let the process exit (the exit hook then kills)
  child.unref();
  live.add(child);
  const exited = new Promise<void>((resolve) => {
    child.once("exit", () => {
      live.delete(child);
      resolve();
    });
    child.once("error", () => {
      live.delete(child);
      resolve();
    });
  });
  return { name, child, logFile, exited };
}

/**
 * When the test process dies without running its exit hook (kill -9, an unhandled
 * SIGINT), pdeathsig kills the daemons but nobody would remove `dir`, which holds
 * etcd's 64 MB preallocated WAL. A detached shell waits for our pid to vanish and
 * removes it then. stop() and the exit hook kill the reaper, having cleaned up themselves.
 */
function startReaper(dir: string): ChildProcess {
  const script = 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; sleep 1; rm -rf -- "$2"';
  const reaper = spawn("sh", ["-c", script, "understudy-k8s-reaper", String(process.pid), dir], { stdio: "ignore", detached: true });
  reaper.on("error", () => {}); // without sh there is only the exit hook
  reaper.unref();
  return reaper;
}

function running(d: Daemon): boolean {
  return d.child.exitCode === null && d.child.signalCode === null && live.has(d.child);
}

async function stopDaemon(d: Daemon): Promise<void> {
  if (!running(d)) return;
  d.child.kill("SIGTERM");
  const t = setTimeout(() => d.child.kill("SIGKILL"), STOP_TIMEOUT_MS);
  await d.exited;
  clearTimeout(t);
}

async function logTail(d: Daemon, lines = 30): Promise<string> {
  return tail(await readFile(d.logFile, "utf8").catch(() => ""), lines);
}

function tail(s: string, lines: number): string {
  return s.trimEnd().split("\n").slice(-lines).join("\n");
}

// ---------------------------------------------------------------------------
// ports and probes

/** Several distinct free loopback ports: all held open together, so none is handed out twice. */
async function freePorts(n: number): Promise<number[]> {
  const servers: Server[] = [];
  try {
    const ports: number[] = [];
    for (let i = 0; i < n; i++) {
      const s = createServer();
      servers.push(s);
      await new Promise<void>((resolve, reject) => s.once("error", reject).listen(0, "127.0.0.1", resolve));
      const a = s.address();
      if (typeof a !== "object" || !a) throw new Error("freePorts: no address");
      ports.push(a.port);
    }
    return ports;
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

interface HttpReply {
  status: number;
  body: string;
}

function httpGet(url: string, tls?: { ca: string; cert: string; key: string }): Promise<HttpReply> {
  return new Promise((resolve, reject) => {
    const req = (tls ? httpsRequest : httpRequest)(url, { method: "GET", timeout: 3000, ...tls }, (res) => {
      let body = "";
      res.setEncoding("utf8").on("data", (d: string) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error("request timed out")));
    req.on("error", reject);
    req.end();
  });
}

/**
 * Poll until `probe` returns a non-empty string (the success note), the daemon exits, or the
 * deadline passes; failures carry the last probe result and the daemon's log tail.
 */
async function waitUntil(what: string, d: Daemon, deadline: number, probe: () => Promise<string | undefined>): Promise<void> {
  let last = "";
  for (;;) {
    if (!running(d)) throw new Error(`${d.name} exited (code ${d.child.exitCode ?? d.child.signalCode}) before ${what}; ${d.logFile} ends with:\n${await logTail(d)}`);
    try {
      if (await probe()) return;
      last = "";
    } catch (e) {
      last = (e as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? ` (last: ${last})` : ""}; ${d.logFile} ends with:\n${await logTail(d)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

// ---------------------------------------------------------------------------
// certificates and keys

interface Pki {
  ca: string;
  servingCert: string;
  servingKey: string;
  clientCA: string;
  adminCert: string;
  adminKey: string;
  saPub: string;
  saKey: string;
}

/** Separate serving and client CAs, as in a kubeadm cluster: trusting the server must not let anyone mint client identities. */
async function writePki(dir: string): Promise<Pki> {
  const pki = path.join(dir, "pki");
  await mkdir(pki, { recursive: true, mode: 0o700 });
  const f = (n: string) => path.join(pki, n);
  const files: Pki = {
    ca: f("ca.crt"),
    servingCert: f("apiserver.crt"),
    servingKey: f("apiserver.key"),
    clientCA: f("client-ca.crt"),
    adminCert: f("admin.crt"),
    adminKey: f("admin.key"),
    saPub: f("sa.pub"),
    saKey: f("sa.key"),
  };
  const [ca, clientCA, sa] = await Promise.all([
    newCA("understudy-k8s CA", CERT_DAYS),
    newCA("understudy-k8s client CA", CERT_DAYS),
    // RSA: what every Kubernetes version and every JWT library accepts for ServiceAccount tokens
    generateKeyPair("rsa", { modulusLength: 2048, publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs8", format: "pem" } }),
  ]);
  const serving = await signLeaf(ca, { commonName: "kube-apiserver", usage: "server", sans: [{ type: "ip", value: "127.0.0.1" }, { type: "dns", value: "localhost" }], days: CERT_DAYS });
  // Kubernetes maps a client certificate's CN to the user name and each O to a group
  const admin = await signLeaf(clientCA, { commonName: "understudy-admin", organizations: ["system:masters"], usage: "client", days: CERT_DAYS });
  const w = (file: string, data: string, mode = 0o600) => writeFile(file, data, { mode });
  await Promise.all([
    w(files.ca, ca.certPem, 0o644),
    w(files.servingCert, serving.certPem, 0o644),
    w(files.servingKey, serving.keyPem),
    w(files.clientCA, clientCA.certPem, 0o644),
    w(files.adminCert, admin.certPem, 0o644),
    w(files.adminKey, admin.keyPem),
    w(files.saPub, sa.publicKey, 0o644),
    w(files.saKey, sa.privateKey),
  ]);
  return files;
}

export function b64(s: string): string {
  return Buffer.from(s).toString("base64");
}

/** Credentials are embedded, so the file stays valid when copied elsewhere. */
export async function writeKubeconfig(file: string, server: string, caPem: string, user: Record<string, string>): Promise<string> {
  const cfg = {
    apiVersion: "v1",
    kind: "Config",
    clusters: [{ name: "understudy", cluster: { server, "certificate-authority-data": b64(caPem) } }],
    users: [{ name: "user", user }],
    contexts: [{ name: "understudy", context: { cluster: "understudy", user: "user" } }],
    "current-context": "understudy",
  };
  await mkdir(path.dirname(file), { recursive: true });
  await writeFile(file, YAML.stringify(cfg), { mode: 0o600 });
  return file;
}

// ---------------------------------------------------------------------------

/**
 * Build or reuse the binaries, write fresh certificates and keys into `dir`, start etcd
 * and kube-apiserver on free loopback ports, and resolve once /readyz is ok and the
 * `default` namespace exists (~3 s with cached binaries). No `default` ServiceAccount
 * will ever appear (no controller-manager): create the ServiceAccounts you need.
 */
export async function startCluster(opts: StartOptions = {}): Promise<Cluster> {
  const log = opts.log ?? (() => {});
  const started = Date.now();
  const binDir = await ensureBinaries(log);
  const bin = (b: (typeof BINARIES)[number]) => path.join(binDir, b);

  // only a directory we made is ours to delete; a caller's dir is the caller's
  const ownDir = opts.dir === undefined;
  const dir = opts.dir ? path.resolve(opts.dir) : await mkdtemp(path.join(os.tmpdir(), "understudy-k8s-"));
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const keep = opts.keep === true || process.env.UNDERSTUDY_KEEP_K8S === "1";
  const reaper = ownDir && !keep ? startReaper(dir) : undefined;
  if (reaper) {
    removeOnExit.add(dir);
    live.add(reaper);
  }

  const daemons: Daemon[] = [];
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      // apiserver first: with etcd gone first it would spend its shutdown retrying etcd
      for (const d of [...daemons].reverse()) await stopDaemon(d);
      if (reaper) {
        reaper.kill("SIGKILL");
        live.delete(reaper);
        await rm(dir, { recursive: true, force: true, maxRetries: 3 });
        removeOnExit.delete(dir);
      }
    })());

  try {
    const pki = await writePki(dir);
    const [etcdPort, peerPort, apiPort] = await freePorts(3);
    const server = `https://127.0.0.1:${apiPort}`;
    const etcdUrl = `http://127.0.0.1:${etcdPort}`;
    const peerUrl = `http://127.0.0.1:${peerPort}`;
    const deadline = Date.now() + (opts.startTimeoutMs ?? START_TIMEOUT_MS);

    const etcd = startDaemon("etcd", bin("etcd"), [
      "--name=understudy",
      `--data-dir=${path.join(dir, "etcd")}`,
      `--listen-client-urls=${etcdUrl}`,
      `--advertise-client-urls=${etcdUrl}`,
      `--listen-peer-urls=${peerUrl}`,
      `--initial-advertise-peer-urls=${peerUrl}`,
      `--initial-cluster=understudy=${peerUrl}`,
      // throw-away test data: durability is not worth an fsync per write on a slow CI disk
      "--unsafe-no-fsync=true",
    ], path.join(dir, "etcd.log"));
    daemons.push(etcd);
    await waitUntil(`etcd to be healthy at ${etcdUrl}`, etcd, deadline, async () => {
      const r = await httpGet(`${etcdUrl}/health`);
      return r.status === 200 && /"health":\s*"true"/.test(r.body) ? "ok" : undefined;
    });
    log(`etcd up on ${etcdUrl} after ${Date.now() - started} ms`);

    const apiserver = startDaemon("kube-apiserver", bin("kube-apiserver"), [
      `--etcd-servers=${etcdUrl}`,
      "--bind-address=127.0.0.1",
      "--advertise-address=127.0.0.1",
      `--secure-port=${apiPort}`,
      `--tls-cert-file=${pki.servingCert}`,
      `--tls-private-key-file=${pki.servingKey}`,
      // only read if the two files above were missing; keeps it from writing elsewhere
      `--cert-dir=${path.join(dir, "pki")}`,
      `--client-ca-file=${pki.clientCA}`,
      "--authorization-mode=RBAC",
      // there is no controller-manager to create each namespace's `default` ServiceAccount:
      // with the admission plugin on, every Pod without an explicit SA would be rejected
      "--disable-admission-plugins=ServiceAccount",
      `--service-account-issuer=${server}/`,
      `--service-account-key-file=${pki.saPub}`,
      `--service-account-signing-key-file=${pki.saKey}`,
      "--service-cluster-ip-range=10.0.0.0/24",
      "--allow-privileged=true",
      // the `kubernetes` Service's endpoints would point at 127.0.0.1, which Endpoints
      // validation rejects: the reconciler would log the same error forever
      "--endpoint-reconciler-type=none",
    ], path.join(dir, "kube-apiserver.log"));
    daemons.push(apiserver);

    const admin = { ca: await readFile(pki.ca, "utf8"), cert: await readFile(pki.adminCert, "utf8"), key: await readFile(pki.adminKey, "utf8") };
    await waitUntil(`kube-apiserver /readyz at ${server}`, apiserver, deadline, async () => {
      const r = await httpGet(`${server}/readyz`, admin);
      if (r.status === 200) return "ok";
      throw new Error(`/readyz ${r.status}: ${r.body.split("\n").filter((l) => l.includes("failed")).join("; ") || r.body.slice(0, 200)}`);
    });
    // the system namespaces controller creates `default` shortly after the server is ready
    await waitUntil("the default namespace", apiserver, deadline, async () => ((await httpGet(`${server}/api/v1/namespaces/default`, admin)).status === 200 ? "ok" : undefined));
    log(`kube-apiserver ready at ${server} after ${Date.now() - started} ms (logs in ${dir})`);

    const kubeconfig = await writeKubeconfig(path.join(dir, "admin.kubeconfig"), server, admin.ca, {
      "client-certificate-data": b64(admin.cert),
      "client-key-data": b64(admin.key),
    });

    // everything kubectl and helm would write under $HOME goes into dir instead
    const toolEnv = (kc: string): NodeJS.ProcessEnv => ({
      ...process.env,
      KUBECONFIG: kc,
      KUBECACHEDIR: path.join(dir, "kube-cache"),
      HELM_CACHE_HOME: path.join(dir, "helm", "cache"),
      HELM_CONFIG_HOME: path.join(dir, "helm", "config"),
      HELM_DATA_HOME: path.join(dir, "helm", "data"),
    });
    const tool = (b: "kubectl" | "helm") => (args: string[], o: RunOptions = {}) =>
      run(bin(b), args, { env: toolEnv(o.kubeconfig ?? kubeconfig), ...(o.input !== undefined && { input: o.input }), ...(o.timeoutMs !== undefined && { timeoutMs: o.timeoutMs }) });
    const kubectl = tool("kubectl");

    return {
      dir,
      server,
      kubeconfig,
      caFile: pki.ca,
      binDir,
      kubectl,
      helm: tool("helm"),
      async createToken(namespace, serviceAccount, seconds = 3600) {
        const r = await kubectl(["create", "token", serviceAccount, "-n", namespace, `--duration=${seconds}s`]);
        if (r.code !== 0 || r.stdout.trim() === "") throw new Error(`kubectl create token ${serviceAccount} -n ${namespace} failed (exit ${r.code}): ${r.stderr.trim()}`);
        return r.stdout.trim();
      },
      writeKubeconfigForToken: (token, file) => writeKubeconfig(file, server, admin.ca, { token }),
      stop,
    };
  } catch (e) {
    await stop();
    if (ownDir && !keep && e instanceof Error) e.message += `\n(${dir} was removed; set UNDERSTUDY_KEEP_K8S=1 to keep it)`;
    throw e;
  }
}

