// `understudy enroll`: join this host to an operator with a one-time token.
// The private key is made here and never leaves the host; the operator gets a
// CSR and the token over HTTPS (its certificate verified against the CA we are
// given: never insecurely), and answers with a certificate whose name and
// addresses it chose. Then tls/{agent.key,agent.crt,ca.crt} and agent.yaml are
// written, each atomically, agent.yaml last.
import { X509Certificate, createPrivateKey } from "node:crypto";
import { link, mkdir, readFile, rename, unlink, writeFile } from "node:fs/promises";
import { request } from "node:https";
import path from "node:path";
import YAML from "yaml";
import { z } from "zod";
import { ConfigError, parseAgentConfig } from "../common/config.ts";
import { Backoff, sleep } from "../common/retry.ts";
import { createCsr, writeAtomic } from "../common/tls.ts";

export const ENROLL_TOKEN_ENV = "UNDERSTUDY_ENROLL_TOKEN";

export interface EnrollOptions {
  /** the operator's enrollment endpoint: https://host:port (path /v1/enroll is added when there is none) */
  url: string;
  token: string;
  /** the CA certificate(s) to verify the operator with, PEM */
  caPem: string;
  /** where caPem came from, for messages (a file name, or "--ca-pem") */
  caSource: string;
  /** config directory: agent.yaml and tls/ */
  dir: string;
  listen: string;
  dataDir: string;
  /** make the agent a target keeping images here */
  targetRoot?: string;
  /** this host's name, told to the operator (and the CSR's CN: a hint, the operator chooses) */
  hostname: string;
  agentVersion: string;
  /** replace an existing agent.yaml */
  force?: boolean;
  /** how long to keep trying to reach the operator (default 2 minutes) */
  timeoutMs?: number;
  /** progress lines (retries) */
  progress?: (line: string) => void;
}

export interface EnrollResult {
  agentName: string;
  admins: string[];
  configPath: string;
  certPath: string;
  keyPath: string;
  caPath: string;
  /** the certificate's expiry */
  validTo: Date;
  /** a placeholder agent.yaml (install.sh's example) was replaced */
  replacedPlaceholder: boolean;
}

/** The operator refused the enrollment (HTTP 4xx): its reason and message. */
export class EnrollRefusedError extends Error {
  override name = "EnrollRefusedError";
  readonly status: number;
  readonly reason: string;
  constructor(status: number, reason: string, message: string) {
    super(message);
    this.status = status;
    this.reason = reason;
  }
}

/** errors of reaching the operator that a later attempt may not have */
const NETWORK_ERRORS = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "EHOSTDOWN", "ENETDOWN", "EAI_AGAIN", "ENOTFOUND", "EPIPE", "ECONNABORTED", "ERR_ENROLL_TIMEOUT"]);
const REQUEST_TIMEOUT_MS = 30_000;
const MAX_RESPONSE_BYTES = 1 << 20;

const ResponseSchema = z.object({
  certPem: z.string().min(1),
  caPem: z.string().min(1),
  agentName: z.string().min(1),
  admins: z.array(z.string().min(1)),
});

class NetworkError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.code = code;
  }
}

function endpoint(raw: string): URL {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new Error(`--url: not a URL: ${JSON.stringify(raw)} (e.g. https://10.0.0.1:7443)`);
  }
  if (u.protocol !== "https:") throw new Error(`--url: ${raw}: only https:// is accepted (the token must not travel in the clear)`);
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/v1/enroll";
  return u;
}

function certsIn(pem: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  return blocks.map((b) => new X509Certificate(b));
}

function trustedCAs(pem: string, source: string): X509Certificate[] {
  let cas: X509Certificate[];
  try {
    cas = certsIn(pem);
  } catch {
    throw new Error(`${source}: not a valid PEM certificate`);
  }
  if (cas.length === 0) throw new Error(`${source} contains no PEM certificate (expected the understudy CA's ca.crt)`);
  if (!cas.some((c) => c.ca)) throw new Error(`${source}: not a CA certificate (expected the understudy CA's ca.crt)`);
  return cas;
}

function tlsFailure(url: URL, caSource: string, code: string, message: string): Error {
  return new Error(
    `TLS verification of the operator at ${url.origin} failed: ${message} (${code}). Its certificate is not signed by the CA in ${caSource}, or not made for ${url.hostname}: check --url and that ${caSource} is the understudy CA certificate. (Enrollment never proceeds with an unverified operator.)`,
  );
}

/** One POST; resolves with the HTTP status and body, rejects with NetworkError (retryable) or Error. */
function post(url: URL, caPem: string, caSource: string, body: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(url, {
      method: "POST",
      ca: caPem,
      agent: false,
      headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), Accept: "application/json" },
    });
    req.setTimeout(REQUEST_TIMEOUT_MS, () => req.destroy(Object.assign(new Error(`no answer within ${REQUEST_TIMEOUT_MS / 1000}s`), { code: "ERR_ENROLL_TIMEOUT" })));
    req.on("response", (res) => {
      const chunks: Buffer[] = [];
      let size = 0;
      res.on("data", (c: Buffer) => {
        size += c.length;
        if (size > MAX_RESPONSE_BYTES) return void req.destroy(new Error(`the operator's answer is over ${MAX_RESPONSE_BYTES} bytes`));
        chunks.push(c);
      });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString("utf8") }));
      res.on("error", (e) => reject(e));
    });
    req.on("error", (e: NodeJS.ErrnoException) => {
      const code = e.code ?? "";
      if (NETWORK_ERRORS.has(code)) return reject(new NetworkError(code, e.message));
      if (/CERT|SELF_SIGNED|UNABLE_TO_(VERIFY|GET)|ALTNAME|ERR_TLS/.test(code)) return reject(tlsFailure(url, caSource, code, e.message));
      reject(new Error(`cannot enroll with ${url.origin}: ${e.message}${code ? ` (${code})` : ""}`));
    });
    req.end(body);
  });
}

function answerError(status: number, text: string): Error {
  let j: { error?: unknown; reason?: unknown } | undefined;
  try {
    j = JSON.parse(text) as typeof j;
  } catch {
    j = undefined;
  }
  const msg = typeof j?.error === "string" ? j.error : text.trim().slice(0, 200) || "(no message)";
  if (status >= 400 && status < 500 && status !== 404 && status !== 405 && typeof j?.reason === "string") return new EnrollRefusedError(status, j.reason, msg);
  return new Error(`the operator answered HTTP ${status}: ${msg}`);
}

/** an agent.yaml that install.sh wrote from agent.yaml.example and nobody filled in */
function isPlaceholder(text: string): boolean {
  try {
    return (YAML.parse(text) as { name?: unknown } | null)?.name === "CHANGE-ME";
  } catch {
    return false;
  }
}

function agentConfig(o: { name: string; listen: string; dataDir: string; targetRoot?: string; tls: { ca: string; cert: string; key: string }; admins: string[] }): Record<string, unknown> {
  return {
    name: o.name,
    listen: o.listen,
    dataDir: o.dataDir,
    tls: o.tls,
    control: { admins: o.admins },
    ...(o.targetRoot ? { target: { root: o.targetRoot } } : {}),
  };
}

function fmtSeconds(ms: number): string {
  return ms >= 10_000 ? `${Math.round(ms / 1000)}s` : `${(ms / 1000).toFixed(1)}s`;
}

export async function enroll(o: EnrollOptions): Promise<EnrollResult> {
  const url = endpoint(o.url);
  const token = o.token.trim();
  if (!token) throw new Error(`no enrollment token: pass --token or set ${ENROLL_TOKEN_ENV}`);
  const trusted = trustedCAs(o.caPem, o.caSource);
  const progress = o.progress ?? (() => {});

  const dir = path.resolve(o.dir);
  const tlsDir = path.join(dir, "tls");
  const configPath = path.join(dir, "agent.yaml");
  const keyPath = path.join(tlsDir, "agent.key");
  const certPath = path.join(tlsDir, "agent.crt");
  const caPath = path.join(tlsDir, "ca.crt");
  const dataDir = path.resolve(o.dataDir);
  const targetRoot = o.targetRoot ? path.resolve(o.targetRoot) : undefined;
  const tls = { ca: caPath, cert: certPath, key: keyPath };

  // everything that can be wrong here is found before the token is spent
  let replacedPlaceholder = false;
  const existing = await readFile(configPath, "utf8").catch((e: NodeJS.ErrnoException) => {
    if (e.code === "ENOENT") return undefined;
    throw new Error(`cannot read ${configPath}: ${e.code ?? e.message}`);
  });
  if (existing !== undefined) {
    if (isPlaceholder(existing)) replacedPlaceholder = true;
    else if (!o.force) throw new Error(`${configPath} already exists; refusing to overwrite it (this host has an agent config already: pass --force to replace it and its tls/agent.* files)`);
  }
  try {
    parseAgentConfig(agentConfig({ name: "placeholder", listen: o.listen, dataDir, targetRoot, tls, admins: [] }), dir, "agent.yaml");
  } catch (e) {
    if (e instanceof ConfigError) throw new Error(`the options would make an invalid agent config: ${e.message.replace(/^invalid config agent\.yaml:\n\s*/, "")}`);
    throw e;
  }

  const { csrPem, keyPem } = await createCsr(undefined, { commonName: o.hostname || "understudy-agent" });
  const body = JSON.stringify({ token, csr: csrPem, agentVersion: o.agentVersion, hostname: o.hostname });

  // network errors only are retried (the same key and CSR each time, so an answer lost on the
  // way back can be asked for again); refusals, TLS failures and other answers end it
  const deadline = Date.now() + (o.timeoutMs ?? 120_000);
  const backoff = new Backoff({ initialMs: 500, maxMs: 10_000 });
  let answer: { status: number; body: string };
  for (;;) {
    try {
      answer = await post(url, o.caPem, o.caSource, body);
      break;
    } catch (e) {
      if (!(e instanceof NetworkError)) throw e;
      const delay = backoff.next();
      const left = deadline - Date.now();
      if (delay > left) throw new Error(`cannot reach the operator at ${url.origin} (${backoff.failures} attempts): ${e.message}`);
      progress(`cannot reach the operator at ${url.origin}: ${e.code}; retrying in ${fmtSeconds(delay)} (attempt ${backoff.failures}, giving up in ${fmtSeconds(left)})`);
      await sleep(delay);
    }
  }
  if (answer.status !== 200) throw answerError(answer.status, answer.body);

  let granted: z.infer<typeof ResponseSchema>;
  try {
    granted = ResponseSchema.parse(JSON.parse(answer.body));
  } catch {
    throw new Error(`the operator's answer is not an enrollment response`);
  }
  // trust nothing in the answer that we can check: the certificate is for our key and from our CA
  let cert: X509Certificate;
  try {
    [cert] = certsIn(granted.certPem) as [X509Certificate];
  } catch {
    throw new Error("the operator's answer holds no valid certificate");
  }
  if (!cert) throw new Error("the operator's answer holds no certificate");
  if (!cert.checkPrivateKey(createPrivateKey(keyPem))) throw new Error("the certificate the operator sent is not for this host's key");
  if (!trusted.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey))) throw new Error(`the certificate the operator sent is not signed by the CA in ${o.caSource}`);
  let answerCAs: X509Certificate[];
  try {
    answerCAs = certsIn(granted.caPem);
  } catch {
    throw new Error("the operator's answer holds an invalid CA certificate");
  }
  if (!answerCAs.some((a) => trusted.some((t) => t.fingerprint256 === a.fingerprint256))) throw new Error(`the CA certificate the operator sent is not the one in ${o.caSource}`);

  const config = agentConfig({ name: granted.agentName, listen: o.listen, dataDir, targetRoot, tls, admins: granted.admins });
  try {
    parseAgentConfig(structuredClone(config), dir, configPath);
  } catch (e) {
    if (e instanceof ConfigError) throw new Error(`the operator's answer makes an invalid agent config: ${e.message}`);
    throw e;
  }

  await mkdir(tlsDir, { recursive: true, mode: 0o700 }).catch((e: NodeJS.ErrnoException) => {
    throw new Error(`cannot create ${tlsDir}: ${e.code ?? e.message}`);
  });
  await writeAtomic(keyPath, keyPem, 0o600);
  await writeAtomic(certPath, granted.certPem, 0o644);
  await writeAtomic(caPath, granted.caPem.endsWith("\n") ? granted.caPem : granted.caPem + "\n", 0o644);

  const text =
    `# written by \`understudy enroll\` (${new Date().toISOString()}) from ${url.origin}\n` +
    `# the name, certificate and admins are the operator's; listen, dataDir and target are this host's\n` +
    YAML.stringify(config);
  const tmp = `${configPath}.${process.pid}.tmp`;
  try {
    await writeFile(tmp, text, { mode: 0o600, flag: "w" });
    if (existing !== undefined) await rename(tmp, configPath);
    else {
      // link, not rename: refuses to replace a config that appeared meanwhile
      await link(tmp, configPath).catch((e: NodeJS.ErrnoException) => {
        if (e.code === "EEXIST") throw new Error(`${configPath} appeared while enrolling; not replaced. The certificate is in ${certPath}; pass --force with a new token to replace the config`);
        throw e;
      });
    }
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw code ? new Error(`cannot write ${configPath}: ${code}`) : e;
  } finally {
    await unlink(tmp).catch(() => {});
  }
  return { agentName: granted.agentName, admins: granted.admins, configPath, certPath, keyPath, caPath, validTo: new Date(cert.validTo), replacedPlaceholder };
}
