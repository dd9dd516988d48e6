// mTLS: certificate issuance (common/tls.ts) and real grpc-js handshakes over 127.0.0.1,
// including the refusals that make mTLS worth having.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { X509Certificate, createHash, createPrivateKey } from "node:crypto";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { certFingerprint, clientCredentials, createCA, dialOptions, issueCert, peerCommonName, serverCredentials } from "../../common/tls.ts";
import { ControlClient, ControlService, type ControlServer, type StatusResponse } from "../../proto/gen/understudy/v1/control.ts";

const SERVER_AUTH = "1.3.6.1.5.5.7.3.1";
const CLIENT_AUTH = "1.3.6.1.5.5.7.3.2";
const DAY_MS = 86_400_000;

type Issued = { certPath: string; keyPath: string; caPath: string };

let dir: string;
let ca: { certPath: string; keyPath: string };
let src: Issued; // client identity
let tgt: Issued; // server identity
let noIpSan: Issued; // server cert without the 127.0.0.1 SAN
let nameForIp: Issued; // server cert whose DNS SAN is the name sent for 127.0.0.1, without the IP SAN
let rogueSrc: Issued; // "src", but issued by another CA
let rogueTgt: Issued; // a server cert (127.0.0.1) issued by another CA
let otherCaPath: string;

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "understudy-tls-"));
  ca = await createCA(path.join(dir, "ca"));
  src = await issueCert({ caDir: path.join(dir, "ca"), name: "src", hosts: ["127.0.0.1", "localhost"], outDir: path.join(dir, "src") });
  tgt = await issueCert({ caDir: path.join(dir, "ca"), name: "tgt", hosts: ["127.0.0.1", "localhost", "::1"], outDir: path.join(dir, "tgt") });
  nameForIp = await issueCert({ caDir: path.join(dir, "ca"), name: "trick", hosts: ["ip4-127-0-0-1.understudy.invalid"], outDir: path.join(dir, "trick") });
  noIpSan = await issueCert({ caDir: path.join(dir, "ca"), name: "elsewhere", hosts: ["tgt.example.internal"], outDir: path.join(dir, "elsewhere") });
  const other = await createCA(path.join(dir, "other-ca"), { commonName: "someone else's CA" });
  otherCaPath = other.certPath;
  rogueSrc = await issueCert({ caDir: path.join(dir, "other-ca"), name: "src", hosts: ["127.0.0.1"], outDir: path.join(dir, "rogue") });
  rogueTgt = await issueCert({ caDir: path.join(dir, "other-ca"), name: "tgt", hosts: ["127.0.0.1"], outDir: path.join(dir, "rogue") });
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const read = (p: string) => readFile(p);
/** Every process warning of this file (Node prints a deprecation once per process: collect from the start). */
const warnings: string[] = [];
process.on("warning", (w: Error & { code?: string }) => warnings.push(`${w.code ?? ""} ${w.message}`));
const tlsOf = (c: Issued) => ({ ca: c.caPath, cert: c.certPath, key: c.keyPath });

type Running = { port: number; seen: (string | undefined)[]; server: grpc.Server };

async function startServer(creds: grpc.ServerCredentials): Promise<Running> {
  const server = new grpc.Server();
  const seen: (string | undefined)[] = [];
  const impl: ControlServer = {
    status: (call, cb) => {
      const name = peerCommonName(call);
      seen.push(name);
      cb(null, { name: name ?? "", agentVersion: "", protocolVersion: 0, sets: [], images: [], uptimeSeconds: 0 });
    },
    mirror: (_call, cb) => cb(null, { started: [] }),
    verify: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
    configureSet: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
    removeSet: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
    promote: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
    mapImage: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
    drain: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
    runCommand: (_call, cb) => cb({ code: grpc.status.UNIMPLEMENTED, details: "probe only", name: "", message: "probe only", metadata: new grpc.Metadata() }),
  };
  server.addService(ControlService, impl);
  const port = await new Promise<number>((resolve, reject) => server.bindAsync("127.0.0.1:0", creds, (e, p) => (e ? reject(e) : resolve(p))));
  return { port, seen, server };
}

/** One Status call on a fresh channel (own subchannel pool: no connection reuse between cases). */
async function status(address: string, creds: grpc.ChannelCredentials): Promise<StatusResponse> {
  const client = new ControlClient(address, creds, { ...dialOptions(address), "grpc.use_local_subchannel_pool": 1 });
  try {
    return await new Promise<StatusResponse>((resolve, reject) =>
      client.status({}, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (e, r) => (e ? reject(e) : resolve(r))),
    );
  } finally {
    client.close();
  }
}

/** Runs `fn` against a fresh mTLS server presenting `serverCert`; the server is always shut down. */
async function withServer(serverCert: Issued, fn: (s: Running) => Promise<void>): Promise<void> {
  const s = await startServer(serverCredentials(tlsOf(serverCert)));
  try {
    await fn(s);
  } finally {
    s.server.forceShutdown();
  }
}

async function assertRefused(p: Promise<unknown>, detail?: RegExp): Promise<grpc.ServiceError> {
  const err = await p.then(
    () => assert.fail("the call succeeded, but it must be refused"),
    (e: unknown) => e as grpc.ServiceError,
  );
  assert.notEqual(err.code, grpc.status.OK);
  assert.notEqual(err.code, grpc.status.DEADLINE_EXCEEDED, `expected a handshake refusal, got a timeout: ${err.message}`);
  if (process.env.TLS_TEST_VERBOSE) console.log(`refused: code ${err.code}: ${err.details}`);
  if (detail) assert.match(err.details, detail);
  return err;
}

describe("certificates", () => {
  test("CA: files, modes, validity, CA constraints", async () => {
    assert.equal((await stat(path.join(dir, "ca"))).mode & 0o777, 0o700);
    assert.equal((await stat(ca.keyPath)).mode & 0o777, 0o600);
    const c = new X509Certificate(await read(ca.certPath));
    assert.equal(c.ca, true);
    assert.equal(c.subject, "CN=understudy CA");
    const days = (c.validToDate.getTime() - Date.now()) / DAY_MS;
    assert.ok(Math.abs(days - 3650) < 1, `CA valid for ${days} days`);
  });

  test("agent certificate: CN, SANs, both EKUs, signed by the CA, 825 days, key 0600, CA copy", async () => {
    const c = new X509Certificate(await read(tgt.certPath));
    assert.equal(c.subject, "CN=tgt");
    assert.equal(c.ca, false);
    assert.equal(c.subjectAltName, "IP Address:127.0.0.1, DNS:localhost, IP Address:0:0:0:0:0:0:0:1");
    assert.deepEqual([...(c.keyUsage ?? [])].sort(), [SERVER_AUTH, CLIENT_AUTH]);
    const caCert = new X509Certificate(await read(ca.certPath));
    assert.ok(c.checkIssued(caCert) && c.verify(caCert.publicKey), "not signed by the CA");
    assert.ok(!c.verify(new X509Certificate(await read(otherCaPath)).publicKey));
    const days = (c.validToDate.getTime() - Date.now()) / DAY_MS;
    assert.ok(Math.abs(days - 825) < 1, `cert valid for ${days} days`);
    assert.ok(c.checkPrivateKey(createPrivateKey(await read(tgt.keyPath))));
    assert.equal((await stat(tgt.keyPath)).mode & 0o777, 0o600);
    assert.deepEqual(await read(tgt.caPath), await read(ca.certPath));
    assert.equal(path.basename(tgt.certPath), "tgt.crt");
    assert.equal(path.basename(tgt.keyPath), "tgt.key");
  });

  test("(e) createCA refuses to overwrite an existing CA key", async () => {
    const original = await read(ca.keyPath);
    await assert.rejects(createCA(path.join(dir, "ca")), /ca\.key already exists; refusing to overwrite/);
    assert.deepEqual(await read(ca.keyPath), original, "ca.key was modified");
  });

  test("issueCert rejects bad input with clear errors", async () => {
    const caDir = path.join(dir, "ca");
    const outDir = path.join(dir, "bad");
    await assert.rejects(issueCert({ caDir, name: "../evil", hosts: [], outDir }), /invalid name/);
    await assert.rejects(issueCert({ caDir, name: "ca", hosts: [], outDir }), /reserved/);
    await assert.rejects(issueCert({ caDir, name: "x", hosts: ["not a host"], outDir }), /invalid host "not a host"/);
    await assert.rejects(issueCert({ caDir: path.join(dir, "nope"), name: "x", hosts: [], outDir }), /cannot read .*nope\/ca\.crt: ENOENT/);
  });

  test("certFingerprint is the SHA-256 of the DER certificate", async () => {
    const der = new X509Certificate(await read(src.certPath)).raw;
    const expected = createHash("sha256").update(der).digest("hex").toUpperCase().match(/../g)!.join(":");
    assert.equal(certFingerprint(src.certPath), expected);
    assert.notEqual(certFingerprint(tgt.certPath), expected);
    assert.throws(() => certFingerprint(src.keyPath), /contains no PEM certificate/);
  });
});

describe("credentials: configuration errors name the field and path", () => {
  test("missing file", () => {
    const missing = path.join(dir, "missing.crt");
    assert.throws(() => serverCredentials({ ...tlsOf(tgt), cert: missing }), { message: `tls.cert: cannot read ${missing}: ENOENT` });
    assert.throws(() => clientCredentials({ ...tlsOf(src), ca: missing }), { message: `tls.ca: cannot read ${missing}: ENOENT` });
    assert.throws(() => clientCredentials({ ...tlsOf(src), key: missing }), { message: `tls.key: cannot read ${missing}: ENOENT` });
  });

  test("not PEM / mismatched key / cert from another CA", async () => {
    const junk = path.join(dir, "junk.pem");
    await writeFile(junk, "hello\n");
    assert.throws(() => serverCredentials({ ...tlsOf(tgt), cert: junk }), /^Error: tls\.cert: .*junk\.pem contains no PEM certificate/);
    assert.throws(() => serverCredentials({ ...tlsOf(tgt), key: junk }), /^Error: tls\.key: .*junk\.pem is not a usable PEM private key/);
    assert.throws(() => serverCredentials({ ...tlsOf(tgt), key: src.keyPath }), /tls\.key: .* does not belong to the certificate in tls\.cert/);
    assert.throws(() => clientCredentials({ ...tlsOf(src), ca: otherCaPath }), /tls\.cert: .* was not issued by the CA in tls\.ca/);
  });

  test("insecure", () => {
    assert.ok(serverCredentials({ insecure: true }) instanceof grpc.ServerCredentials);
    assert.ok(clientCredentials({ insecure: true }) instanceof grpc.ChannelCredentials);
  });
});

describe("mTLS over grpc", () => {
  test("(a) client with src's certificate connects; the server sees CN 'src' (IP and DNS SANs)", async () => {
    await withServer(tgt, async (s) => {
      const r1 = await status(`127.0.0.1:${s.port}`, clientCredentials(tlsOf(src)));
      assert.equal(r1.name, "src");
      const r2 = await status(`localhost:${s.port}`, clientCredentials(tlsOf(src)));
      assert.equal(r2.name, "src");
      assert.deepEqual(s.seen, ["src", "src"]);
    });
  });

  test("(b) a client without a certificate is refused", async () => {
    await withServer(tgt, async (s) => {
      const creds = grpc.credentials.createSsl(await read(ca.certPath));
      await assertRefused(status(`127.0.0.1:${s.port}`, creds));
      assert.deepEqual(s.seen, [], "the handler ran for a client without a certificate");
    });
  });

  test("(c) a client whose certificate is from another CA is refused", async () => {
    await withServer(tgt, async (s) => {
      // built directly: clientCredentials() itself refuses this mismatched configuration
      const creds = grpc.credentials.createSsl(await read(ca.certPath), await read(rogueSrc.keyPath), await read(rogueSrc.certPath));
      await assertRefused(status(`127.0.0.1:${s.port}`, creds));
      assert.deepEqual(s.seen, []);
    });
  });

  test("(d) a client that trusts another CA refuses the server", async () => {
    await withServer(tgt, async (s) => {
      // valid client certificate (the server would accept it), wrong trust anchor
      const creds = grpc.credentials.createSsl(await read(otherCaPath), await read(src.keyPath), await read(src.certPath));
      await assertRefused(status(`127.0.0.1:${s.port}`, creds), /self[- ]signed|verify|issuer/i);
      assert.deepEqual(s.seen, []);
    });
    // the same through clientCredentials(): a server presenting a certificate from another CA
    // (while accepting our client certificate) is refused by the client
    const s = await startServer(grpc.ServerCredentials.createSsl(await read(ca.certPath), [{ cert_chain: await read(rogueTgt.certPath), private_key: await read(rogueTgt.keyPath) }], true));
    try {
      await assertRefused(status(`127.0.0.1:${s.port}`, clientCredentials(tlsOf(src))), /self[- ]signed|verify|issuer/i);
      assert.deepEqual(s.seen, []);
    } finally {
      s.server.forceShutdown();
    }
  });

  test("a server whose certificate lacks the dialled IP is refused", async () => {
    await withServer(noIpSan, async (s) => {
      await assertRefused(status(`127.0.0.1:${s.port}`, clientCredentials(tlsOf(src))), /127\.0\.0\.1|altnames/);
      assert.deepEqual(s.seen, []);
    });
  });

  test("an IP is checked as an IP: a DNS SAN spelling the server name sent for it does not pass", async () => {
    await withServer(nameForIp, async (s) => {
      await assertRefused(status(`127.0.0.1:${s.port}`, clientCredentials(tlsOf(src))), /127\.0\.0\.1|altnames/);
      assert.deepEqual(s.seen, []);
    });
  });

  test("dialling an IP: verified against the IP SANs, and no DEP0123 warning in this whole file", async () => {
    await withServer(tgt, async (s) => {
      assert.equal((await status(`127.0.0.1:${s.port}`, clientCredentials(tlsOf(src)))).name, "src");
    });
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(warnings.filter((w) => w.includes("DEP0123")), []);
    assert.deepEqual(dialOptions("10.0.0.5:7701"), { "grpc.ssl_target_name_override": "ip4-10-0-0-5.understudy.invalid" });
    assert.deepEqual(dialOptions("[fd00::1]:7701"), { "grpc.ssl_target_name_override": "ip6-fd00--1.understudy.invalid" });
    assert.deepEqual(dialOptions("dr1.example.com:7701"), {});
  });

  test("insecure server: no peer name", async () => {
    const s = await startServer(serverCredentials({ insecure: true }));
    try {
      const r = await status(`127.0.0.1:${s.port}`, clientCredentials({ insecure: true }));
      assert.equal(r.name, "");
      assert.deepEqual(s.seen, [undefined]);
    } finally {
      s.server.forceShutdown();
    }
  });
});
