// Enrollment as a new host meets it: an EnrollmentServer (fresh CA, the
// in-memory store) on 127.0.0.1, and the real `understudy enroll` command. The
// key is made by the command and stays on the "host"; the certificate's name and
// addresses are the store's, not the CSR's; the written agent.yaml starts an
// agent that serves status over mTLS; a token works once; tampered tokens,
// tokens of another CA and a wrong CA file are refused without spending the
// token; an existing agent.yaml is kept unless --force; the command keeps
// trying while the operator is unreachable.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { X509Certificate, createHash, createPrivateKey, createPublicKey, randomUUID } from "node:crypto";
import { copyFile, mkdir, readFile, readdir, rm, stat, writeFile } from "node:fs/promises";
import { request } from "node:https";
import path from "node:path";
import { Writable } from "node:stream";
import { pino } from "pino";
import YAML from "yaml";
import { loadAgentConfig } from "../../common/config.ts";
import { createCsr, newCA, signLeaf, type NewCA } from "../../common/tls.ts";
import { EnrollmentServer, InMemoryEnrollmentStore, type Grant } from "../../operator/enroll/server.ts";
import { enrollmentKey, issueToken, tokenId } from "../../operator/enroll/tokens.ts";
import { AgentProc, CLI, REPO, freePort, tmpDir, waitFor } from "./harness.ts";

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** `understudy enroll <args>`, with extra environment (the token, usually). */
function enrollCli(args: string[], env: Record<string, string> = {}): Promise<Run> {
  const e: NodeJS.ProcessEnv = { ...process.env, ...env };
  if (!("UNDERSTUDY_ENROLL_TOKEN" in env)) delete e.UNDERSTUDY_ENROLL_TOKEN;
  return new Promise((resolve) =>
    execFile(process.execPath, [CLI, "enroll", ...args], { env: e, maxBuffer: 16 << 20, timeout: 120_000 }, (err, stdout, stderr) => {
      outputs.push(stdout, stderr);
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr });
    }),
  );
}

/** Everything the enroll command printed, and every token minted (for the secrets scan at the end). */
const outputs: string[] = [];
const tokens: string[] = [];

const mode = async (p: string) => (await stat(p)).mode & 0o777;

let dir: string;
let ca: NewCA;
let other: NewCA;
let caFile: string;
let otherCaFile: string;
let key: Buffer;
let store: InMemoryEnrollmentStore;
let server: EnrollmentServer;
let url: string;
const logLines: string[] = [];
let serverCert: { certPem: string; keyPem: string };

function makeServer(port: number): EnrollmentServer {
  const log = pino({ level: "info" }, new Writable({ write: (c: Buffer, _e, cb) => (logLines.push(c.toString()), cb()) }));
  return new EnrollmentServer({ ca, key, serverCertPem: serverCert.certPem, serverKeyPem: serverCert.keyPem, store, log, host: "127.0.0.1", port });
}

/** A pending enrollment in the store, and its token. */
function mint(sub: string, grant: Grant, o: { key?: Buffer; expInMs?: number } = {}): string {
  const nonce = randomUUID();
  store.add(sub, { nonce, ...grant });
  const t = issueToken(o.key ?? key, { sub, nonce, exp: Date.now() + (o.expInMs ?? 600_000) });
  tokens.push(t);
  return t;
}

/** The usual command line for a host whose config directory is `d`. */
async function hostArgs(d: string, extra: string[] = []): Promise<string[]> {
  return ["--url", url, "--ca-file", caFile, "--dir", path.join(d, "etc"), "--listen", `127.0.0.1:${await freePort()}`, "--data-dir", path.join(d, "data"), "--target-root", path.join(d, "replicas"), ...extra];
}

function httpsCall(method: string, p: string, body?: string | Buffer): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request(`${url}${p}`, { method, ca: ca.certPem, agent: false, headers: body ? { "Content-Type": "application/json" } : {} }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

const WEB1: Grant = { agentName: "dr-web1", sans: [{ type: "dns", value: "dr-web1.example.internal" }], admins: ["understudy-operator", "ops-admin"] };

before(async () => {
  dir = await tmpDir("understudy-enroll-");
  ca = await newCA("understudy enroll test CA", 30);
  other = await newCA("someone else's CA", 30);
  caFile = path.join(dir, "ca.crt");
  otherCaFile = path.join(dir, "other-ca.crt");
  await writeFile(caFile, ca.certPem);
  await writeFile(otherCaFile, other.certPem);
  key = enrollmentKey(ca.keyPem);
  serverCert = await signLeaf(ca, { commonName: "understudy-enrollment", usage: "server", sans: [{ type: "ip", value: "127.0.0.1" }, { type: "dns", value: "localhost" }], days: 30 });
  store = new InMemoryEnrollmentStore();
  server = makeServer(0);
  const { port } = await server.start();
  url = `https://127.0.0.1:${port}`;
});

after(async () => {
  await server?.stop();
  if (!process.env.KEEP_TEST_DIRS) await rm(dir, { recursive: true, force: true });
});

describe("understudy enroll", { concurrency: false }, () => {
  const host1 = () => path.join(dir, "host1");
  let token1: string;

  test("enrolls: own key, the operator's name and SANs, files with their modes", async () => {
    token1 = mint("prod/web-data/dr", WEB1);
    // the CSR asks for CN=i-want-another-name: the store's choice wins
    const r = await enrollCli(await hostArgs(host1(), ["--hostname", "i-want-another-name"]), { UNDERSTUDY_ENROLL_TOKEN: token1 });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /enrolled as dr-web1 .*admins: understudy-operator, ops-admin/);
    const etc = path.join(host1(), "etc");
    const tlsDir = path.join(etc, "tls");
    assert.deepEqual((await readdir(tlsDir)).sort(), ["agent.crt", "agent.key", "ca.crt"]);
    assert.equal(await mode(path.join(tlsDir, "agent.key")), 0o600);
    assert.equal(await mode(path.join(tlsDir, "agent.crt")), 0o644);
    assert.equal(await mode(path.join(tlsDir, "ca.crt")), 0o644);
    assert.equal(await mode(path.join(etc, "agent.yaml")), 0o600);
    assert.equal(await mode(tlsDir), 0o700);
    assert.deepEqual((await readdir(etc)).sort(), ["agent.yaml", "tls"], "no temp files left");

    const certPem = await readFile(path.join(tlsDir, "agent.crt"), "utf8");
    const cert = new X509Certificate(certPem);
    const keyObj = createPrivateKey(await readFile(path.join(tlsDir, "agent.key")));
    assert.equal(cert.subject, "CN=dr-web1");
    assert.equal(cert.subjectAltName, "DNS:dr-web1.example.internal, IP Address:127.0.0.1", "the store's SANs plus the peer address");
    assert.doesNotMatch(certPem + cert.subject + cert.subjectAltName, /i-want-another-name/);
    assert.ok(cert.checkPrivateKey(keyObj), "the certificate is for the key made on the host");
    assert.ok(cert.verify(new X509Certificate(ca.certPem).publicKey));
    assert.equal(await readFile(path.join(tlsDir, "ca.crt"), "utf8"), ca.certPem);

    // the store saw who consumed it: the host's claimed name and the key's hash
    const used = store.get("prod/web-data/dr");
    assert.ok(used?.usedAt);
    assert.equal(used.usedBy?.hostname, "i-want-another-name");
    assert.equal(used.usedBy?.peerAddress, "127.0.0.1");
    assert.equal(used.usedBy?.publicKeySha256, createHash("sha256").update(createPublicKey(keyObj).export({ type: "spki", format: "der" })).digest("hex"));

    const y = YAML.parse(await readFile(path.join(etc, "agent.yaml"), "utf8")) as Record<string, unknown>;
    assert.equal(y.name, "dr-web1");
    assert.deepEqual(y.tls, { ca: path.join(tlsDir, "ca.crt"), cert: path.join(tlsDir, "agent.crt"), key: path.join(tlsDir, "agent.key") });
    assert.deepEqual(y.control, { admins: ["understudy-operator", "ops-admin"] });
    assert.deepEqual(y.target, { root: path.join(host1(), "replicas") });
    assert.equal(y.dataDir, path.join(host1(), "data"));

    // the operator's log has the enrollment by token id, never the token
    const logs = logLines.join("");
    assert.match(logs, new RegExp(`"tokenId":"${tokenId(token1)}".*"agentName":"dr-web1".*"peer":"127\\.0\\.0\\.1"`));
    assert.ok(!logs.includes(token1), "the token is not logged");
  });

  test("the enrolled agent starts with the written agent.yaml and serves status over mTLS", async () => {
    const configPath = path.join(host1(), "etc", "agent.yaml");
    const cfg = await loadAgentConfig(configPath);
    const port = Number(cfg.listen.split(":").at(-1));
    const agent = new AgentProc("dr-web1", configPath, port, path.join(host1(), "agent.log"));
    try {
      await agent.start(cfg.tls); // waits for Status over mTLS with the enrolled certificate
      const { fetchStatus } = await import("../../agent/control-client.ts");
      const s = await fetchStatus(agent.address, cfg.tls);
      assert.equal(s.name, "dr-web1");
    } finally {
      await agent.stop();
    }
  });

  test("a replayed token is refused (exit 2, says it was used, when and by whom); nothing is written", async () => {
    const d = path.join(dir, "host-replay");
    const r = await enrollCli(await hostArgs(d), { UNDERSTUDY_ENROLL_TOKEN: token1 });
    assert.equal(r.code, 2, r.stderr + r.stdout);
    assert.match(r.stderr, /refused the enrollment \(used\): enrollment token already used at \d{4}-\d\d-\d\dT[\d:.]+Z by 127\.0\.0\.1 .*ask the operator for a new one/);
    await assert.rejects(stat(path.join(d, "etc", "agent.yaml")), { code: "ENOENT" });
    assert.equal(r.stdout, "");
  });

  test("a tampered token and a token signed with another CA's key are refused (exit 2); the genuine token still works", async () => {
    const genuine = mint("prod/app/dr", { agentName: "dr-app", sans: [], admins: ["understudy-operator"] });
    const [p, , s] = genuine.split(".");
    const forgedClaims = Buffer.from(JSON.stringify({ sub: "prod/app/dr", nonce: "x", exp: Date.now() + 1e9 })).toString("base64url");
    const d = path.join(dir, "host-tamper");
    // --token (not the environment) this time
    const t1 = await enrollCli([...(await hostArgs(d)), "--token", `${p}.${forgedClaims}.${s}`]);
    assert.equal(t1.code, 2, t1.stderr);
    assert.match(t1.stderr, /\(bad-signature\): .*signature does not verify/);
    const foreign = issueToken(enrollmentKey(other.keyPem), { sub: "prod/app/dr", nonce: store.get("prod/app/dr")!.nonce, exp: Date.now() + 60_000 });
    const t2 = await enrollCli(await hostArgs(d), { UNDERSTUDY_ENROLL_TOKEN: foreign });
    assert.equal(t2.code, 2, t2.stderr);
    assert.match(t2.stderr, /\(bad-signature\): .*another CA/);
    const garbage = await enrollCli(await hostArgs(d), { UNDERSTUDY_ENROLL_TOKEN: "hello" });
    assert.equal(garbage.code, 2, garbage.stderr);
    assert.match(garbage.stderr, /\(malformed\): not an enrollment token/);
    const expired = await enrollCli(await hostArgs(d), { UNDERSTUDY_ENROLL_TOKEN: mint("prod/old/dr", WEB1, { expInMs: -1000 }) });
    assert.equal(expired.code, 2, expired.stderr);
    assert.match(expired.stderr, /\(expired\): the enrollment token expired at/);
    const superseded = mint("prod/app2/dr", WEB1);
    mint("prod/app2/dr", WEB1); // reissued
    const sup = await enrollCli(await hostArgs(d), { UNDERSTUDY_ENROLL_TOKEN: superseded });
    assert.equal(sup.code, 2, sup.stderr);
    assert.match(sup.stderr, /\(superseded\)/);

    assert.equal(store.get("prod/app/dr")?.usedAt, undefined, "not spent by the refusals");
    const ok = await enrollCli(await hostArgs(d), { UNDERSTUDY_ENROLL_TOKEN: genuine });
    assert.equal(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /enrolled as dr-app/);
  });

  test("a wrong CA file: TLS verification of the operator fails (exit 1), the token is not spent", async () => {
    const token = mint("prod/web2/dr", { agentName: "dr-web2", sans: [], admins: ["understudy-operator"] });
    const d = path.join(dir, "host-wrongca");
    const args = (await hostArgs(d)).map((a) => (a === caFile ? otherCaFile : a));
    const r = await enrollCli(args, { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /TLS verification of the operator at https:\/\/127\.0\.0\.1:\d+ failed: .*not signed by the CA in .*other-ca\.crt/);
    assert.doesNotMatch(r.stderr, /retrying/, "a TLS failure is not retried");
    await assert.rejects(stat(path.join(d, "etc")), { code: "ENOENT" });
    assert.equal(store.get("prod/web2/dr")?.usedAt, undefined);
    // not a CA at all
    const leafFile = path.join(dir, "leaf.crt");
    await writeFile(leafFile, serverCert.certPem);
    const r2 = await enrollCli((await hostArgs(d)).map((a) => (a === caFile ? leafFile : a)), { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /not a CA certificate/);
    // http:// is never used
    const r3 = await enrollCli((await hostArgs(d)).map((a) => (a === url ? url.replace("https", "http") : a)), { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(r3.code, 1);
    assert.match(r3.stderr, /only https:\/\/ is accepted/);
    assert.equal(store.get("prod/web2/dr")?.usedAt, undefined);
  });

  test("an existing agent.yaml is kept without --force (token not spent), replaced with it", async () => {
    const token = mint("prod/web3/dr", { agentName: "dr-web3", sans: [], admins: ["understudy-operator"] });
    const conf = path.join(host1(), "etc", "agent.yaml");
    const before = await readFile(conf);
    const keyBefore = await readFile(path.join(host1(), "etc", "tls", "agent.key"));
    const r = await enrollCli(await hostArgs(host1()), { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /agent\.yaml already exists; refusing to overwrite it .*--force/);
    assert.deepEqual(await readFile(conf), before);
    assert.deepEqual(await readFile(path.join(host1(), "etc", "tls", "agent.key")), keyBefore);
    assert.equal(store.get("prod/web3/dr")?.usedAt, undefined);

    const f = await enrollCli(await hostArgs(host1(), ["--force"]), { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(f.code, 0, f.stderr);
    assert.equal((YAML.parse(await readFile(conf, "utf8")) as { name: string }).name, "dr-web3");
    assert.notDeepEqual(await readFile(path.join(host1(), "etc", "tls", "agent.key")), keyBefore, "a new key");
    assert.equal(await mode(conf), 0o600);
  });

  test("install.sh's unedited example config is replaced without --force; --ca-pem works inline", async () => {
    const d = path.join(dir, "host-bundle");
    await mkdir(path.join(d, "etc"), { recursive: true });
    await copyFile(path.join(REPO, "bundle", "agent.yaml.example"), path.join(d, "etc", "agent.yaml"));
    const token = mint("prod/web4/dr", { agentName: "dr-web4", sans: [], admins: [] });
    const args = (await hostArgs(d)).flatMap((a, i, all) => (a === "--ca-file" ? [] : all[i - 1] === "--ca-file" ? ["--ca-pem", ca.certPem.replace(/\n/g, "\\n")] : [a]));
    const r = await enrollCli(args, { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /replacing the unedited example/);
    const y = YAML.parse(await readFile(path.join(d, "etc", "agent.yaml"), "utf8")) as { name: string; control: { admins: string[] } };
    assert.equal(y.name, "dr-web4");
    assert.deepEqual(y.control.admins, []);
  });

  test("bad options are refused before the token is spent", async () => {
    const token = mint("prod/web5/dr", { agentName: "dr-web5", sans: [], admins: [] });
    const d = path.join(dir, "host-badopts");
    const noToken = await enrollCli(await hostArgs(d));
    assert.equal(noToken.code, 1);
    assert.match(noToken.stderr, /no enrollment token: set UNDERSTUDY_ENROLL_TOKEN/);
    const badListen = await enrollCli((await hostArgs(d)).map((a) => (a.startsWith("127.0.0.1:") ? "nowhere" : a)), { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(badListen.code, 1);
    assert.match(badListen.stderr, /listen: expected host:port/);
    const noCa = await enrollCli((await hostArgs(d)).filter((a, i, all) => a !== "--ca-file" && all[i - 1] !== "--ca-file"), { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(noCa.code, 1);
    assert.match(noCa.stderr, /--ca-file <ca\.crt> or --ca-pem/);
    assert.equal(store.get("prod/web5/dr")?.usedAt, undefined);
  });

  test("while the operator is unreachable the command retries, then enrolls when it comes up", async () => {
    const port = await freePort();
    const token = mint("prod/web6/dr", { agentName: "dr-web6", sans: [], admins: [] });
    const d = path.join(dir, "host-retry");
    const args = (await hostArgs(d)).map((a) => (a === url ? `https://127.0.0.1:${port}` : a));
    // spawned by hand, to start the operator only once the command has failed to reach it
    const child = spawn(process.execPath, [CLI, "enroll", ...args], { env: { ...process.env, UNDERSTUDY_ENROLL_TOKEN: token }, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    child.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
    const late = makeServer(port);
    try {
      await waitFor("the command to report a retry", () => /retrying/.test(stderr), 60_000);
      await late.start();
      assert.equal(await exited, 0, stderr);
      assert.match(stderr, /cannot reach the operator at https:\/\/127\.0\.0\.1:\d+: ECONNREFUSED; retrying in [\d.]+s \(attempt 1, giving up in/);
      assert.match(stdout, /enrolled as dr-web6/);
    } finally {
      child.kill("SIGKILL");
      await late.stop();
    }
    // and it gives up after --timeout
    const gone = await enrollCli([...(await hostArgs(path.join(dir, "host-gone"))).map((a) => (a === url ? `https://127.0.0.1:${port}` : a)), "--timeout", "2s"], { UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(gone.code, 1, gone.stderr);
    assert.match(gone.stderr, /cannot reach the operator at https:\/\/127\.0\.0\.1:\d+ \(\d+ attempts\): .*ECONNREFUSED/);
  });
});

describe("enrollment server", () => {
  test("healthz; bad requests are 400 and do not spend the token; over 64 KiB is 413; unknown paths 404", async () => {
    assert.deepEqual(await httpsCall("GET", "/healthz"), { status: 200, body: "ok\n" });
    assert.equal((await httpsCall("GET", "/nope")).status, 404);
    assert.equal((await httpsCall("GET", "/v1/enroll")).status, 405);
    const notJson = await httpsCall("POST", "/v1/enroll", "{nope");
    assert.equal(notJson.status, 400);
    assert.deepEqual(JSON.parse(notJson.body), { error: "the request body is not JSON", reason: "bad-request" });
    const missing = await httpsCall("POST", "/v1/enroll", JSON.stringify({ token: "x" }));
    assert.equal(missing.status, 400);
    assert.match(JSON.parse(missing.body).error, /csr/);
    const big = await httpsCall("POST", "/v1/enroll", Buffer.alloc(65 * 1024, "a"));
    assert.equal(big.status, 413);

    const token = mint("prod/web7/dr", { agentName: "dr-web7", sans: [], admins: [] });
    const badCsr = await httpsCall("POST", "/v1/enroll", JSON.stringify({ token, csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", agentVersion: "t", hostname: "h" }));
    assert.equal(badCsr.status, 400);
    assert.equal(JSON.parse(badCsr.body).reason, "bad-csr");
    assert.equal(store.get("prod/web7/dr")?.usedAt, undefined, "a bad CSR does not spend the token");
    const { csrPem } = await createCsr();
    const unknown = await httpsCall("POST", "/v1/enroll", JSON.stringify({ token: issueToken(key, { sub: "nobody", nonce: "n", exp: Date.now() + 60_000 }), csr: csrPem }));
    assert.equal(unknown.status, 403);
    assert.equal(JSON.parse(unknown.body).reason, "unknown");
    const bad = await httpsCall("POST", "/v1/enroll", JSON.stringify({ token: "ust1.x.y", csr: "x" }));
    assert.equal(bad.status, 401);
    assert.equal(JSON.parse(bad.body).reason, "bad-signature");
    assert.ok(!logLines.join("").includes(token));
  });
});

describe("secrets", () => {
  test("no enrollment token, nor any private key, appears in the server's log or the command's output", async () => {
    assert.ok(tokens.length >= 5 && outputs.length >= 5 && logLines.length > 0, "the tests above ran (tokens minted, commands run, the server logged)");
    // Private keys: the CA's, the server's, the enrollment (token signing) key, and every key the command wrote.
    const keys = [ca.keyPem, other.keyPem, serverCert.keyPem];
    const walk = async (d: string): Promise<void> => {
      for (const e of await readdir(d, { withFileTypes: true }).catch(() => [])) {
        const p = path.join(d, e.name);
        if (e.isDirectory()) await walk(p);
        else if (/\.key$|key\.pem$/.test(e.name)) keys.push(await readFile(p, "utf8"));
      }
    };
    await walk(dir);
    assert.ok(keys.length > 3, "the enrolled hosts' private keys were found");
    // A distinctive piece of each: the token itself and its signature; a line of each key's body.
    const needles: [string, string][] = [...tokens.flatMap((t, i) => [[`token ${i + 1}`, t], [`token ${i + 1}'s signature`, t.slice(-24)]] as [string, string][]), ["the enrollment key (hex)", key.toString("hex")], ["the enrollment key (base64url)", key.toString("base64url")]];
    for (const [i, k] of keys.entries()) for (const line of k.split("\n").filter((l) => l.length >= 40 && !l.startsWith("-----")).slice(0, 2)) needles.push([`private key ${i + 1}`, line]);
    const haystacks: [string, string][] = [["the enrollment server's log", logLines.join("")], ["the enroll command's output", outputs.join("\n")]];
    for (const [where, text] of haystacks) for (const [what, needle] of needles) assert.ok(!text.includes(needle), `${what} appears in ${where}`);
  });
});
