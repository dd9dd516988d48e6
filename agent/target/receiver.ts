// Target role: the Replication service. One stream per (source, set): check
// the protocol version and the source's identity, then apply packets strictly
// in sequence order (a gap pauses apply and asks for a resend; duplicates are
// dropped), and acknowledge only what has been made durable.
import * as grpc from "@grpc/grpc-js";
import { readFile, rename, writeFile, mkdir } from "node:fs/promises";
import type { Http2Session } from "node:http2";
import path from "node:path";
import type { Logger } from "../../common/log.ts";
import { peerCommonName } from "../../common/tls.ts";
import { AGENT_VERSION, PROTOCOL_VERSION, Nack_Reason, PacketError, decodePacket, versionMismatch, type ReplicationServer, type Packet, SourceMessage, TargetMessage } from "../wire.ts";
import { PathError } from "../fs/confine.ts";
import { Image } from "./image.ts";
import { digestsOf, listDir } from "./manifest.ts";
import { summarizeDir } from "./verify-listing.ts";

/** Log every op applied (debugging aid: UNDERSTUDY_TRACE_OPS=1). */
const TRACE_OPS = process.env.UNDERSTUDY_TRACE_OPS === "1";

const NAME = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;

type Call = grpc.ServerDuplexStream<SourceMessage, TargetMessage>;

/**
 * HTTP/2 receive windows of a connection that carries replication streams.
 * With the defaults (64 KiB per stream and per connection) one stream moves
 * a fraction of what TLS over the link can, and the receiver sends a
 * WINDOW_UPDATE every few frames; both must be raised (one alone does
 * nothing). They are kept to about two packets, not more: everything the
 * windows let the source queue is read before a keepalive ping's answer
 * behind it, and the server drops a connection whose ping goes unanswered
 * for 2 s (with 16/64 MiB windows a loaded target did, again and again).
 */
export const STREAM_WINDOW = 8 * 1024 * 1024;
export const CONNECTION_WINDOW = 8 * 1024 * 1024;
const widened = new WeakSet<Http2Session>();
let warnedWindows = false;

/**
 * Raise the receive windows of the HTTP/2 session a server call arrived on.
 * grpc-js has options for this on the client only, so the session is found
 * through the call (best effort: a grpc-js whose call objects look different
 * keeps the default windows, and replication is only slower).
 */
export function raiseReceiveWindows(call: object): boolean {
  let c = (call as { call?: unknown }).call;
  for (let i = 0; i < 8 && c && typeof c === "object"; i++) {
    const session = (c as { stream?: { session?: Http2Session } }).stream?.session;
    if (session) {
      if (widened.has(session) || session.destroyed) return true;
      widened.add(session);
      try {
        session.setLocalWindowSize(CONNECTION_WINDOW);
        session.settings({ initialWindowSize: STREAM_WINDOW });
      } catch {
        return false;
      }
      return true;
    }
    c = (c as { nextCall?: unknown }).nextCall;
  }
  return false;
}

export interface ReceiverOptions {
  name: string;
  /** Where images live (<root>/<source>/<set>); undefined: only mapped images are accepted. */
  root?: string;
  stateDir: string;
  syncIntervalMs: number;
  requireClientCert: boolean;
  log: Logger;
}

class Session {
  ended = false;
  readonly call: Call;
  constructor(call: Call) {
    this.call = call;
  }
  send(m: TargetMessage): void {
    if (!this.ended) this.call.write(m);
  }
  fail(code: grpc.status, details: string): void {
    if (this.ended) return;
    this.ended = true;
    this.call.emit("error", { code, details });
  }
}

/** A refusal the caller shows as is (gRPC status + message). */
export class ReceiverError extends Error {
  readonly code: grpc.status;
  constructor(code: grpc.status, message: string) {
    super(message);
    this.code = code;
  }
}

export class Receiver {
  readonly images = new Map<string, Image>();
  /** Images received into an explicit directory ("source/set" → path), set by MapImage. */
  private mappings = new Map<string, string>();
  private readonly sessions = new Map<string, Session>();
  private readonly opening = new Map<string, Promise<Image>>();
  private readonly opts: ReceiverOptions;
  private readonly log: Logger;

  constructor(opts: ReceiverOptions) {
    this.opts = opts;
    this.log = opts.log;
  }

  private get mappingsFile(): string {
    return path.join(this.opts.stateDir, "mappings.json");
  }

  async load(): Promise<void> {
    await mkdir(this.opts.stateDir, { recursive: true, mode: 0o700 });
    try {
      this.mappings = new Map(Object.entries(JSON.parse(await readFile(this.mappingsFile, "utf8")) as Record<string, string>));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
  }

  /** Receive (source, set) into `dir` (an absolute path) from now on; undefined unmaps. */
  async mapImage(source: string, set: string, dir: string | undefined): Promise<string> {
    if (!NAME.test(source) || !NAME.test(set)) throw new ReceiverError(grpc.status.INVALID_ARGUMENT, `invalid source or set name ${JSON.stringify(source)}/${JSON.stringify(set)}`);
    if (dir !== undefined && !path.isAbsolute(dir)) throw new ReceiverError(grpc.status.INVALID_ARGUMENT, `image path must be absolute, not ${JSON.stringify(dir)}`);
    const key = `${source}/${set}`;
    const open = this.images.get(key);
    if (open && open.dir !== (dir ?? this.defaultPath(source, set))) {
      // The image moves: close it so the next stream opens it at its new place.
      this.sessions.get(key)?.fail(grpc.status.UNAVAILABLE, "image moved; reconnect");
      await open.exclusive(() => open.close());
      this.images.delete(key);
    }
    if (dir === undefined) this.mappings.delete(key);
    else this.mappings.set(key, path.resolve(dir));
    const tmp = `${this.mappingsFile}.tmp`;
    await writeFile(tmp, JSON.stringify(Object.fromEntries(this.mappings)), { mode: 0o600 });
    await rename(tmp, this.mappingsFile);
    return this.mappings.get(key) ?? this.defaultPath(source, set) ?? "";
  }

  /**
   * Failover: make the image of (source, set) the primary copy at `epoch`.
   * The source's stream is cut, what was applied is made durable, and from now
   * on any stream of an epoch up to this one is refused (fenced).
   */
  async promote(source: string, set: string, epoch: number): Promise<Image> {
    if (!NAME.test(source) || !NAME.test(set)) throw new ReceiverError(grpc.status.INVALID_ARGUMENT, `invalid source or set name ${JSON.stringify(source)}/${JSON.stringify(set)}`);
    const img = await this.image(source, set);
    return img.exclusive(async () => {
      if (epoch <= img.meta.epoch && !(img.meta.promoted && epoch === img.meta.epoch)) throw new ReceiverError(grpc.status.FAILED_PRECONDITION, `cannot promote ${source}/${set} at epoch ${epoch}: it is already at epoch ${img.meta.epoch}`);
      this.sessions.get(`${source}/${set}`)?.fail(grpc.status.FAILED_PRECONDITION, `fenced: the replica on ${this.opts.name} was promoted to primary at epoch ${epoch}`);
      await img.makeDurable();
      await img.saveMeta({ epoch, promoted: true });
      this.log.warn({ source, set, epoch, appliedSeq: img.appliedSeq, path: img.dir }, "replica promoted to primary; its source is fenced");
      return img;
    });
  }

  private defaultPath(source: string, set: string): string | undefined {
    return this.opts.root === undefined ? undefined : path.join(this.opts.root, source, set);
  }

  readonly service: ReplicationServer = {
    replicate: (call: Call) => {
      this.serve(call).catch((e) => {
        this.log.error({ err: e }, "replication stream failed");
        call.emit("error", { code: grpc.status.INTERNAL, details: (e as Error).message });
      });
    },
    manifest: (call, cb) => {
      const r = call.request;
      this.readImage(call, r.source, r.set, r.blockSize, (root) => listDir(root, r.dir, r.blockSize || 65536, r.digestMaxBlocks, r.digestAlgo)).then((v) => cb(null, v), (e: grpc.ServiceError) => cb(e));
    },
    digests: (call, cb) => {
      const r = call.request;
      this.readImage(call, r.source, r.set, r.blockSize, (root) => digestsOf(root, r.path, r.blockSize || 65536, r.digestAlgo)).then((v) => cb(null, v), (e: grpc.ServiceError) => cb(e));
    },
    summary: (call, cb) => {
      const r = call.request;
      this.readImage(call, r.source, r.set, r.blockSize, (root) => summarizeDir(root, r.dir, r.blockSize || 65536)).then((v) => cb(null, v), (e: grpc.ServiceError) => cb(e));
    },
  };

  /** Read-only access to an image for the source it belongs to (same identity rules as Replicate). */
  private async readImage<T>(call: { getPeer(): string }, source: string, set: string, blockSize: number, fn: (root: string) => Promise<T>): Promise<T> {
    const err = (code: grpc.status, details: string) => Object.assign(new Error(details), { code, details, metadata: new grpc.Metadata() });
    if (!NAME.test(source) || !NAME.test(set)) throw err(grpc.status.INVALID_ARGUMENT, `invalid source or set name ${JSON.stringify(source)}/${JSON.stringify(set)}`);
    if (blockSize !== 0 && (blockSize < 4096 || blockSize > 16 * 1024 * 1024 || (blockSize & (blockSize - 1)) !== 0)) throw err(grpc.status.INVALID_ARGUMENT, `block size ${blockSize} is not a power of two between 4 KiB and 16 MiB`);
    if (this.opts.requireClientCert && peerCommonName(call) !== source) throw err(grpc.status.PERMISSION_DENIED, `a source may only read its own image`);
    try {
      return await fn(this.imagePath(source, set));
    } catch (e) {
      if (e instanceof PathError) throw err(grpc.status.INVALID_ARGUMENT, e.message);
      if (e instanceof ReceiverError) throw err(e.code, e.message);
      throw err(grpc.status.INTERNAL, (e as Error).message);
    }
  }

  private async image(source: string, set: string): Promise<Image> {
    const key = `${source}/${set}`;
    const have = this.images.get(key);
    if (have) return have;
    let p = this.opening.get(key);
    if (!p) {
      const dir = this.imagePath(source, set);
      p = Image.open(dir, this.opts.stateDir, source, set);
      this.opening.set(key, p);
    }
    const img = await p;
    this.images.set(key, img);
    this.opening.delete(key);
    return img;
  }

  private async serve(call: Call): Promise<void> {
    const session = new Session(call);
    if (!raiseReceiveWindows(call) && !warnedWindows) {
      warnedWindows = true;
      this.log.warn("could not raise the HTTP/2 receive windows of replication streams (grpc-js internals changed?): replication runs with the 64 KiB defaults, slower");
    }
    const it = call[Symbol.asyncIterator]() as AsyncIterator<SourceMessage>;
    const first = await it.next().catch(() => undefined);
    if (!first || first.done) return session.fail(grpc.status.INVALID_ARGUMENT, "the stream ended before Hello");
    const m0 = (first.value as SourceMessage).msg;
    const hello = m0?.$case === "hello" ? m0.value : undefined;
    if (!hello) return session.fail(grpc.status.INVALID_ARGUMENT, "the first message of a replication stream must be Hello");
    if (hello.protocolVersion !== PROTOCOL_VERSION) {
      this.log.warn({ source: hello.source, theirs: hello.protocolVersion, ours: PROTOCOL_VERSION }, "refused source with another protocol version");
      return session.fail(grpc.status.FAILED_PRECONDITION, versionMismatch(PROTOCOL_VERSION, hello.protocolVersion, `source ${JSON.stringify(hello.source)} (agent ${hello.agentVersion})`).replace("this agent", `target ${this.opts.name}`));
    }
    if (!NAME.test(hello.source) || !NAME.test(hello.set)) return session.fail(grpc.status.INVALID_ARGUMENT, `invalid source or set name ${JSON.stringify(hello.source)}/${JSON.stringify(hello.set)}`);
    if (this.opts.requireClientCert) {
      const cn = peerCommonName(call);
      if (cn !== hello.source) return session.fail(grpc.status.PERMISSION_DENIED, `source ${JSON.stringify(hello.source)} presented a certificate for ${JSON.stringify(cn)}; a source may only write its own image`);
    }
    const key = `${hello.source}/${hello.set}`;
    let img: Image;
    try {
      img = await this.image(hello.source, hello.set);
    } catch (e) {
      if (e instanceof ReceiverError) return session.fail(e.code, e.message);
      throw e;
    }
    const fenced = await img.exclusive(async () => {
      if (img.meta.promoted && hello.epoch <= img.meta.epoch) return `fenced: the replica of ${hello.source}/${hello.set} on ${this.opts.name} was promoted to primary at epoch ${img.meta.epoch}; source epoch ${hello.epoch} may not write it`;
      if (hello.epoch < img.meta.epoch) return `fenced: the replica of ${hello.source}/${hello.set} on ${this.opts.name} is at epoch ${img.meta.epoch}; source epoch ${hello.epoch} is older`;
      if (hello.epoch > img.meta.epoch) await img.saveMeta({ epoch: hello.epoch, promoted: false });
      return undefined;
    });
    if (fenced) {
      this.log.warn({ source: hello.source, set: hello.set, sourceEpoch: hello.epoch, imageEpoch: img.meta.epoch }, "refused a fenced source");
      return session.fail(grpc.status.FAILED_PRECONDITION, fenced);
    }
    // Newest stream wins: an older one for the same image is a dead connection the source gave up on.
    const old = this.sessions.get(key);
    if (old) old.fail(grpc.status.ABORTED, "superseded by a newer stream from the same source and set");
    this.sessions.set(key, session);
    img.connected = true;
    img.disconnectedAt = 0;
    const log = this.log.child({ source: hello.source, set: hello.set });
    log.info({ appliedSeq: img.appliedSeq, peer: call.getPeer() }, "source connected");
    session.send({ msg: { $case: "welcome", value: { protocolVersion: PROTOCOL_VERSION, agentVersion: AGENT_VERSION, target: this.opts.name, appliedSeq: img.appliedSeq, journalId: img.meta.journalId, mirrorId: img.meta.mirrorId, mirrorDoneThrough: img.meta.mirrorDoneThrough } } });

    let ackedSeq = img.durableSeq;
    let nackedFor = 0;
    let syncing: Promise<void> | undefined;
    const syncNow = async () => {
      const d = await img.exclusive(() => img.makeDurable());
      if (d > ackedSeq) {
        ackedSeq = d;
        session.send({ msg: { $case: "ack", value: { seq: d } } });
      }
    };
    const timer = setInterval(() => {
      if (syncing || img.durableSeq >= img.appliedSeq && ackedSeq >= img.durableSeq) return;
      syncing = syncNow()
        .catch((e) => {
          img.lastError = `sync failed: ${(e as Error).message}`;
          log.error({ err: e }, "making applied data durable failed");
        })
        .finally(() => (syncing = undefined));
    }, this.opts.syncIntervalMs);

    try {
      for (;;) {
        const r = await it.next();
        if (r.done || session.ended) break;
        const m = r.value.msg;
        if (m?.$case === "mirrorOps" || m?.$case === "mirrorDone") {
          const ok = await img.exclusive(() => this.applyMirror(img, session, m, log));
          if (!ok) break;
          continue;
        }
        if (m?.$case !== "packet") {
          session.fail(grpc.status.INVALID_ARGUMENT, `unexpected ${m?.$case ?? "empty"} message after Hello`);
          break;
        }
        if (img.meta.journalId !== hello.journalId && (img.meta.journalId !== "" || img.appliedSeq > 0)) {
          session.fail(grpc.status.FAILED_PRECONDITION, `the image was built from journal ${img.meta.journalId || "(unknown)"} but this stream is from journal ${hello.journalId || "(none)"}: mirror first`);
          break;
        }
        const p = m.value;
        const outcome = await img.exclusive(() => this.applyPacket(img, session, p, log, nackedFor));
        if (outcome === "stop") break;
        if (outcome === "gap") nackedFor = img.appliedSeq + 1;
        else if (outcome === "applied") nackedFor = 0;
      }
    } catch (e) {
      if (!session.ended) log.warn({ err: (e as Error).message }, "stream error");
    } finally {
      clearInterval(timer);
      await syncing;
      await syncNow().catch(() => undefined);
      if (this.sessions.get(key) === session) {
        this.sessions.delete(key);
        img.connected = false;
        img.disconnectedAt = Date.now();
      }
      if (!session.ended) {
        session.ended = true;
        try {
          call.end();
        } catch {
          /* already closed */
        }
      }
      log.info({ appliedSeq: img.appliedSeq, durableSeq: img.durableSeq }, "source disconnected");
    }
  }

  /** Mirror traffic: unsequenced ops applied at once, then the jump to the source's journal position. */
  private async applyMirror(img: Image, session: Session, m: NonNullable<SourceMessage["msg"]> & { $case: "mirrorOps" | "mirrorDone" }, log: Logger): Promise<boolean> {
    if (session.ended) return false;
    try {
      if (m.$case === "mirrorOps") {
        const v = m.value;
        await img.applier.applyConcurrently(v.ops);
        if (img.meta.mirrorId !== v.mirrorId || v.doneThrough) await img.saveMeta({ mirrorId: v.mirrorId, mirrorDoneThrough: v.doneThrough || (img.meta.mirrorId === v.mirrorId ? img.meta.mirrorDoneThrough : "") });
        session.send({ msg: { $case: "mirrorAck", value: { batch: v.batch, done: false } } });
      } else {
        const t0 = Date.now();
        await img.jumpTo(m.value.appliedSeq, m.value.journalId);
        log.info({ appliedSeq: img.appliedSeq, journalId: m.value.journalId, syncMs: Date.now() - t0 }, "mirror complete");
        session.send({ msg: { $case: "mirrorAck", value: { batch: 0, done: true } } });
      }
      img.lastError = "";
      return true;
    } catch (e) {
      const refused = e instanceof PacketError || e instanceof PathError;
      const msg = `mirror ${refused ? "refused" : "could not be applied"}: ${(e as Error).message}`;
      img.lastError = msg;
      log.error({ err: (e as Error).message }, msg);
      session.send({ msg: { $case: "nack", value: { reason: refused ? Nack_Reason.REASON_REJECTED : Nack_Reason.REASON_APPLY_FAILED, expectedSeq: 0, message: msg } } });
      session.ended = true;
      session.call.end();
      return false;
    }
  }

  /** Apply one packet if it is the next one; called with the image held exclusively. */
  private async applyPacket(img: Image, session: Session, p: Packet, log: Logger, nackedFor: number): Promise<"applied" | "duplicate" | "gap" | "stop"> {
    if (session.ended) return "stop"; // superseded while waiting for the image
    const expected = img.appliedSeq + 1;
    if (p.seq < expected) {
      // Duplicate (a resend after reconnect): already applied; confirm what is durable.
      if (img.durableSeq > 0) session.send({ msg: { $case: "ack", value: { seq: img.durableSeq } } });
      return "duplicate";
    }
    if (p.seq > expected) {
      if (nackedFor !== expected) {
        log.warn({ got: p.seq, expected }, "sequence gap; asking for a resend");
        session.send({ msg: { $case: "nack", value: { reason: Nack_Reason.REASON_GAP, expectedSeq: expected, message: `gap: got packet ${p.seq}, expected ${expected}` } } });
      }
      return "gap";
    }
    try {
      const ops = decodePacket(p);
      if (TRACE_OPS) for (const op of ops) log.info({ seq: p.seq, op: op.kind?.$case, path: op.path, to: op.kind?.$case === "rename" ? op.kind.value.to : undefined, mtime: op.kind?.$case === "attr" ? op.kind.value.attr?.mtimeSec + "." + op.kind.value.attr?.mtimeNsec : undefined }, "apply");
      await img.applier.apply(ops);
      await img.markApplied(p.seq);
      img.lastError = "";
      return "applied";
    } catch (e) {
      const refused = e instanceof PacketError || e instanceof PathError;
      const msg = `packet ${p.seq} ${refused ? "refused" : "could not be applied"}: ${(e as Error).message}`;
      img.lastError = msg;
      log.error({ seq: p.seq, err: (e as Error).message }, refused ? "packet refused" : "apply failed");
      session.send({ msg: { $case: "nack", value: { reason: refused ? Nack_Reason.REASON_REJECTED : Nack_Reason.REASON_APPLY_FAILED, expectedSeq: p.seq, message: msg } } });
      // Stop reading: the source reconnects with backoff and resends from the Welcome's seq.
      session.ended = true;
      session.call.end();
      return "stop";
    }
  }

  imagePath(source: string, set: string): string {
    const dir = this.mappings.get(`${source}/${set}`) ?? this.defaultPath(source, set);
    if (dir === undefined) throw new ReceiverError(grpc.status.FAILED_PRECONDITION, `agent ${this.opts.name} is not a target (no target.root in its config) and has no image mapped for ${source}/${set}`);
    return dir;
  }

  async close(): Promise<void> {
    for (const s of this.sessions.values()) s.fail(grpc.status.UNAVAILABLE, "target agent shutting down");
    await Promise.all([...this.images.values()].map((i) => i.close()));
  }
}
