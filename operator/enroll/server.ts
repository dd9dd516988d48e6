// The operator's enrollment endpoint: an agent on a new host (an EC2 DR
// instance, a host the operator cannot SSH into) holds a one-time token and the
// CA certificate; it makes its own key, and POSTs a CSR and the token here over
// HTTPS. The operator checks the token (tokens.ts), consumes it in the
// EnrollmentStore (which makes it single-use and says what the agent is
// called), and signs the CSR's key with the CN and SANs of its choosing.
//
//   POST /v1/enroll  {token, csr, agentVersion, hostname}
//     200 {certPem, caPem, agentName, admins}
//     400 {error, reason: "bad-request" | "bad-csr"}         the request is wrong
//     401 {error, reason: "malformed" | "bad-signature" | "expired"}  the token is not good
//     403 {error, reason: "used" | "unknown" | "superseded" | "denied"}  the store refused
//     413 body over 64 KiB; 503 the store failed (try again later)
//   GET /healthz     200 ok
import { createServer, type Server } from "node:https";
import type { IncomingMessage, ServerResponse } from "node:http";
import { isIP } from "node:net";
import { z } from "zod";
import type { Logger } from "../../common/log.ts";
import { AGENT_NAME, CsrError, inspectCsr, signCsr, type CaSigner, type San } from "../../common/tls.ts";
import { EnrollmentRefused, tokenId, verifyToken, type EnrollmentClaims, type RefusalReason } from "./tokens.ts";

export { EnrollmentRefused, type EnrollmentClaims, type RefusalReason } from "./tokens.ts";

/** requests are small: a token, a CSR, two short strings */
export const MAX_BODY_BYTES = 64 * 1024;

/** What the server knows about a request when it asks the store to consume a token. */
export interface EnrollmentInfo {
  /** the TCP peer's address (IPv4-mapped IPv6 addresses as plain IPv4) */
  peerAddress: string;
  /** what the agent says it runs (informational) */
  agentVersion: string;
  /** what the agent says its host is called (informational) */
  hostname: string;
  /** SHA-256 of the CSR's SubjectPublicKeyInfo (DER), hex: the key the certificate will be for */
  publicKeySha256: string;
}

/** What the store decides for an enrollment: the certificate's CN, its SANs, and the agent's control.admins. */
export interface Grant {
  /** the agent's name: the certificate's CN and `name` in its config (an agent name, see config.ts) */
  agentName: string;
  /** SANs besides the peer address (which the server always adds as an IP SAN) */
  sans: San[];
  /** certificate CNs that may change the agent (its control.admins), e.g. ["understudy-operator"] */
  admins: string[];
}

/**
 * Where pending enrollments live, and what makes a token single-use.
 *
 * consume() is called once per request whose token verified (signature and expiry). It
 * must atomically check and mark the enrollment of `claims.sub` as used, and return the
 * grant; or throw EnrollmentRefused with:
 * - "unknown": no pending enrollment for `claims.sub` (never issued, or withdrawn);
 * - "superseded": `claims.nonce` is not the subject's current nonce (a newer token was issued);
 * - "used": already consumed; the message should say when and by whom, and that a new
 *   token is needed. Exception: a store SHOULD return the same grant again when the
 *   consumer presents the same `publicKeySha256` as the first time: that is a client
 *   retrying after its response was lost, and a certificate for that key is useless to
 *   anyone but the holder of the private key;
 * - "denied": anything else the store refuses (its message is shown to the agent).
 * Its messages are shown to the agent as they are: no secrets in them. Any other error
 * is a failure of the store (the agent is told to try again later; the token is not spent
 * unless the store recorded it).
 */
export interface EnrollmentStore {
  consume(claims: EnrollmentClaims, info: EnrollmentInfo): Promise<Grant>;
}

/** A pending enrollment, as InMemoryEnrollmentStore keeps it. */
export interface PendingEnrollment extends Grant {
  nonce: string;
  /** when it was consumed (unix ms) */
  usedAt?: number;
  /** by whom */
  usedBy?: EnrollmentInfo;
}

/**
 * The reference EnrollmentStore, in memory (for tests, and to show the rules): a map of
 * subject → pending enrollment. add() registers (or reissues, with a new nonce) one.
 */
export class InMemoryEnrollmentStore implements EnrollmentStore {
  private readonly pending = new Map<string, PendingEnrollment>();
  private readonly now: () => number;

  constructor(o: { now?: () => number } = {}) {
    this.now = o.now ?? Date.now;
  }

  /** Register the enrollment of `sub` (replacing any earlier one: older tokens become superseded). */
  add(sub: string, e: { nonce: string } & Grant): void {
    this.pending.set(sub, { nonce: e.nonce, agentName: e.agentName, sans: [...e.sans], admins: [...e.admins] });
  }

  /** Withdraw the enrollment of `sub`: its tokens become unknown. */
  remove(sub: string): boolean {
    return this.pending.delete(sub);
  }

  get(sub: string): Readonly<PendingEnrollment> | undefined {
    return this.pending.get(sub);
  }

  async consume(claims: EnrollmentClaims, info: EnrollmentInfo): Promise<Grant> {
    const p = this.pending.get(claims.sub);
    if (!p) throw new EnrollmentRefused("unknown", `no enrollment is pending for this token (${claims.sub}): it was withdrawn or never issued here; ask the operator for a new one`);
    if (p.nonce !== claims.nonce) throw new EnrollmentRefused("superseded", `a newer enrollment token was issued for ${claims.sub}; use the newest token the operator gave you`);
    if (p.usedAt !== undefined) {
      if (p.usedBy?.publicKeySha256 !== info.publicKeySha256) {
        throw new EnrollmentRefused("used", `enrollment token already used at ${new Date(p.usedAt).toISOString()} by ${p.usedBy?.peerAddress ?? "?"} (${p.usedBy?.hostname || "?"}); ask the operator for a new one`);
      }
    } else {
      p.usedAt = this.now();
      p.usedBy = { ...info };
    }
    return { agentName: p.agentName, sans: [...p.sans], admins: [...p.admins] };
  }
}

export interface EnrollmentServerOptions {
  /** the CA that signs agent certificates */
  ca: CaSigner;
  /** the CA certificate(s) handed to agents as their ca.crt (default: ca.certPem) */
  caPem?: string;
  /** the HMAC key of tokens (tokens.ts enrollmentKey) */
  key: Buffer;
  /** this server's TLS certificate (signed by the same CA, so agents can verify it) and key */
  serverCertPem: string;
  serverKeyPem: string;
  store: EnrollmentStore;
  log: Logger;
  /** default 0.0.0.0 */
  host?: string;
  /** default 7443; 0 picks a free port (see start()) */
  port?: number;
  /** validity of issued certificates (default: signCsr's) */
  certDays?: number;
  /** the clock tokens are checked against (unix ms) */
  now?: () => number;
}

const RequestSchema = z.object({
  token: z.string().min(1).max(4096),
  csr: z.string().min(1).max(32 * 1024),
  agentVersion: z.string().max(128).default(""),
  hostname: z.string().max(253).default(""),
});

const STATUS: Record<RefusalReason, number> = {
  malformed: 401,
  "bad-signature": 401,
  expired: 401,
  used: 403,
  unknown: 403,
  superseded: 403,
  denied: 403,
  "bad-csr": 400,
};

class HttpError extends Error {
  readonly status: number;
  readonly reason: string;
  constructor(status: number, reason: string, message: string) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

/** "::ffff:10.0.0.5" → "10.0.0.5" */
function plainAddress(a: string | undefined): string {
  if (!a) return "";
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(a);
  return m ? m[1]! : a;
}

function readBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers["content-length"] ?? "0");
    if (declared > limit) return reject(new HttpError(413, "bad-request", `request body over ${limit} bytes`));
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (c: Buffer) => {
      if (size > limit) return; // answered already; the rest is drained and dropped
      size += c.length;
      if (size > limit) return reject(new HttpError(413, "bad-request", `request body over ${limit} bytes`));
      chunks.push(c);
    });
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  if (res.headersSent) return;
  const text = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text), "Cache-Control": "no-store" }).end(text);
}

/** The HTTPS enrollment endpoint (see the top of this file). */
export class EnrollmentServer {
  private readonly o: EnrollmentServerOptions;
  private readonly caPem: string;
  private readonly now: () => number;
  private server?: Server;
  private boundPort = 0;

  constructor(o: EnrollmentServerOptions) {
    if (o.key.length < 16) throw new Error("EnrollmentServer: the token key is too short (use enrollmentKey)");
    this.o = o;
    this.caPem = o.caPem ?? o.ca.certPem;
    this.now = o.now ?? Date.now;
  }

  /** the port it listens on (after start) */
  get port(): number {
    return this.boundPort;
  }

  async start(): Promise<{ host: string; port: number }> {
    if (this.server) throw new Error("EnrollmentServer: already started");
    const server = createServer({ cert: this.o.serverCertPem, key: this.o.serverKeyPem, minVersion: "TLSv1.2" }, (req, res) => void this.handle(req, res));
    server.requestTimeout = 30_000;
    server.headersTimeout = 10_000;
    const host = this.o.host ?? "0.0.0.0";
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.o.port ?? 7443, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    server.on("error", (e) => this.o.log.error({ err: e.message }, "enrollment server error"));
    const a = server.address();
    this.boundPort = typeof a === "object" && a ? a.port : 0;
    this.server = server;
    this.o.log.info({ host, port: this.boundPort }, "enrollment server listening");
    return { host, port: this.boundPort };
  }

  async stop(): Promise<void> {
    const s = this.server;
    if (!s) return;
    this.server = undefined;
    await new Promise<void>((resolve) => {
      s.close(() => resolve());
      s.closeAllConnections();
    });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = (req.url ?? "").split("?")[0];
    if (url === "/healthz") {
      if (req.method !== "GET" && req.method !== "HEAD") return void res.writeHead(405, { Allow: "GET" }).end();
      return void res.writeHead(200, { "Content-Type": "text/plain" }).end("ok\n");
    }
    if (url !== "/v1/enroll") return sendJson(res, 404, { error: `no such endpoint: ${url}`, reason: "not-found" });
    if (req.method !== "POST") {
      res.setHeader("Allow", "POST");
      return sendJson(res, 405, { error: "use POST", reason: "bad-request" });
    }
    const peer = plainAddress(req.socket.remoteAddress);
    let tid: string | undefined;
    try {
      const body = await readBody(req, MAX_BODY_BYTES);
      let raw: unknown;
      try {
        raw = JSON.parse(body.toString("utf8"));
      } catch {
        // (not the parser's message: it quotes the body, and the body holds the token)
        throw new HttpError(400, "bad-request", "the request body is not JSON");
      }
      const r = RequestSchema.safeParse(raw);
      if (!r.success) throw new HttpError(400, "bad-request", `invalid request: ${r.error.issues.map((i) => `${i.path.join(".") || "body"}: ${i.message}`).join("; ")}`);
      const { token, csr, agentVersion, hostname } = r.data;
      tid = tokenId(token);
      const claims = verifyToken(this.o.key, token, this.now());
      // the CSR is checked before the token is spent: a bad request must not burn it
      let publicKeySha256: string;
      try {
        publicKeySha256 = (await inspectCsr(csr)).publicKeySha256;
      } catch (e) {
        if (e instanceof CsrError) throw new EnrollmentRefused("bad-csr", `certificate request refused: ${e.message}`);
        throw e;
      }
      let grant: Grant;
      try {
        grant = await this.o.store.consume(claims, { peerAddress: peer, agentVersion, hostname, publicKeySha256 });
      } catch (e) {
        if (e instanceof EnrollmentRefused) throw e;
        this.o.log.error({ tokenId: tid, sub: claims.sub, peer, err: (e as Error).message }, "enrollment store failed");
        throw new HttpError(503, "unavailable", "the operator could not record the enrollment; try again later");
      }
      if (!AGENT_NAME.test(grant.agentName)) {
        this.o.log.error({ tokenId: tid, sub: claims.sub, agentName: grant.agentName }, "enrollment store granted an invalid agent name");
        throw new HttpError(500, "internal", "the operator chose an invalid agent name; report this to its administrator");
      }
      const sans: San[] = [];
      for (const s of [...grant.sans, ...(isIP(peer) ? [{ type: "ip" as const, value: peer }] : [])]) {
        if (!sans.some((x) => x.type === s.type && x.value === s.value)) sans.push(s);
      }
      const certPem = await signCsr(this.o.ca, csr, { commonName: grant.agentName, usage: "both", sans, ...(this.o.certDays ? { days: this.o.certDays } : {}) });
      this.o.log.info({ tokenId: tid, sub: claims.sub, agentName: grant.agentName, peer, hostname, agentVersion, sans: sans.map((s) => `${s.type}:${s.value}`) }, "agent enrolled");
      sendJson(res, 200, { certPem, caPem: this.caPem, agentName: grant.agentName, admins: grant.admins });
    } catch (e) {
      if (e instanceof EnrollmentRefused) {
        this.o.log.warn({ tokenId: tid, peer, reason: e.reason, err: e.message }, "enrollment refused");
        return sendJson(res, STATUS[e.reason] ?? 403, { error: e.message, reason: e.reason });
      }
      if (e instanceof HttpError) {
        if (e.status < 500) this.o.log.warn({ tokenId: tid, peer, reason: e.reason, err: e.message }, "enrollment request refused");
        sendJson(res, e.status, { error: e.message, reason: e.reason });
        if (e.status === 413) res.once("finish", () => req.socket.destroy());
        return;
      }
      this.o.log.error({ tokenId: tid, peer, err: (e as Error).message }, "enrollment failed");
      sendJson(res, 500, { error: "the operator failed to sign the certificate; see its log", reason: "internal" });
    }
  }
}
