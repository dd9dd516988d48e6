// An agent process: one gRPC server (Replication for the target role, Control
// for status) and one SourceSet per configured replication set.
import * as grpc from "@grpc/grpc-js";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import type { AgentConfig } from "../common/config.ts";
import type { Logger } from "../common/log.ts";
import { clientCredentials, serverCredentials } from "../common/tls.ts";
import { AGENT_VERSION, ControlService, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ReplicationService, type ControlServer, type StatusResponse } from "./wire.ts";
import { Receiver } from "./target/receiver.ts";
import { SourceSet } from "./source/replication-set.ts";

export class Agent {
  readonly cfg: AgentConfig;
  readonly sets: SourceSet[] = [];
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
    const server = new grpc.Server({ "grpc.max_receive_message_length": MAX_MESSAGE_BYTES, "grpc.max_send_message_length": MAX_MESSAGE_BYTES, "grpc.keepalive_permit_without_calls": 1, "grpc.http2.min_ping_interval_without_data_ms": 1000 });
    if (this.cfg.target) {
      this.receiver = new Receiver({
        name: this.cfg.name,
        root: this.cfg.target.root,
        stateDir: path.join(this.cfg.dataDir, "images"),
        syncIntervalMs: this.cfg.target.syncInterval,
        requireClientCert: !this.cfg.tls.insecure,
        log: this.log.child({ role: "target" }),
      });
      await mkdir(this.cfg.target.root, { recursive: true });
      server.addService(ReplicationService, this.receiver.service as unknown as grpc.UntypedServiceImplementation);
    }
    server.addService(ControlService, this.control as unknown as grpc.UntypedServiceImplementation);
    this.port = await new Promise<number>((resolve, reject) =>
      server.bindAsync(this.cfg.listen, serverCredentials(this.cfg.tls), (err, port) => (err ? reject(new Error(`cannot listen on ${this.cfg.listen}: ${err.message}`)) : resolve(port))),
    );
    this.server = server;
    this.log.info({ listen: this.cfg.listen, tls: !this.cfg.tls.insecure, version: AGENT_VERSION, protocol: PROTOCOL_VERSION }, "agent listening");
    if (this.cfg.source?.sets.length) await this.raiseInotifyQueue();
    const creds = clientCredentials(this.cfg.tls);
    for (const sc of this.cfg.source?.sets ?? []) {
      const s = new SourceSet(sc, { agentName: this.cfg.name, dataDir: this.cfg.dataDir, credentials: creds, log: this.log.child({ role: "source" }) });
      this.sets.push(s);
    }
    // Sets start concurrently; a failing one is reported, the others go on.
    await Promise.all(this.sets.map((s) => s.start().catch((e) => {
      s.state = "failed";
      s.lastError = (e as Error).message;
      this.log.error({ set: s.cfg.name, err: e }, "replication set failed to start");
    })));
  }

  /**
   * inotify drops events when its queue (16384 by default) overflows, and Node
   * does not report the overflow; a busy source would then miss changes until
   * the next rescan. Running as root, raise the limit (never lower it).
   */
  private async raiseInotifyQueue(): Promise<void> {
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
      sets: this.sets.map((s) => s.status()),
      images: [...(this.receiver?.images.values() ?? [])].map((i) => ({ source: i.source, set: i.set, path: i.dir, appliedSeq: i.appliedSeq, connected: i.connected, lastError: i.lastError })),
    };
  }

  private set(name: string): SourceSet {
    const s = this.sets.find((x) => x.cfg.name === name);
    if (!s) throw Object.assign(new Error(`agent ${this.cfg.name} has no replication set ${JSON.stringify(name)} (sets: ${this.sets.map((x) => x.cfg.name).join(", ") || "none"})`), { code: grpc.status.NOT_FOUND });
    return s;
  }

  private readonly control: ControlServer = {
    status: (_call, cb) => cb(null, this.status()),
    mirror: (call, cb) => {
      try {
        const r = call.request;
        const mode = r.mode || "checksum";
        if (mode !== "full" && mode !== "checksum") throw Object.assign(new Error(`mode must be full or checksum, not ${JSON.stringify(r.mode)}`), { code: grpc.status.INVALID_ARGUMENT });
        const s = this.set(r.set);
        if (r.blockSize && r.blockSize !== s.cfg.blockSize) throw Object.assign(new Error(`set ${s.cfg.name} uses ${s.cfg.blockSize}-byte blocks; change blockSize in the agent config to mirror with ${r.blockSize}`), { code: grpc.status.INVALID_ARGUMENT });
        cb(null, { started: s.mirror(r.target || undefined, mode) });
      } catch (e) {
        cb(Object.assign(e as Error, { code: (e as { code?: number }).code ?? grpc.status.FAILED_PRECONDITION, details: (e as Error).message }));
      }
    },
    verify: (call, cb) => {
      let s: SourceSet;
      try {
        s = this.set(call.request.set);
      } catch (e) {
        return cb(Object.assign(e as Error, { details: (e as Error).message }));
      }
      s.verify(call.request.target || undefined, call.request.repair).then(
        (r) => cb(null, r),
        (e: Error) => cb(Object.assign(e, { code: grpc.status.FAILED_PRECONDITION, details: e.message })),
      );
    },
  };

  async stop(): Promise<void> {
    await Promise.all(this.sets.map((s) => s.close()));
    await this.receiver?.close();
    await new Promise<void>((r) => (this.server ? this.server.tryShutdown(() => r()) : r()));
    this.log.info("agent stopped");
  }
}
