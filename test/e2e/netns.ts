// A network lab for e2e tests: "hosts" that are Linux network namespaces on
// one bridge, so a test can give every agent its own IP address and cut one
// host's link while its processes keep running (the rest of the network then
// sees a dead server: packets vanish, nothing answers, no RST).
//
//   root namespace (test process, operator, kube-apiserver)
//     └─ bridge us-br-<id>, 10.x.y.1/24
//          ├─ veth us-<id>-v2 ── eth0 10.x.y.2/24 in netns us-<id>-<name>
//          └─ veth us-<id>-v3 ── eth0 10.x.y.3/24 in netns us-<id>-<name>
//
// Only the network is namespaced: hosts share the file system (and the
// process table) with the test. Needs root and iproute2's `ip`.
//
// Neighbour (ARP) entries are static, in the root namespace and in every host,
// so a cut link is a pure black hole for as long as it lasts: connects and
// calls time out, and never fail early with EHOSTUNREACH once an ARP entry
// goes stale, as a dead server behind a router behaves.
//
// Everything a lab creates is removed by lab.dispose(), on process exit (and
// SIGINT/SIGTERM/SIGHUP), and, for labs of processes that died by SIGKILL,
// by the next createLab() on the machine (state files in /run/understudy-netns).
import { execFile, execFileSync, spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import path from "node:path";
import { fetchStatus } from "../../agent/control-client.ts";
import type { StatusResponse } from "../../agent/wire.ts";
import type { TlsConfig } from "../../common/config.ts";
import { AGENT_ENV, AgentProc, CLI, waitFor } from "./harness.ts";

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface Host {
  /** The name given to addHost. */
  readonly name: string;
  /** The network namespace (`ip netns exec <ns> …`). */
  readonly ns: string;
  /** The host's address on the lab network (its eth0). */
  readonly ip: string;
  /** The bridge-side end of the host's veth pair, in the root namespace. */
  readonly veth: string;
  /** False between cutLink() and restoreLink(). */
  readonly linkIsUp: boolean;
  /**
   * Start a process in the host (`ip netns exec <ns> cmd args…`), in its own
   * process group; it is killed (the whole group) when the lab is disposed.
   */
  exec(cmd: string, args?: readonly string[], opts?: SpawnOptions): ChildProcess;
  /** Run a short command in the host; its exit code and output, whatever the code. */
  run(cmd: string, args?: readonly string[], opts?: { timeoutMs?: number; input?: string }): Promise<RunResult>;
  /** Pull the cable: the bridge-side veth goes down, packets to and from the host vanish. */
  cutLink(): Promise<void>;
  restoreLink(): Promise<void>;
}

export interface Lab {
  /** Random hex id of this lab; all its names contain it. */
  readonly id: string;
  /** Names of the lab's namespaces and veths start with `${prefix}-`: `us-<id>`. */
  readonly prefix: string;
  /** The bridge, in the root namespace: `us-br-<id>`. */
  readonly bridge: string;
  /** The bridge's address: how hosts reach the root namespace. */
  readonly gateway: string;
  /** The lab network, `10.x.y.0/24`. */
  readonly subnet: string;
  readonly hosts: readonly Host[];
  /** Add a host: `name` is lowercase letters, digits and '-'. */
  addHost(name: string): Promise<Host>;
  /**
   * Check that the root namespace and every host reach each other (TCP to a
   * closed port must be refused, not time out); throws naming what fails.
   * Hosts whose link is cut are left out.
   */
  verifyConnectivity(timeoutMs?: number): Promise<void>;
  /** Kill the hosts' processes, delete namespaces, veths, bridge and firewall rules. Idempotent. */
  dispose(): Promise<void>;
}

const STATE_DIR = "/run/understudy-netns";
const MAX_IFNAME = 15;
// The /24 is picked in 10.160.0.0–10.239.255.0: clear of the usual Kubernetes
// ranges (services 10.0.0.0/24 and 10.96.0.0/12, pods 10.244.0.0/16).
const SUBNET_FIRST = 160;
const SUBNET_LAST = 239;

const live = new Set<LabImpl>();
const reservedSubnets = new Set<string>();

type IptablesRule = string[]; // ["FORWARD", "-i", br, …]: what follows -I/-D

interface LabState {
  pid: number;
  pidStart: string | undefined;
  bridge: string;
  namespaces: string[];
  veths: string[];
  iptables: IptablesRule[];
}

// ---------------------------------------------------------------- commands

function notFound(cmd: string): Error {
  return cmd === "ip" ? new Error("netns lab: `ip` not found: install iproute2 (apt-get install iproute2)") : new Error(`netns lab: \`${cmd}\` not found`);
}

function exec(cmd: string, args: readonly string[], opts: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const p = execFile(cmd, args, { maxBuffer: 16 << 20, timeout: opts.timeoutMs ?? 60_000, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      if (err && (err as NodeJS.ErrnoException).code === "ENOENT" && !stdout && !stderr) return reject(notFound(cmd));
      const code = err ? (typeof (err as { code?: unknown }).code === "number" ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout, stderr });
    });
    if (opts.input !== undefined) p.stdin!.on("error", () => undefined).end(opts.input);
  });
}

/** Run `ip args…`; throws with ip's message when it fails. */
async function ip(args: readonly string[], input?: string): Promise<string> {
  const r = await exec("ip", args, input === undefined ? {} : { input });
  if (r.code !== 0) throw new Error(`ip ${args.join(" ")}: ${r.stderr.trim() || `exit ${r.code}`}`);
  return r.stdout;
}

/** Best-effort synchronous command (for exit handlers and sweeping); false when it failed. */
function trySync(cmd: string, args: readonly string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: "ignore", timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------- helpers

function hex(bytes: number): string {
  return randomBytes(bytes).toString("hex");
}

/** A random unicast, locally administered MAC address. */
function randomMac(): string {
  const b = randomBytes(6);
  b[0] = (b[0]! & 0xfc) | 0x02;
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join(":");
}

function ipToInt(s: string): number {
  return s.split(".").reduce((a, o) => ((a << 8) | Number(o)) >>> 0, 0);
}

function overlaps(a: number, alen: number, b: number, blen: number): boolean {
  const l = Math.min(alen, blen);
  const mask = l === 0 ? 0 : (0xffffffff << (32 - l)) >>> 0;
  return ((a & mask) >>> 0) === ((b & mask) >>> 0);
}

/** Every IPv4 prefix in use on the machine: interface addresses and routes of all tables. */
async function prefixesInUse(): Promise<[number, number][]> {
  const out: [number, number][] = [];
  const addrs = JSON.parse(await ip(["-j", "-4", "addr"])) as { addr_info?: { local?: string; prefixlen?: number }[] }[];
  for (const l of addrs) for (const a of l.addr_info ?? []) if (a.local) out.push([ipToInt(a.local), a.prefixlen ?? 32]);
  const routes = JSON.parse(await ip(["-j", "-4", "route", "show", "table", "all"])) as { dst?: string }[];
  for (const r of routes) {
    if (!r.dst || r.dst === "default") continue;
    const [addr, len] = r.dst.split("/");
    if (addr && /^\d+\.\d+\.\d+\.\d+$/.test(addr)) out.push([ipToInt(addr), len ? Number(len) : 32]);
  }
  return out;
}

async function pickSubnet(): Promise<[number, number]> {
  const used = await prefixesInUse();
  for (let i = 0; i < 1000; i++) {
    const x = SUBNET_FIRST + Math.floor(Math.random() * (SUBNET_LAST - SUBNET_FIRST + 1));
    const y = Math.floor(Math.random() * 256);
    const key = `${x}.${y}`;
    if (reservedSubnets.has(key)) continue;
    const net = ipToInt(`10.${x}.${y}.0`);
    if (used.some(([a, l]) => overlaps(a, l, net, 24))) continue;
    reservedSubnets.add(key);
    return [x, y];
  }
  throw new Error("netns lab: found no free 10.x.y.0/24 network");
}

/** Start time of a process (field 22 of /proc/<pid>/stat), to tell a live owner from a reused pid. */
function procStart(pid: number): string | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    return s.slice(s.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/** Pids of the processes in a named network namespace. */
function nsPidsSync(ns: string): number[] {
  try {
    return execFileSync("ip", ["netns", "pids", ns], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 10_000 })
      .split(/\s+/)
      .filter(Boolean)
      .map(Number);
  } catch {
    return [];
  }
}

function killSync(pid: number, group: boolean): void {
  try {
    process.kill(group ? -pid : pid, "SIGKILL");
  } catch {
    // gone already
  }
}

/** Tear down what a state describes, synchronously and best-effort (exit handlers, sweeping). */
function teardownSync(st: LabState): void {
  for (const ns of st.namespaces) for (const pid of nsPidsSync(ns)) killSync(pid, false);
  for (const v of st.veths) trySync("ip", ["link", "del", v]);
  for (const ns of st.namespaces) trySync("ip", ["netns", "del", ns]);
  trySync("ip", ["link", "del", st.bridge]);
  for (const r of st.iptables) trySync("iptables", ["-w", "-D", ...r]);
}

/** Remove what labs of processes that no longer run left behind (they died by SIGKILL). */
function sweepStale(): void {
  let files: string[];
  try {
    files = readdirSync(STATE_DIR);
  } catch {
    return;
  }
  for (const f of files) {
    if (!f.endsWith(".json")) continue;
    const file = path.join(STATE_DIR, f);
    let st: LabState;
    try {
      st = JSON.parse(readFileSync(file, "utf8")) as LabState;
    } catch {
      continue;
    }
    if (st.pid === process.pid || (procStart(st.pid) !== undefined && procStart(st.pid) === st.pidStart)) continue;
    teardownSync(st);
    rmSync(file, { force: true });
  }
}

/**
 * Whether the lab needs ACCEPT rules of its own: iptables is installed (it
 * need not be) and one of INPUT, FORWARD, OUTPUT has rules or a policy other
 * than ACCEPT. Where the chains are empty and accept, the lab adds nothing
 * (with iptables-nft, not even the table).
 */
async function iptablesNeeded(): Promise<boolean> {
  for (const chain of ["INPUT", "FORWARD", "OUTPUT"]) {
    let r: RunResult;
    try {
      r = await exec("iptables", ["-w", "-S", chain]);
    } catch {
      return false; // no iptables
    }
    if (r.code !== 0) return false;
    if (r.stdout.split("\n").some((l) => l.trim() && l.trim() !== `-P ${chain} ACCEPT`)) return true;
  }
  return false;
}

let exitHooksInstalled = false;
function installExitHooks(): void {
  if (exitHooksInstalled) return;
  exitHooksInstalled = true;
  const disposeAll = () => {
    for (const lab of [...live]) lab.disposeSync();
  };
  process.on("exit", disposeAll);
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    const onSignal = () => {
      disposeAll();
      process.off(sig, onSignal);
      // nobody else handles it: die of the signal as we would have without us
      if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

// ---------------------------------------------------------------- the lab

class HostImpl implements Host {
  readonly name: string;
  readonly ns: string;
  readonly ip: string;
  readonly mac: string;
  readonly veth: string;
  linkIsUp = true;
  private readonly lab: LabImpl;

  constructor(lab: LabImpl, name: string, ns: string, ipAddr: string, mac: string, veth: string) {
    this.lab = lab;
    this.name = name;
    this.ns = ns;
    this.ip = ipAddr;
    this.mac = mac;
    this.veth = veth;
  }

  exec(cmd: string, args: readonly string[] = [], opts: SpawnOptions = {}): ChildProcess {
    if (this.lab.disposed) throw new Error(`netns lab ${this.lab.id} is disposed`);
    const p = spawn("ip", ["netns", "exec", this.ns, cmd, ...args], { ...opts, detached: true });
    this.lab.track(p);
    return p;
  }

  run(cmd: string, args: readonly string[] = [], opts: { timeoutMs?: number; input?: string } = {}): Promise<RunResult> {
    if (this.lab.disposed) return Promise.reject(new Error(`netns lab ${this.lab.id} is disposed`));
    return exec("ip", ["netns", "exec", this.ns, cmd, ...args], opts);
  }

  async cutLink(): Promise<void> {
    await ip(["link", "set", this.veth, "down"]);
    this.linkIsUp = false;
  }

  async restoreLink(): Promise<void> {
    await ip(["link", "set", this.veth, "up"]);
    this.linkIsUp = true;
  }
}

class LabImpl implements Lab {
  readonly id: string;
  readonly prefix: string;
  readonly bridge: string;
  readonly gateway: string;
  readonly subnet: string;
  readonly bridgeMac = randomMac();
  readonly hosts: HostImpl[] = [];
  disposed = false;
  private readonly net: string; // "10.x.y"
  private readonly subnetKey: string;
  private readonly procs = new Set<ChildProcess>();
  private readonly state: LabState;
  private readonly stateFile: string;
  private nextHost = 2;
  private disposing?: Promise<void>;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(prefix: string, id: string, x: number, y: number) {
    this.id = id;
    this.prefix = `${prefix}-${id}`;
    this.bridge = `${prefix}-br-${id}`;
    this.net = `10.${x}.${y}`;
    this.subnetKey = `${x}.${y}`;
    this.gateway = `${this.net}.1`;
    this.subnet = `${this.net}.0/24`;
    this.state = { pid: process.pid, pidStart: procStart(process.pid), bridge: this.bridge, namespaces: [], veths: [], iptables: [] };
    this.stateFile = path.join(STATE_DIR, `${this.prefix}.json`);
  }

  saveState(): void {
    mkdirSync(STATE_DIR, { recursive: true });
    writeFileSync(this.stateFile, JSON.stringify(this.state));
  }

  track(p: ChildProcess): void {
    this.procs.add(p);
    p.once("exit", () => this.procs.delete(p));
    p.once("error", () => this.procs.delete(p));
  }

  async setup(): Promise<void> {
    this.saveState(); // first, so that a crash half-way is swept too
    await ip(["link", "add", "name", this.bridge, "address", this.bridgeMac, "type", "bridge"]);
    await ip(["addr", "add", `${this.gateway}/24`, "dev", this.bridge]);
    await ip(["link", "set", this.bridge, "up"]);
    // Bridged traffic between hosts goes through iptables' FORWARD chain when
    // br_netfilter is loaded (net.bridge.bridge-nf-call-iptables=1, a global
    // switch a bridge cannot opt out of); traffic with the root namespace goes
    // through INPUT/OUTPUT. Where iptables filters, let the lab's traffic
    // through whatever the rules and policies are, with rules precise to
    // this bridge, first in their chains (removed again by dispose).
    if (await iptablesNeeded()) {
      const tag = ["-m", "comment", "--comment", `understudy-lab-${this.id}`, "-j", "ACCEPT"];
      for (const r of [["FORWARD", "-i", this.bridge, "-o", this.bridge, ...tag], ["INPUT", "-i", this.bridge, ...tag], ["OUTPUT", "-o", this.bridge, ...tag]]) {
        const res = await exec("iptables", ["-w", "-I", r[0]!, "1", ...r.slice(1)]);
        if (res.code !== 0) throw new Error(`iptables -I ${r.join(" ")}: ${res.stderr.trim()}`);
        this.state.iptables.push(r);
        this.saveState();
      }
    }
  }

  addHost(name: string): Promise<Host> {
    // one at a time: addresses and neighbour entries depend on the hosts before
    const p = this.queue.then(() => this.addHostNow(name));
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async addHostNow(name: string): Promise<Host> {
    if (this.disposed) throw new Error(`netns lab ${this.id} is disposed`);
    if (!/^[a-z0-9][a-z0-9-]{0,31}$/.test(name)) throw new Error(`netns lab: invalid host name ${JSON.stringify(name)} (lowercase letters, digits and '-', at most 32)`);
    if (this.hosts.some((h) => h.name === name)) throw new Error(`netns lab: host ${name} exists already`);
    const n = this.nextHost++;
    if (n > 254) throw new Error("netns lab: no addresses left on the /24");
    const ns = `${this.prefix}-${name}`;
    const veth = `${this.prefix}-v${n}`;
    if (veth.length > MAX_IFNAME) throw new Error(`netns lab: interface name ${veth} is longer than ${MAX_IFNAME}`);
    const hostIp = `${this.net}.${n}`;
    const mac = randomMac();
    const host = new HostImpl(this, name, ns, hostIp, mac, veth);

    this.state.namespaces.push(ns);
    this.state.veths.push(veth);
    this.saveState();
    await ip(["netns", "add", ns]);
    await ip(["link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", ns]);
    await ip(["link", "set", veth, "master", this.bridge, "up"]);
    const inside = [
      "link set lo up",
      `addr add ${hostIp}/24 dev eth0`,
      "link set eth0 up",
      `route add default via ${this.gateway}`,
      `neigh replace ${this.gateway} lladdr ${this.bridgeMac} dev eth0 nud permanent`,
      ...this.hosts.map((h) => `neigh replace ${h.ip} lladdr ${h.mac} dev eth0 nud permanent`),
    ];
    await ip(["-n", ns, "-batch", "-"], inside.join("\n") + "\n");
    await ip(["neigh", "replace", hostIp, "lladdr", mac, "dev", this.bridge, "nud", "permanent"]);
    for (const h of this.hosts) await ip(["-n", h.ns, "neigh", "replace", hostIp, "lladdr", mac, "dev", "eth0", "nud", "permanent"]);
    this.hosts.push(host);

    // the cheapest proof that the root namespace and the host reach each other: a refused connect
    const err = await probe(hostIp, 1, 3000);
    if (err) throw new Error(`netns lab: the root namespace cannot reach host ${name} (${hostIp}): ${err} (a firewall dropping traffic on ${this.bridge}?)`);
    return host;
  }

  async verifyConnectivity(timeoutMs = 3000): Promise<void> {
    const up = this.hosts.filter((h) => h.linkIsUp);
    const failures: string[] = [];
    for (const h of up) {
      const err = await probe(h.ip, 1, timeoutMs);
      if (err) failures.push(`root → ${h.name} (${h.ip}): ${err}`);
    }
    // from inside each host, with node (always there): the gateway and every other host
    const script = `
      const net = require("node:net");
      const [timeout, ...ips] = process.argv.slice(1);
      Promise.all(ips.map((ip) => new Promise((resolve) => {
        const s = net.connect({ host: ip, port: 1 });
        const done = (r) => { clearTimeout(t); s.destroy(); resolve(r); };
        const t = setTimeout(() => done(ip + ": timed out"), Number(timeout));
        s.on("connect", () => done(""));
        s.on("error", (e) => done(e.code === "ECONNREFUSED" ? "" : ip + ": " + e.code));
      }))).then((r) => { console.log(JSON.stringify(r.filter(Boolean))); });`;
    await Promise.all(
      up.map(async (h) => {
        const targets = [this.gateway, ...up.filter((o) => o !== h).map((o) => o.ip)];
        const r = await h.run(process.execPath, ["-e", script, String(timeoutMs), ...targets], { timeoutMs: timeoutMs + 10_000 });
        if (r.code !== 0) failures.push(`${h.name}: probe failed: ${r.stderr.trim()}`);
        else for (const f of JSON.parse(r.stdout) as string[]) failures.push(`${h.name} → ${f}`);
      }),
    );
    if (failures.length) throw new Error(`netns lab ${this.id}: no connectivity:\n  ${failures.join("\n  ")}`);
  }

  dispose(): Promise<void> {
    this.disposing ??= this.disposeNow();
    return this.disposing;
  }

  private async disposeNow(): Promise<void> {
    this.disposed = true;
    await this.queue; // a host being added
    const exits = [...this.procs].filter((p) => p.exitCode === null && p.signalCode === null).map((p) => new Promise((r) => p.once("exit", r)));
    for (const p of this.procs) if (p.pid) killSync(p.pid, true);
    for (const h of this.hosts) for (const pid of nsPidsSync(h.ns)) killSync(pid, false);
    await Promise.race([Promise.all(exits), new Promise((r) => setTimeout(r, 5000).unref())]);
    for (const v of this.state.veths) await exec("ip", ["link", "del", v]);
    for (const ns of this.state.namespaces) await exec("ip", ["netns", "del", ns]);
    await exec("ip", ["link", "del", this.bridge]);
    for (const r of this.state.iptables) await exec("iptables", ["-w", "-D", ...r]);
    rmSync(this.stateFile, { force: true });
    reservedSubnets.delete(this.subnetKey);
    live.delete(this);
  }

  /** For exit handlers: the same, synchronously. */
  disposeSync(): void {
    if (!live.has(this)) return;
    this.disposed = true;
    for (const p of this.procs) if (p.pid) killSync(p.pid, true);
    teardownSync(this.state);
    rmSync(this.stateFile, { force: true });
    live.delete(this);
  }
}

/** TCP to host:port; undefined when the host answered (connected or refused), else why not. */
function probe(host: string, port: number, timeoutMs: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const done = (r: string | undefined) => {
      clearTimeout(t);
      s.destroy();
      resolve(r);
    };
    const t = setTimeout(() => done(`no answer in ${timeoutMs} ms`), timeoutMs);
    s.on("connect", () => done(undefined));
    s.on("error", (e: NodeJS.ErrnoException) => done(e.code === "ECONNREFUSED" ? undefined : (e.code ?? e.message)));
  });
}

/** Create a lab: a bridge with a free 10.x.y.0/24 in the root namespace, no hosts yet. */
export async function createLab(opts: { prefix?: string } = {}): Promise<Lab> {
  const prefix = opts.prefix ?? "us";
  if (process.platform !== "linux") throw new Error("netns lab: needs Linux network namespaces");
  if (process.getuid?.() !== 0) throw new Error("netns lab: needs root (network namespaces, veths and bridges need CAP_NET_ADMIN and CAP_SYS_ADMIN)");
  // "us-<id>-v254": the longest interface name must fit in 15 characters
  if (!/^[a-z][a-z0-9]*$/.test(prefix) || `${prefix}-0000-v254`.length > MAX_IFNAME) throw new Error(`netns lab: invalid prefix ${JSON.stringify(prefix)}: lowercase letters and digits, at most ${MAX_IFNAME - "-0000-v254".length}`);
  const r = await exec("ip", ["-V"]); // throws "install iproute2" when there is no ip
  if (r.code !== 0) throw new Error(`netns lab: \`ip -V\` failed: ${r.stderr.trim()}`);
  sweepStale();
  installExitHooks();
  let id = hex(2);
  while ((await exec("ip", ["link", "show", `${prefix}-br-${id}`])).code === 0) id = hex(2);
  const [x, y] = await pickSubnet();
  const lab = new LabImpl(prefix, id, x, y);
  live.add(lab);
  try {
    await lab.setup();
  } catch (e) {
    await lab.dispose();
    throw e;
  }
  return lab;
}

// ---------------------------------------------------------------- agents

/**
 * An agent running in a host: AgentProc, spawned with `ip netns exec` (through
 * host.exec, so the lab kills it when disposed), reached at host.ip:port, and
 * always over mTLS (tls.insecure is refused off loopback).
 */
export class NetnsAgentProc extends AgentProc {
  readonly host: Host;
  readonly tls: TlsConfig;

  constructor(host: Host, name: string, configPath: string, port: number, logPath: string, tls: TlsConfig) {
    super(name, configPath, port, logPath);
    this.host = host;
    this.tls = tls;
  }

  override get address(): string {
    return `${this.host.ip}:${this.port}`;
  }

  override async start(tls: TlsConfig = this.tls): Promise<void> {
    const env = { ...AGENT_ENV, ...process.env, UNDERSTUDY_LOG_LEVEL: process.env.UNDERSTUDY_LOG_LEVEL ?? "info" };
    const p = this.spawnLogged(process.execPath, [CLI, "agent", "--config", this.configPath], env, (cmd, args, opts) => this.host.exec(cmd, args, opts));
    await waitFor(`agent ${this.name} to answer on ${this.address} (host ${this.host.name})`, async () => {
      if (p.exitCode !== null) throw new Error(`agent ${this.name} exited with ${p.exitCode}; log:\n${await this.log()}`);
      return (await fetchStatus(this.address, tls, 1000).catch(() => undefined)) ?? false;
    }, 60_000); // generous: start-up on a loaded CI machine takes a while
  }

  /** Status over mTLS, from the root namespace. */
  override status(timeoutMs = 5000): Promise<StatusResponse> {
    return fetchStatus(this.address, this.tls, timeoutMs);
  }
}
