// A real Kubernetes node for tests: containerd + runc + a CNI bridge, etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and a
// kubelet, all inside a network namespace the test creates (a host of a
// test/e2e/netns.ts lab, say), so pods run from images imported with `ctr`
// (nothing is ever pulled) and reach the lab's other hosts.
//
// What the node changes outside its own directory, and how stop() undoes it
// (see ../../docs/real-node-tests.md and the team notes K8S-REALNODE.md):
//   processes          every daemon by PID; the shims of its containerd (found by its socket path)
//                      and every process left in its cgroups, by PID
//   iptables, cni0     only in the node's network namespace: `kube-proxy --cleanup`, the CNI-*/KUBE-*
//                      chains flushed and deleted, cni0 deleted (the namespace is the test's to delete)
//   mounts             every mount under the node's directory and its pods' /run/netns/cni-* files, unmounted
//   cgroups            kubelet's cgroupRoot /understudy-<id> in every hierarchy, removed bottom-up
//   sysctls            the kubelet's kernel tunables (vm.overcommit_memory, kernel.panic, …) restored
//   /run/containerd/s  the shim sockets this containerd created; /var/lib/cni/results: its network's entries
// The same teardown runs synchronously from an exit hook when the test process ends without stop().
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { generateKeyPair as generateKeyPairCb, randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, readdirSync, readFileSync, rmdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { chmod, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import YAML from "yaml";
import { newCA, signLeaf, type NewCA, type San } from "../../common/tls.ts";
import { buildOciArchive } from "../../image/oci.ts";
import { b64, writeKubeconfig, type Cluster, type RunOptions, type RunResult } from "./cluster.ts";
import { SETPRIV } from "./exit-cleanup.ts";

const BUILD_SCRIPT = fileURLToPath(new URL("./build-k8s.sh", import.meta.url));
const NODE_BINARIES = ["etcd", "kube-apiserver", "kubectl", "helm", "kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "pause"];
const generateKeyPair = promisify(generateKeyPairCb);
const CERT_DAYS = 30;
/** Services: clear of the netns labs' 10.160-239.x.y/24 and of the pods' range. */
const SERVICE_CIDR = "10.96.0.0/16";
const KUBERNETES_SERVICE_IP = "10.96.0.1";
const POD_CIDR = "10.244.0.0/24";
/** What the kubelet sets at start (pkg/kubelet/cm: setupKernelTunables); stop() puts back what was there. */
const KUBELET_SYSCTLS = ["vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"];
const CGROUP_FS = "/sys/fs/cgroup";
const SHIM_SOCKETS = "/run/containerd/s";
const CNI_RESULTS = "/var/lib/cni/results";
const NETNS_DIR = "/run/netns";

export interface RealNodeOptions {
  /** the network namespace the node runs in (`ip netns add` by the test; its loopback up and an address on it) */
  netns: string;
  /** the node's address in that namespace: the API server, the kubelet and kube-proxy bind to it */
  nodeIp: string;
  /** where everything goes; default a fresh understudy-node-* temp dir (removed by stop()) */
  dir?: string;
  /** progress messages */
  log?: (s: string) => void;
  /** deadline for the node to be Ready (default 240 s) */
  startTimeoutMs?: number;
}

export interface RealNode extends Cluster {
  nodeName: string;
  /** the containerd socket (for `ctr --address`) */
  containerdSocket: string;
  /** Import an OCI/Docker image archive into the node's containerd (namespace k8s.io), unpacked for overlayfs. */
  importImage(file: string): Promise<void>;
  /** What stop() found it had to undo and whether the host is back as it was (for a test to assert on). */
  readonly cleanupReport: CleanupReport | undefined;
}

export interface CleanupReport {
  /** problems left (empty: the host is as before start) */
  leftovers: string[];
  /** what was undone */
  undone: string[];
}

// ---------------------------------------------------------------------------

function sh(cmd: string, args: string[], o: { input?: string; timeoutMs?: number } = {}): RunResult {
  try {
    const stdout = execFileSync(cmd, args, { encoding: "utf8", input: o.input ?? "", timeout: o.timeoutMs ?? 30_000, stdio: ["pipe", "pipe", "pipe"], maxBuffer: 64 << 20 });
    return { stdout, stderr: "", code: 0 };
  } catch (e) {
    const err = e as { status?: number | null; stdout?: string; stderr?: string; message: string };
    return { stdout: err.stdout ?? "", stderr: err.stderr ?? err.message, code: err.status ?? 127 };
  }
}

function runAsync(bin: string, args: string[], o: { env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = spawn(bin, args, { env: o.env ?? process.env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), o.timeoutMs ?? 120_000);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ stdout, stderr: stderr + e.message, code: 127 });
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ stdout, stderr, code: code ?? 128 + (signal ? (os.constants.signals[signal] ?? 0) : 0) });
    });
    child.stdin.on("error", () => {});
    child.stdin.end(o.input ?? "");
  });
}

function listDir(d: string): string[] {
  try {
    return readdirSync(d);
  } catch {
    return [];
  }
}

function readSysctl(k: string): string | undefined {
  try {
    return readFileSync(path.join("/proc/sys", k), "utf8").trim();
  } catch {
    return undefined;
  }
}

/** Mount points (decoded) from /proc/self/mountinfo. */
function mountPoints(): string[] {
  return readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => l.split(" ")[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
}

/** The cgroup hierarchies mounted under /sys/fs/cgroup (v1 controllers and the v2 one). */
function cgroupMounts(): string[] {
  return mountPoints().filter((m) => m.startsWith(`${CGROUP_FS}/`) && m.split("/").length === 5);
}

/** pids of processes whose command line mentions `needle`. */
function pidsMentioning(needle: string): number[] {
  const out: number[] = [];
  for (const e of listDir("/proc")) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${e}/cmdline`, "utf8").includes(needle)) out.push(Number(e));
    } catch {
      // gone
    }
  }
  return out;
}

function kill(pid: number, sig: NodeJS.Signals = "SIGKILL"): void {
  try {
    process.kill(pid, sig);
  } catch {
    // gone
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return !readFileSync(`/proc/${pid}/stat`, "utf8").includes(") Z ");
  } catch {
    return false;
  }
}

/** Every pid in a cgroup directory tree. */
function cgroupPids(dir: string): number[] {
  const pids: number[] = [];
  const walk = (d: string) => {
    try {
      for (const l of readFileSync(path.join(d, "cgroup.procs"), "utf8").split("\n")) if (l) pids.push(Number(l));
    } catch {
      return;
    }
    for (const e of listDir(d)) {
      try {
        if (statSync(path.join(d, e)).isDirectory()) walk(path.join(d, e));
      } catch {
        // gone
      }
    }
  };
  walk(dir);
  return pids;
}

/** rmdir a cgroup tree bottom-up; false if something stays. */
function removeCgroupTree(dir: string): boolean {
  if (!existsSync(dir)) return true;
  let ok = true;
  for (const e of listDir(dir)) {
    const p = path.join(dir, e);
    try {
      if (statSync(p).isDirectory()) ok = removeCgroupTree(p) && ok;
    } catch {
      // gone
    }
  }
  try {
    rmdirSync(dir);
  } catch {
    ok = false;
  }
  return ok;
}

// ---------------------------------------------------------------------------

interface HostSnapshot {
  sysctls: Record<string, string>;
  shimSockets: Set<string>;
  netns: Set<string>;
  runContainerdExisted: boolean;
  cniResultsExisted: boolean;
  varLibCniExisted: boolean;
}

interface Daemon {
  name: string;
  child: ChildProcess;
  pid: number;
  exited: Promise<void>;
}

class NodeProcs {
  readonly o: RealNodeOptions;
  readonly dir: string;
  readonly binDir: string;
  readonly id = randomBytes(3).toString("hex");
  readonly nodeName: string;
  readonly cniNetwork: string;
  readonly cgroupRoot: string;
  readonly daemons: Daemon[] = [];
  snapshot!: HostSnapshot;
  report: CleanupReport | undefined;
  private tornDown = false;

  constructor(o: RealNodeOptions, dir: string, binDir: string) {
    this.o = o;
    this.dir = dir;
    this.binDir = binDir;
    this.nodeName = `understudy-node-${this.id}`;
    this.cniNetwork = `understudy-${this.id}`;
    this.cgroupRoot = `/understudy-${this.id}`;
  }

  get sock(): string {
    return path.join(this.dir, "containerd", "containerd.sock");
  }

  bin(b: string): string {
    return path.join(this.binDir, b);
  }

  takeSnapshot(): void {
    const sysctls: Record<string, string> = {};
    for (const k of KUBELET_SYSCTLS) {
      const v = readSysctl(k);
      if (v !== undefined) sysctls[k] = v;
    }
    this.snapshot = {
      sysctls,
      shimSockets: new Set(listDir(SHIM_SOCKETS)),
      netns: new Set(listDir(NETNS_DIR)),
      runContainerdExisted: existsSync("/run/containerd"),
      cniResultsExisted: existsSync(CNI_RESULTS),
      varLibCniExisted: existsSync("/var/lib/cni"),
    };
  }

  /** A daemon in the node's network namespace (nsenter: only the network, not the mounts), killed by the kernel if we die. */
  start(name: string, bin: string, args: string[]): Daemon {
    const logFile = path.join(this.dir, "logs", `${name}.log`);
    const fd = openSync(logFile, "a");
    const argv = ["--net=" + path.join(NETNS_DIR, this.o.netns), "--", ...(SETPRIV ? [SETPRIV, "--pdeathsig", "KILL", "--"] : []), bin, ...args];
    let child: ChildProcess;
    try {
      child = spawn("nsenter", argv, { stdio: ["ignore", fd, fd], detached: true, env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", HOME: this.dir } });
    } finally {
      closeSync(fd);
    }
    child.unref();
    const exited = new Promise<void>((resolve) => {
      child.once("exit", () => resolve());
      child.once("error", () => resolve());
    });
    const d: Daemon = { name, child, pid: child.pid ?? -1, exited };
    this.daemons.push(d);
    return d;
  }

  /** Run a command in the node's network namespace. */
  inNs(cmd: string, args: string[], timeoutMs = 60_000): RunResult {
    return sh("nsenter", ["--net=" + path.join(NETNS_DIR, this.o.netns), "--", cmd, ...args], { timeoutMs });
  }

  async logTail(name: string, lines = 30): Promise<string> {
    const s = await readFile(path.join(this.dir, "logs", `${name}.log`), "utf8").catch(() => "");
    return s.trimEnd().split("\n").slice(-lines).join("\n");
  }

  async waitFor<T>(what: string, deadline: number, watch: Daemon[], probe: () => Promise<T | undefined> | T | undefined): Promise<T> {
    let last = "";
    for (;;) {
      for (const d of watch) if (d.child.exitCode !== null || d.child.signalCode !== null) throw new Error(`${d.name} exited (${d.child.exitCode ?? d.child.signalCode}) before ${what}; its log ends with:\n${await this.logTail(d.name)}`);
      try {
        const r = await probe();
        if (r !== undefined && r !== false) return r;
      } catch (e) {
        last = (e as Error).message;
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? ` (last: ${last})` : ""}; logs in ${path.join(this.dir, "logs")}; ${watch.at(-1)?.name ?? ""} log ends with:\n${watch.length ? await this.logTail(watch.at(-1)!.name) : ""}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }

  /**
   * Undo everything (synchronous, so the exit hook can run it too). `graceful`:
   * daemons get SIGTERM first. Returns what was undone and what could not be.
   */
  teardown(graceful: boolean): CleanupReport {
    const undone: string[] = [];
    const leftovers: string[] = [];
    if (this.tornDown) return this.report ?? { undone, leftovers };
    this.tornDown = true;
    const waitGone = (pids: number[], ms: number) => {
      const until = Date.now() + ms;
      while (pids.some(alive) && Date.now() < until) sh("sleep", ["0.1"]);
      return pids.filter(alive);
    };
    // 1. daemons, kubelet first, containerd last (by PID)
    const order = ["kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "containerd"];
    for (const name of order) {
      for (const d of this.daemons.filter((x) => x.name === name)) {
        if (!alive(d.pid)) continue;
        kill(d.pid, graceful ? "SIGTERM" : "SIGKILL");
        for (const p of waitGone([d.pid], graceful ? 10_000 : 2_000)) kill(p);
        waitGone([d.pid], 2_000);
        undone.push(`stopped ${name} (pid ${d.pid})`);
      }
    }
    // 2. the shims of this containerd and whatever still runs in the pods' cgroups
    const shims = pidsMentioning(this.sock);
    for (const p of shims) kill(p);
    if (shims.length) undone.push(`killed ${shims.length} containerd shim(s) (pids ${shims.join(", ")})`);
    const hierarchies = cgroupMounts();
    for (let round = 0; round < 5; round++) {
      const pids = [...new Set(hierarchies.flatMap((h) => cgroupPids(path.join(h, this.cgroupRoot))))];
      if (!pids.length) break;
      for (const p of pids) kill(p);
      undone.push(`killed ${pids.length} container process(es) left in ${this.cgroupRoot} (pids ${pids.join(", ")})`);
      waitGone(pids, 3_000);
    }
    // 3. iptables chains and cni0 in the node's namespace (kube-proxy's own cleanup first)
    if (existsSync(path.join(NETNS_DIR, this.o.netns))) {
      const kp = this.inNs(this.bin("kube-proxy"), ["--cleanup"]);
      undone.push(`kube-proxy --cleanup: exit ${kp.code}`);
      for (const [ipt, table] of ["iptables", "ip6tables"].flatMap((t) => ["filter", "nat", "mangle", "raw"].map((tb) => [t, tb] as const))) {
        const rules = this.inNs(ipt, ["-w", "-t", table, "-S"]);
        if (rules.code !== 0) continue;
        const lines = rules.stdout.split("\n");
        // rules in built-in chains that jump to our chains go first, then the chains
        for (const l of lines) {
          const m = /^-A (\S+) (.*-j (?:KUBE-|CNI-)\S*.*)$/.exec(l);
          if (m && !/^(KUBE-|CNI-)/.test(m[1]!)) this.inNs("sh", ["-c", `${ipt} -w -t ${table} -D ${m[1]} ${m[2]}`]);
        }
        const chains = lines.map((l) => /^-N ((?:KUBE-|CNI-)\S+)$/.exec(l)?.[1]).filter((c): c is string => !!c);
        for (const c of chains) this.inNs(ipt, ["-w", "-t", table, "-F", c]);
        for (const c of chains) this.inNs(ipt, ["-w", "-t", table, "-X", c]);
        if (chains.length) undone.push(`${ipt} -t ${table}: deleted ${chains.length} KUBE-/CNI- chains`);
        const left = this.inNs(ipt, ["-w", "-t", table, "-S"]).stdout.split("\n").filter((l) => /KUBE-|CNI-/.test(l));
        if (left.length) leftovers.push(`${ipt} -t ${table} in ${this.o.netns}: ${left.join("; ")}`);
      }
      if (this.inNs("ip", ["link", "show", "cni0"]).code === 0) {
        this.inNs("ip", ["link", "del", "cni0"]);
        undone.push("deleted cni0");
      }
    }
    // 4. mounts: under our directory, and the pods' network namespaces
    const newNetns = listDir(NETNS_DIR).filter((n) => n.startsWith("cni-") && !this.snapshot.netns.has(n));
    const ours = (m: string) => m === this.dir || m.startsWith(`${this.dir}/`) || newNetns.some((n) => m === path.join(NETNS_DIR, n));
    for (let round = 0; round < 3; round++) {
      const mounts = mountPoints().filter(ours).sort((a, b) => b.length - a.length);
      if (!mounts.length) break;
      for (const m of mounts) if (sh("umount", [m]).code !== 0) sh("umount", ["-l", m]);
      undone.push(`unmounted ${mounts.length} mount(s)`);
    }
    for (const m of mountPoints().filter(ours)) leftovers.push(`mount ${m}`);
    for (const n of newNetns) {
      rmSync(path.join(NETNS_DIR, n), { force: true });
      undone.push(`removed ${NETNS_DIR}/${n}`);
    }
    // 5. cgroups
    for (const h of hierarchies) {
      const d = path.join(h, this.cgroupRoot);
      if (!existsSync(d)) continue;
      if (removeCgroupTree(d)) undone.push(`removed cgroup ${d}`);
      else leftovers.push(`cgroup ${d}`);
    }
    // 6. sysctls
    for (const [k, v] of Object.entries(this.snapshot.sysctls)) {
      if (readSysctl(k) === v) continue;
      try {
        writeFileSync(path.join("/proc/sys", k), v);
        undone.push(`restored ${k.replaceAll("/", ".")}=${v}`);
      } catch (e) {
        leftovers.push(`sysctl ${k}: ${(e as Error).message}`);
      }
    }
    // 7. what containerd 1.6 and libcni keep outside our directory
    const sockets = listDir(SHIM_SOCKETS).filter((s) => !this.snapshot.shimSockets.has(s));
    for (const s of sockets) rmSync(path.join(SHIM_SOCKETS, s), { force: true });
    if (sockets.length) undone.push(`removed ${sockets.length} shim socket(s) in ${SHIM_SOCKETS}`);
    const results = listDir(CNI_RESULTS).filter((r) => r.startsWith(`${this.cniNetwork}-`));
    for (const r of results) rmSync(path.join(CNI_RESULTS, r), { force: true });
    if (results.length) undone.push(`removed ${results.length} CNI result(s) in ${CNI_RESULTS}`);
    const rmEmpty = (d: string) => {
      try {
        rmdirSync(d);
        undone.push(`removed ${d}`);
      } catch {
        // not empty, or not there
      }
    };
    if (!this.snapshot.runContainerdExisted) {
      rmEmpty(SHIM_SOCKETS);
      rmEmpty("/run/containerd");
    }
    if (!this.snapshot.cniResultsExisted) rmEmpty(CNI_RESULTS);
    if (!this.snapshot.varLibCniExisted) rmEmpty("/var/lib/cni");
    // 8. nothing of ours may run any more
    const stragglers = [...this.daemons.map((d) => d.pid).filter(alive), ...pidsMentioning(this.sock)];
    for (const p of stragglers) leftovers.push(`process ${p} still runs`);
    this.report = { undone, leftovers };
    return this.report;
  }
}

const liveNodes = new Set<NodeProcs>();
let hookInstalled = false;
function installHook(): void {
  if (hookInstalled) return;
  hookInstalled = true;
  const teardownAll = () => {
    for (const n of [...liveNodes]) {
      n.teardown(false);
      rmSync(n.dir, { recursive: true, force: true });
      liveNodes.delete(n);
    }
  };
  process.on("exit", teardownAll);
  // a signal ends the process without 'exit': undo first, then die of it as we would have
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    const onSignal = () => {
      teardownAll();
      process.off(sig, onSignal);
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

// ---------------------------------------------------------------------------

async function clientKubeconfig(file: string, server: string, ca: NewCA, clientCA: NewCA, cn: string, orgs: string[] = []): Promise<string> {
  const c = await signLeaf(clientCA, { commonName: cn, organizations: orgs, usage: "client", days: CERT_DAYS });
  return writeKubeconfig(file, server, ca.certPem, { "client-certificate-data": b64(c.certPem), "client-key-data": b64(c.keyPem) });
}

/** The pause image (the sandbox's process), from the pause binary build-k8s.sh compiled: one file, statically linked. */
async function pauseImage(binDir: string, dir: string, name: string): Promise<string> {
  const rootfs = path.join(dir, "pause-rootfs");
  await mkdir(rootfs, { recursive: true });
  await writeFile(path.join(rootfs, "pause"), await readFile(path.join(binDir, "pause")), { mode: 0o755 });
  const out = path.join(dir, "pause.oci.tar");
  await buildOciArchive(rootfs, out, { name, epoch: 1, user: "65535:65535", entrypoint: ["/pause"], createdBy: "test/env/realnode.ts: build/pause/linux/pause.c, gcc -static" });
  await rm(rootfs, { recursive: true });
  return out;
}

export async function ensureNodeBinaries(log: (s: string) => void = () => {}): Promise<string> {
  const r = await runAsync("bash", [BUILD_SCRIPT, "--node"], { timeoutMs: 60 * 60_000 });
  const dir = r.stdout.trim().split("\n").pop() ?? "";
  if (r.code !== 0 || !NODE_BINARIES.every((b) => existsSync(path.join(dir, b)))) throw new Error(`${BUILD_SCRIPT} --node failed (exit ${r.code}):\n${r.stderr.split("\n").slice(-40).join("\n")}`);
  log(`node binaries in ${dir}`);
  return dir;
}

/**
 * Start a node in `o.netns` at `o.nodeIp`: containerd, etcd, the control plane,
 * kube-proxy and a kubelet; resolves when the node is Ready and the pause image
 * is imported. stop() undoes everything (see the top of this file).
 */
export async function startRealNode(o: RealNodeOptions): Promise<RealNode> {
  const log = o.log ?? (() => {});
  const t0 = Date.now();
  if (process.getuid?.() !== 0) throw new Error("a real node needs root (containerd, runc, cgroups, mounts)");
  for (const [cmd, pkg] of [["containerd", "containerd"], ["runc", "runc"], ["ctr", "containerd"], ["nsenter", "util-linux"], ["iptables", "iptables"]] as const) {
    if (sh("sh", ["-c", `command -v ${cmd}`]).code !== 0) throw new Error(`${cmd} is not installed (apt-get install ${pkg})`);
  }
  const cniBin = ["/usr/lib/cni", "/opt/cni/bin"].find((d) => existsSync(path.join(d, "bridge")));
  if (!cniBin) throw new Error("no CNI plugins in /usr/lib/cni or /opt/cni/bin (apt-get install containernetworking-plugins)");
  if (!existsSync(path.join(NETNS_DIR, o.netns))) throw new Error(`no network namespace ${o.netns} (${NETNS_DIR}/${o.netns})`);
  const binDir = await ensureNodeBinaries(log);
  const ownDir = o.dir === undefined;
  const dir = o.dir ? path.resolve(o.dir) : await mkdtemp(path.join(os.tmpdir(), "understudy-node-"));
  for (const d of ["logs", "pki", "containerd", "cni/net.d", "cni/ipam", "kubelet", "etcd", "kcm"]) await mkdir(path.join(dir, d), { recursive: true, mode: 0o700 });
  // containers read their volumes through this path: it must be traversable by the pods' users
  await rm(path.join(dir, "kubelet"), { recursive: true });
  await mkdir(path.join(dir, "kubelet"), { mode: 0o755 });
  await chmod(dir, 0o755);

  const node = new NodeProcs(o, dir, binDir);
  node.takeSnapshot();
  installHook();
  liveNodes.add(node);
  const deadline = Date.now() + (o.startTimeoutMs ?? 240_000);
  const ip = o.nodeIp;
  const server = `https://${ip}:6443`;
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      // pods first, through the kubelet, so their sandboxes' networks are torn down by CNI
      if (node.daemons.some((d) => d.name === "kubelet" && alive(d.pid)) && existsSync(path.join(dir, "admin.kubeconfig"))) {
        const kc = ["--kubeconfig", path.join(dir, "admin.kubeconfig")];
        // owners first, or they would make new pods
        await runAsync(node.bin("kubectl"), [...kc, "delete", "deployments,replicasets,statefulsets,daemonsets,jobs", "--all", "--all-namespaces", "--wait=false"], { timeoutMs: 30_000 });
        await runAsync(node.bin("kubectl"), [...kc, "delete", "pods", "--all", "--all-namespaces", "--grace-period=5", "--wait=false"], { timeoutMs: 30_000 });
        const until = Date.now() + 60_000;
        while (Date.now() < until) {
          const r = await runAsync("ctr", ["--address", node.sock, "-n", "k8s.io", "tasks", "ls", "-q"], { timeoutMs: 15_000 });
          if (r.code === 0 && r.stdout.trim() === "") break;
          await new Promise((res) => setTimeout(res, 500));
        }
      }
      node.teardown(true);
      liveNodes.delete(node);
      if (ownDir) await rm(dir, { recursive: true, force: true, maxRetries: 3 });
      log(`node stopped; ${node.report?.undone.length ?? 0} things undone, leftovers: ${node.report?.leftovers.join("; ") || "none"}`);
    })());

  try {
    // ---- certificates
    const pki = path.join(dir, "pki");
    const [ca, clientCA, sa] = await Promise.all([
      newCA("understudy-node CA", CERT_DAYS),
      newCA("understudy-node client CA", CERT_DAYS),
      generateKeyPair("rsa", { modulusLength: 2048, publicKeyEncoding: { type: "spki", format: "pem" }, privateKeyEncoding: { type: "pkcs8", format: "pem" } }),
    ]);
    const apiserverCert = await signLeaf(ca, {
      commonName: "kube-apiserver",
      usage: "server",
      days: CERT_DAYS,
      sans: [
        ...[ip, KUBERNETES_SERVICE_IP, "127.0.0.1"].map((value): San => ({ type: "ip", value })),
        ...["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"].map((value): San => ({ type: "dns", value })),
      ],
    });
    const kubeletServing = await signLeaf(ca, { commonName: node.nodeName, usage: "server", days: CERT_DAYS, sans: [{ type: "ip", value: ip }, { type: "dns", value: node.nodeName }] });
    const apiToKubelet = await signLeaf(clientCA, { commonName: "kube-apiserver-kubelet-client", organizations: ["system:masters"], usage: "client", days: CERT_DAYS });
    const f = (n: string) => path.join(pki, n);
    await Promise.all([
      writeFile(f("ca.crt"), ca.certPem, { mode: 0o644 }),
      writeFile(f("client-ca.crt"), clientCA.certPem, { mode: 0o644 }),
      writeFile(f("apiserver.crt"), apiserverCert.certPem),
      writeFile(f("apiserver.key"), apiserverCert.keyPem, { mode: 0o600 }),
      writeFile(f("kubelet.crt"), kubeletServing.certPem),
      writeFile(f("kubelet.key"), kubeletServing.keyPem, { mode: 0o600 }),
      writeFile(f("apiserver-kubelet-client.crt"), apiToKubelet.certPem),
      writeFile(f("apiserver-kubelet-client.key"), apiToKubelet.keyPem, { mode: 0o600 }),
      writeFile(f("sa.pub"), sa.publicKey),
      writeFile(f("sa.key"), sa.privateKey, { mode: 0o600 }),
    ]);
    const adminCert = await signLeaf(clientCA, { commonName: "understudy-admin", organizations: ["system:masters"], usage: "client", days: CERT_DAYS });
    const adminKc = await writeKubeconfig(path.join(dir, "admin.kubeconfig"), server, ca.certPem, { "client-certificate-data": b64(adminCert.certPem), "client-key-data": b64(adminCert.keyPem) });
    const kubeletKc = await clientKubeconfig(path.join(dir, "kubelet.kubeconfig"), server, ca, clientCA, `system:node:${node.nodeName}`, ["system:nodes"]);
    const kcmKc = await clientKubeconfig(path.join(dir, "kcm.kubeconfig"), server, ca, clientCA, "system:kube-controller-manager");
    const schedKc = await clientKubeconfig(path.join(dir, "scheduler.kubeconfig"), server, ca, clientCA, "system:kube-scheduler");
    const proxyKc = await clientKubeconfig(path.join(dir, "proxy.kubeconfig"), server, ca, clientCA, "system:kube-proxy");

    // ---- containerd + CNI
    const pauseName = `localhost/pause:${path.basename(path.dirname(binDir)).split("-")[1] ?? "local"}`;
    const c = (p: string) => path.join(dir, "containerd", p);
    await writeFile(
      path.join(dir, "containerd.toml"),
      [
        "version = 2",
        `root = ${JSON.stringify(c("root"))}`,
        `state = ${JSON.stringify(c("state"))}`,
        `disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]`,
        "[grpc]",
        `  address = ${JSON.stringify(node.sock)}`,
        "[ttrpc]",
        `  address = ${JSON.stringify(c("ttrpc.sock"))}`,
        '[plugins."io.containerd.internal.v1.opt"]',
        `  path = ${JSON.stringify(c("opt"))}`,
        '[plugins."io.containerd.grpc.v1.cri"]',
        // root here lacks CAP_SYS_RESOURCE: runc would fail to lower oom_score_adj
        "  restrict_oom_score_adj = true",
        `  sandbox_image = ${JSON.stringify(pauseName)}`,
        "  disable_hugetlb_controller = true",
        "  tolerate_missing_hugetlb_controller = true",
        "  disable_apparmor = true",
        '  stream_server_address = "127.0.0.1"',
        '  [plugins."io.containerd.grpc.v1.cri".cni]',
        `    bin_dir = ${JSON.stringify(cniBin)}`,
        `    conf_dir = ${JSON.stringify(path.join(dir, "cni/net.d"))}`,
        '  [plugins."io.containerd.grpc.v1.cri".containerd]',
        '    default_runtime_name = "runc"',
        '    snapshotter = "overlayfs"',
        '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
        '      runtime_type = "io.containerd.runc.v2"',
        '      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
        "        SystemdCgroup = false",
        `        Root = ${JSON.stringify(c("runc"))}`,
        "",
      ].join("\n"),
    );
    await writeFile(
      path.join(dir, "cni/net.d/10-understudy.conflist"),
      JSON.stringify({
        cniVersion: "1.0.0",
        name: node.cniNetwork,
        plugins: [
          { type: "bridge", bridge: "cni0", isGateway: true, ipMasq: true, hairpinMode: true, ipam: { type: "host-local", ranges: [[{ subnet: POD_CIDR }]], routes: [{ dst: "0.0.0.0/0" }], dataDir: path.join(dir, "cni/ipam") } },
          { type: "portmap", capabilities: { portMappings: true } },
          { type: "loopback" },
        ],
      }),
    );
    // pods reach the lab's hosts through the node's namespace
    node.inNs("sysctl", ["-q", "-w", "net.ipv4.ip_forward=1"]);
    node.inNs("ip", ["link", "set", "lo", "up"]);

    // the kubelet's pods live under a cgroup of their own in every hierarchy (removed by stop())
    for (const h of cgroupMounts()) {
      const d = path.join(h, node.cgroupRoot);
      await mkdir(d, { recursive: true });
      for (const k of ["cpuset.cpus", "cpuset.mems"]) {
        if (existsSync(path.join(h, k))) writeFileSync(path.join(d, k), readFileSync(path.join(h, k), "utf8").trim() || "0");
      }
    }

    const containerd = node.start("containerd", "containerd", ["--config", path.join(dir, "containerd.toml")]);
    await node.waitFor("containerd", deadline, [containerd], async () => (await runAsync("ctr", ["--address", node.sock, "version"], { timeoutMs: 10_000 })).code === 0 || undefined);
    const importImage = async (file: string) => {
      const r = await runAsync("ctr", ["--address", node.sock, "-n", "k8s.io", "images", "import", "--all-platforms", file], { timeoutMs: 300_000 });
      if (r.code !== 0) throw new Error(`ctr images import ${file} failed (${r.code}): ${r.stderr.trim()}`);
    };
    await importImage(await pauseImage(binDir, dir, pauseName));
    log(`containerd up, pause image imported after ${Date.now() - t0} ms`);

    // ---- etcd + control plane
    const etcd = node.start("etcd", node.bin("etcd"), [
      "--name=node",
      `--data-dir=${path.join(dir, "etcd")}`,
      "--listen-client-urls=http://127.0.0.1:2379",
      "--advertise-client-urls=http://127.0.0.1:2379",
      "--listen-peer-urls=http://127.0.0.1:2380",
      "--initial-advertise-peer-urls=http://127.0.0.1:2380",
      "--initial-cluster=node=http://127.0.0.1:2380",
      "--unsafe-no-fsync=true",
    ]);
    const apiserver = node.start("kube-apiserver", node.bin("kube-apiserver"), [
      "--etcd-servers=http://127.0.0.1:2379",
      `--bind-address=${ip}`,
      `--advertise-address=${ip}`,
      "--secure-port=6443",
      `--tls-cert-file=${f("apiserver.crt")}`,
      `--tls-private-key-file=${f("apiserver.key")}`,
      `--cert-dir=${pki}`,
      `--client-ca-file=${f("client-ca.crt")}`,
      "--authorization-mode=Node,RBAC",
      "--enable-admission-plugins=NodeRestriction",
      "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
      `--service-account-key-file=${f("sa.pub")}`,
      `--service-account-signing-key-file=${f("sa.key")}`,
      `--service-cluster-ip-range=${SERVICE_CIDR}`,
      `--kubelet-client-certificate=${f("apiserver-kubelet-client.crt")}`,
      `--kubelet-client-key=${f("apiserver-kubelet-client.key")}`,
      `--kubelet-certificate-authority=${f("ca.crt")}`,
      "--kubelet-preferred-address-types=InternalIP",
      "--allow-privileged=false",
    ]);
    const kubectlEnv = (kc: string): NodeJS.ProcessEnv => ({
      ...process.env,
      KUBECONFIG: kc,
      KUBECACHEDIR: path.join(dir, "kube-cache"),
      HELM_CACHE_HOME: path.join(dir, "helm", "cache"),
      HELM_CONFIG_HOME: path.join(dir, "helm", "config"),
      HELM_DATA_HOME: path.join(dir, "helm", "data"),
    });
    const tool = (b: string) => (args: string[], ro: RunOptions = {}) =>
      runAsync(node.bin(b), args, { env: kubectlEnv(ro.kubeconfig ?? adminKc), ...(ro.input !== undefined && { input: ro.input }), timeoutMs: ro.timeoutMs ?? 120_000 });
    const kubectl = tool("kubectl");
    await node.waitFor("kube-apiserver /readyz", deadline, [etcd, apiserver], async () => {
      const r = await kubectl(["get", "--raw", "/readyz"], { timeoutMs: 10_000 });
      if (r.code !== 0) throw new Error(r.stderr.trim().split("\n").pop());
      return r.stdout.trim() === "ok" || undefined;
    });
    log(`kube-apiserver ready at ${server} after ${Date.now() - t0} ms`);
    const kcm = node.start("kube-controller-manager", node.bin("kube-controller-manager"), [
      `--kubeconfig=${kcmKc}`,
      `--root-ca-file=${f("ca.crt")}`,
      `--service-account-private-key-file=${f("sa.key")}`,
      "--use-service-account-credentials=true",
      `--service-cluster-ip-range=${SERVICE_CIDR}`,
      "--leader-elect=false",
      "--bind-address=127.0.0.1",
      `--cert-dir=${path.join(dir, "kcm")}`,
    ]);
    const scheduler = node.start("kube-scheduler", node.bin("kube-scheduler"), [`--kubeconfig=${schedKc}`, "--leader-elect=false", "--bind-address=127.0.0.1", `--authentication-kubeconfig=${schedKc}`, `--authorization-kubeconfig=${schedKc}`]);
    const proxy = node.start("kube-proxy", node.bin("kube-proxy"), [
      `--kubeconfig=${proxyKc}`,
      `--hostname-override=${node.nodeName}`,
      "--proxy-mode=iptables",
      `--cluster-cidr=${POD_CIDR}`,
      // conntrack sysctls are the host's: leave them alone
      "--conntrack-max-per-core=0",
      "--conntrack-tcp-timeout-established=0",
      "--conntrack-tcp-timeout-close-wait=0",
      "--metrics-bind-address=127.0.0.1:10249",
      "--healthz-bind-address=127.0.0.1:10256",
    ]);

    // ---- kubelet
    await writeFile(
      path.join(dir, "kubelet.yaml"),
      YAML.stringify({
        apiVersion: "kubelet.config.k8s.io/v1beta1",
        kind: "KubeletConfiguration",
        authentication: { anonymous: { enabled: false }, webhook: { enabled: true }, x509: { clientCAFile: f("client-ca.crt") } },
        authorization: { mode: "Webhook" },
        tlsCertFile: f("kubelet.crt"),
        tlsPrivateKeyFile: f("kubelet.key"),
        cgroupDriver: "cgroupfs",
        cgroupRoot: node.cgroupRoot,
        failCgroupV1: false,
        failSwapOn: false,
        containerRuntimeEndpoint: `unix://${node.sock}`,
        podLogsDir: path.join(dir, "kubelet-logs"),
        resolvConf: "/etc/resolv.conf",
        clusterDomain: "cluster.local",
        address: ip,
        healthzBindAddress: "127.0.0.1",
        readOnlyPort: 0,
        maxPods: 30,
        // a busy shared disk must not evict the test's pods
        evictionHard: { "memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%" },
        imageGCHighThresholdPercent: 100,
        imageGCLowThresholdPercent: 99,
        // the node's pods should not wait on a slow sync to see Secret and status changes
        syncFrequency: "10s",
      }),
    );
    const kubelet = node.start("kubelet", node.bin("kubelet"), [
      `--config=${path.join(dir, "kubelet.yaml")}`,
      `--kubeconfig=${kubeletKc}`,
      `--root-dir=${path.join(dir, "kubelet")}`,
      `--cert-dir=${path.join(dir, "kubelet-pki")}`,
      `--hostname-override=${node.nodeName}`,
      `--node-ip=${ip}`,
      "--v=1",
    ]);
    const all = [containerd, etcd, apiserver, kcm, scheduler, proxy, kubelet];
    await node.waitFor(`node ${node.nodeName} Ready`, deadline, all, async () => {
      const r = await kubectl(["get", "node", node.nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`], { timeoutMs: 10_000 });
      if (r.code !== 0) throw new Error(r.stderr.trim());
      return r.stdout.trim() === "True" || undefined;
    });
    // the default ServiceAccount the namespaces get from the controller-manager, and the kubernetes Service's endpoints
    await node.waitFor("the default ServiceAccount", deadline, all, async () => (await kubectl(["get", "serviceaccount", "default", "-n", "default"], { timeoutMs: 10_000 })).code === 0 || undefined);
    log(`node ${node.nodeName} Ready at ${ip} after ${Date.now() - t0} ms (logs in ${path.join(dir, "logs")})`);

    const result: RealNode = {
      dir,
      server,
      kubeconfig: adminKc,
      caFile: f("ca.crt"),
      binDir,
      nodeName: node.nodeName,
      containerdSocket: node.sock,
      kubectl,
      helm: tool("helm"),
      async createToken(namespace, serviceAccount, seconds = 3600) {
        const r = await kubectl(["create", "token", serviceAccount, "-n", namespace, `--duration=${seconds}s`]);
        if (r.code !== 0) throw new Error(`kubectl create token failed: ${r.stderr}`);
        return r.stdout.trim();
      },
      writeKubeconfigForToken: (token, file) => writeKubeconfig(file, server, ca.certPem, { token }),
      importImage,
      stop,
      get cleanupReport() {
        return node.report;
      },
    };
    return result;
  } catch (e) {
    await stop();
    throw e;
  }
}
