// An agent process: one gRPC server (Replication for the target role, Control
// for status and changes) and one SourceSet per replication set, whether from
// the config file or managed by the operator (agent/control/managed-sets.ts).
import * as grpc from "@grpc/grpc-js";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { AgentConfig } from "../common/config.ts";
import type { Logger } from "../common/log.ts";
import { ConfigError } from "../common/config.ts";
import { clientCredentials, peerCommonName, serverCredentials } from "../common/tls.ts";
import { AGENT_VERSION, ControlService, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ReplicationService, type ControlServer, type StatusResponse } from "./wire.ts";
import { loadManagedSpecs, managedSet, saveManagedSpecs, SET_NAME, type ManagedSet } from "./control/managed-sets.ts";
import { runCommand } from "./control/run-command.ts";
import { pathProblem } from "./control/path-check.ts";
import { xattrUnavailable } from "./fs/xattr.ts";
import { Receiver } from "./target/receiver.ts";
import { SourceSet } from "./source/replication-set.ts";

/** Where this agent's code is installed (the bundle's or the checkout's root): whole-server sets leave it out. */
const INSTALL_PREFIX = fileURLToPath(new URL("..", import.meta.url));

export class Agent {
  readonly cfg: AgentConfig;
  readonly sets: SourceSet[] = [];
  /** Managed sets by name (their SourceSet is in `sets` too). */
  private readonly managed = new Map<string, ManagedSet>();
  /** ConfigureSet/RemoveSet run one at a time. */
  private changes: Promise<unknown> = Promise.resolve();
  /** Each set's start(): a set is closed only after it (close() does not stop a start half-way). */
  private readonly starts = new WeakMap<SourceSet, Promise<void>>();
  private inotifyRaised = false;
  receiver?: Receiver;
  private server?: grpc.Server;
  private readonly log: Logger;
  private readonly started = Date.now();
  port = 0;

  constructor(cfg: AgentConfig, log: Logger) {
    this.cfg = cfg;
    this.log = log;
  }

  async start(): Promise<void> {
    await mkdir(this.cfg.dataDir, { recursive: true, mode: 0o700 });
    const server = new grpc.Server({ "grpc.max_receive_message_length": MAX_MESSAGE_BYTES, "grpc.max_send_message_length": MAX_MESSAGE_BYTES, "grpc.keepalive_permit_without_calls": 1, "grpc.http2.min_ping_interval_without_data_ms": 1000,
      // A source whose link is cut sends no RST; pinging it notices within ~3 s (failover health checks rely on it).
      "grpc.keepalive_time_ms": 1000, "grpc.keepalive_timeout_ms": 2000 });
    // Every agent can receive: into <target.root> when it is a target, and into
    // directories the operator maps (failback brings a source's files back home).
    this.receiver = new Receiver({
      name: this.cfg.name,
      root: this.cfg.target?.root,
      stateDir: path.join(this.cfg.dataDir, "images"),
      syncIntervalMs: this.cfg.target?.syncInterval ?? 50,
      requireClientCert: !this.cfg.tls.insecure,
      log: this.log.child({ role: "target" }),
    });
    await this.receiver.load();
    if (this.cfg.target) await mkdir(this.cfg.target.root, { recursive: true });
    server.addService(ReplicationService, this.receiver.service as unknown as grpc.UntypedServiceImplementation);
    server.addService(ControlService, this.control as unknown as grpc.UntypedServiceImplementation);
    this.port = await new Promise<number>((resolve, reject) =>
      server.bindAsync(this.cfg.listen, serverCredentials(this.cfg.tls), (err, port) => (err ? reject(new Error(`cannot listen on ${this.cfg.listen}: ${err.message}`)) : resolve(port))),
    );
    this.server = server;
    this.log.info({ listen: this.cfg.listen, tls: !this.cfg.tls.insecure, version: AGENT_VERSION, protocol: PROTOCOL_VERSION }, "agent listening");
    const noXattrs = xattrUnavailable();
    if (noXattrs) this.log.warn(noXattrs);
    for (const sc of this.cfg.source?.sets ?? []) this.sets.push(this.newSet(sc));
    for (const spec of await loadManagedSpecs(this.cfg.dataDir)) {
      try {
        const m = managedSet(spec, this.cfg.tls.insecure === true);
        if (this.sets.some((x) => x.cfg.name === m.cfg.name)) throw new Error(`a set named ${m.cfg.name} is in the config file too`);
        this.managed.set(m.cfg.name, m);
        this.sets.push(this.newSet(m.cfg));
      } catch (e) {
        this.log.error({ set: spec.name, err: (e as Error).message }, "managed replication set left out");
      }
    }
    if (this.sets.length) await this.raiseInotifyQueue();
    // Sets start concurrently; a failing one is reported, the others go on.
    await Promise.all(this.sets.map((s) => this.startSet(s)));
  }

  private newSet(sc: SourceSet["cfg"]): SourceSet {
    return new SourceSet(sc, { agentName: this.cfg.name, dataDir: this.cfg.dataDir, credentials: clientCredentials(this.cfg.tls), log: this.log.child({ role: "source" }), ownPaths: [...(this.cfg.target ? [this.cfg.target.root] : []), INSTALL_PREFIX] });
  }

  private startSet(s: SourceSet): Promise<void> {
    const run = s.start().catch((e) => {
      s.state = "failed";
      s.lastError = (e as Error).message;
      this.log.error({ set: s.cfg.name, err: e }, "replication set failed to start");
    });
    this.starts.set(s, run);
    return run;
  }

  /**
   * Create or change a managed set. Any change restarts the set: its journal,
   * index and target cursors are on disk, so it resumes where it was (no
   * mirror), and a changed path or filter is caught by the restart's rescan.
   * Returns before the set's initial scan, which may take long.
   */
  configureSet(spec: Parameters<typeof managedSet>[0]): Promise<{ result: string; specHash: string }> {
    const run = this.changes.then(async () => {
      const m = managedSet(spec, this.cfg.tls.insecure === true);
      const name = m.cfg.name;
      if (!this.managed.has(name) && this.sets.some((x) => x.cfg.name === name)) throw new ConfigError(`set ${name} is defined in the agent's config file; the operator cannot change it`);
      const old = this.managed.get(name);
      if (old?.hash === m.hash) return { result: "unchanged", specHash: m.hash };
      if (old) await this.closeSet(name);
      this.managed.set(name, m);
      await saveManagedSpecs(this.cfg.dataDir, [...this.managed.values()].map((x) => x.spec));
      if (!this.inotifyRaised) await this.raiseInotifyQueue();
      const set = this.newSet(m.cfg);
      this.sets.push(set);
      void this.startSet(set);
      this.log.info({ set: name, hash: m.hash, path: m.cfg.path, targets: m.cfg.targets }, old ? "managed set changed; restarted" : "managed set created");
      return { result: old ? "updated" : "created", specHash: m.hash };
    });
    this.changes = run.catch(() => undefined);
    return run;
  }

  removeSet(name: string, purge: boolean): Promise<boolean> {
    // The name becomes a path (purge deletes <dataDir>/sets/<name>): "" or "../x" must never get there.
    if (!SET_NAME.test(name)) return Promise.reject(Object.assign(new Error(`not a set name: ${JSON.stringify(name)}`), { code: grpc.status.INVALID_ARGUMENT }));
    const run = this.changes.then(async () => {
      if (!this.managed.has(name)) {
        if (this.sets.some((x) => x.cfg.name === name)) throw new ConfigError(`set ${name} is defined in the agent's config file; the operator cannot remove it`);
        // Already gone (a retried delete): purging again is harmless.
        if (purge) await rm(path.join(this.cfg.dataDir, "sets", name), { recursive: true, force: true });
        return false;
      }
      await this.closeSet(name);
      this.managed.delete(name);
      await saveManagedSpecs(this.cfg.dataDir, [...this.managed.values()].map((x) => x.spec));
      if (purge) await rm(path.join(this.cfg.dataDir, "sets", name), { recursive: true, force: true });
      this.log.info({ set: name, purge }, "managed set removed");
      return true;
    });
    this.changes = run.catch(() => undefined);
    return run;
  }

  private async closeSet(name: string): Promise<void> {
    const i = this.sets.findIndex((x) => x.cfg.name === name);
    if (i < 0) return;
    const [s] = this.sets.splice(i, 1);
    await this.starts.get(s!);
    await s!.close();
  }

  /**
   * inotify drops events when its queue (16384 by default) overflows, and Node
   * does not report the overflow; a busy source would then miss changes until
   * the next rescan. Running as root, raise the limit (never lower it).
   */
  private async raiseInotifyQueue(): Promise<void> {
    this.inotifyRaised = true;
    const file = "/proc/sys/fs/inotify/max_queued_events";
    const want = 1_048_576;
    try {
      const now = Number((await readFile(file, "utf8")).trim());
      if (now >= want) return;
      if (process.getuid?.() !== 0) {
        this.log.warn({ maxQueuedEvents: now }, `inotify's event queue is small; as root run: sysctl fs.inotify.max_queued_events=${want}`);
        return;
      }
      await writeFile(file, `${want}\n`);
      this.log.info({ from: now, to: want }, "raised fs.inotify.max_queued_events");
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, "could not check fs.inotify.max_queued_events");
    }
  }

  status(): StatusResponse {
    return {
      name: this.cfg.name,
      agentVersion: AGENT_VERSION,
      protocolVersion: PROTOCOL_VERSION,
      uptimeSeconds: (Date.now() - this.started) / 1000,
      sets: this.sets.map((s) => ({ ...s.status(), managed: this.managed.has(s.cfg.name), specHash: this.managed.get(s.cfg.name)?.hash ?? "", pathError: "" })),
      images: [...(this.receiver?.images.values() ?? [])].map((i) => ({
        source: i.source,
        set: i.set,
        path: i.dir,
        appliedSeq: i.appliedSeq,
        durableSeq: i.durableSeq,
        connected: i.connected,
        lastError: i.lastError,
        epoch: i.meta.epoch,
        promoted: i.meta.promoted,
        disconnectedAt: i.disconnectedAt / 1000,
        mirroring: i.meta.mirrorId !== "",
        journalId: i.meta.journalId,
      })),
    };
  }

  /** status(), and for each set whether its path can be read now (a missing source path is not a healthy empty set). */
  async statusWithPaths(): Promise<StatusResponse> {
    const s = this.status();
    await Promise.all(s.sets.map(async (set) => (set.pathError = await pathProblem(set.path))));
    return s;
  }

  private set(name: string): SourceSet {
    const s = this.sets.find((x) => x.cfg.name === name);
    if (!s) throw Object.assign(new Error(`agent ${this.cfg.name} has no replication set ${JSON.stringify(name)} (sets: ${this.sets.map((x) => x.cfg.name).join(", ") || "none"})`), { code: grpc.status.NOT_FOUND });
    return s;
  }

  /**
   * Changing calls need the agent's own certificate (local CLI use) or one whose
   * CN is in control.admins (the operator). Status is open to any verified peer.
   */
  private authorize(call: { getPeer(): string } & object): void {
    if (this.cfg.tls.insecure) return;
    const cn = peerCommonName(call);
    if (cn && (cn === this.cfg.name || this.cfg.control.admins.includes(cn))) return;
    throw Object.assign(new Error(`client ${cn ?? "(no certificate CN)"} may not change agent ${this.cfg.name}; allowed: ${[this.cfg.name, ...this.cfg.control.admins].join(", ")} (agent config control.admins)`), { code: grpc.status.PERMISSION_DENIED });
  }

  /**
   * A changing control call: authorize, run, and answer. A refusal keeps the
   * gRPC code it was thrown with; otherwise a ConfigError (bad input) gets
   * `configError` and anything else `fallback`.
   */
  private changing<Q, R>(fn: (req: Q) => R | Promise<R>, fallback: grpc.status, configError?: grpc.status): grpc.handleUnaryCall<Q, R> {
    return (call, cb) => {
      const fail = (e: unknown) => {
        const err = e as Error & { code?: number };
        cb(Object.assign(err, { code: err instanceof ConfigError && configError !== undefined ? configError : (err.code ?? fallback), details: err.message }));
      };
      try {
        this.authorize(call);
        Promise.resolve(fn(call.request)).then((r) => cb(null, r), fail);
      } catch (e) {
        fail(e);
      }
    };
  }

  private readonly control: ControlServer = {
    status: (_call, cb) => void this.statusWithPaths().then((s) => cb(null, s), (e: Error) => cb(Object.assign(e, { code: grpc.status.INTERNAL }))),
    configureSet: this.changing((req) => {
      if (!req.spec) throw Object.assign(new Error("ConfigureSet needs a spec"), { code: grpc.status.INVALID_ARGUMENT });
      return this.configureSet(req.spec);
    }, grpc.status.INTERNAL, grpc.status.INVALID_ARGUMENT),
    removeSet: this.changing(async (req) => ({ existed: await this.removeSet(req.name, req.purge) }), grpc.status.INTERNAL, grpc.status.FAILED_PRECONDITION),
    promote: this.changing(async (req) => {
      const img = await this.receiver!.promote(req.source, req.set, req.epoch);
      return { appliedSeq: img.appliedSeq, durableSeq: img.durableSeq, path: img.dir, epoch: img.meta.epoch };
    }, grpc.status.INTERNAL),
    drain: this.changing(async (req) => ({ lastSeq: await this.set(req.set).drain() }), grpc.status.INTERNAL),
    mapImage: this.changing(async (req) => ({ path: await this.receiver!.mapImage(req.source, req.set, req.remove ? undefined : req.path) }), grpc.status.INTERNAL),
    runCommand: this.changing((req) => {
      if (!this.cfg.control.allowCommands) throw Object.assign(new Error(`agent ${this.cfg.name} does not run commands (set control.allowCommands: true in its config to allow failover actions)`), { code: grpc.status.PERMISSION_DENIED });
      if (!req.command.length) throw Object.assign(new Error("RunCommand needs a command"), { code: grpc.status.INVALID_ARGUMENT });
      return runCommand(req.command, req.timeoutMs || 60_000, this.log);
    }, grpc.status.INTERNAL),
    mirror: this.changing((r) => {
      const mode = r.mode || "checksum";
      if (mode !== "full" && mode !== "checksum") throw Object.assign(new Error(`mode must be full or checksum, not ${JSON.stringify(r.mode)}`), { code: grpc.status.INVALID_ARGUMENT });
      const s = this.set(r.set);
      if (r.blockSize && r.blockSize !== s.cfg.blockSize) throw Object.assign(new Error(`set ${s.cfg.name} uses ${s.cfg.blockSize}-byte blocks; change blockSize in the agent config to mirror with ${r.blockSize}`), { code: grpc.status.INVALID_ARGUMENT });
      return { started: s.mirror(r.target || undefined, mode) };
    }, grpc.status.FAILED_PRECONDITION),
    verify: this.changing((req) => {
      const s = this.set(req.set);
      // A background verify reports only through status: a bad target must fail the call.
      if (req.target && !s.cfg.targets.includes(req.target)) throw Object.assign(new Error(`set ${s.cfg.name} has no target ${req.target} (targets: ${s.cfg.targets.join(", ")})`), { code: grpc.status.NOT_FOUND });
      s.assertStarted();
      const run = s.verify(req.target || undefined, req.repair);
      if (!req.background) return run;
      run.catch((e: Error) => this.log.warn({ set: s.cfg.name, err: e.message }, "verify failed"));
      return { set: s.cfg.name, target: req.target, startedAt: Date.now() / 1000, finishedAt: 0, ok: false, filesCompared: 0, bytesCompared: 0, differences: [], repaired: 0, error: "", inFlight: 0 };
    }, grpc.status.FAILED_PRECONDITION),
  };

  async stop(): Promise<void> {
    await Promise.all(this.sets.map((s) => s.close()));
    await this.receiver?.close();
    await new Promise<void>((r) => (this.server ? this.server.tryShutdown(() => r()) : r()));
    this.log.info("agent stopped");
  }
}
