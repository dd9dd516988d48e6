// mTLS for the agents: a small private CA (`understudy certs`), agent certificates
// that both serve and dial with one identity (serverAuth + clientAuth), and grpc
// credentials that require and verify the peer. A verified peer's CN is its agent name.
import { KeyObject, X509Certificate as NodeX509, createHash, createPrivateKey, createPublicKey, randomBytes, type webcrypto as wc } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdir, readFile, rename, stat, unlink, writeFile } from "node:fs/promises";
import { isIP } from "node:net";
import path from "node:path";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import * as grpc from "@grpc/grpc-js";
import type * as X509 from "@peculiar/x509";
import { splitHostPort, type TlsConfig } from "./config.ts";

const CA_DAYS = 3650;
const CERT_DAYS = 825;
/** certificates start this long in the past, so small clock skew between hosts does not matter */
const BACKDATE_MS = 5 * 60_000;
const DAY_MS = 86_400_000;
/** same rule as agent names in config.ts: also safe as a file name */
export const AGENT_NAME = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;
const DNS_NAME = /^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/;
const EC = { name: "ECDSA", namedCurve: "P-256" } as const;
const SIGN = { name: "ECDSA", hash: "SHA-256" } as const;
/** Node curve names of EC keys we can sign with → WebCrypto parameters */
const CURVES: Record<string, { namedCurve: string; hash: string }> = {
  prime256v1: { namedCurve: "P-256", hash: "SHA-256" },
  secp384r1: { namedCurve: "P-384", hash: "SHA-384" },
  secp521r1: { namedCurve: "P-521", hash: "SHA-512" },
};

const webcrypto = globalThis.crypto;

/**
 * @peculiar/x509 uses tsyringe, which needs the reflect-metadata polyfill
 * loaded first. x509 is loaded lazily: agents that merely use credentials
 * never load either.
 */
let x509Module: Promise<typeof X509> | undefined;
function loadX509(): Promise<typeof X509> {
  return (x509Module ??= import("reflect-metadata").then(() => import("@peculiar/x509")));
}

function errCode(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  return err?.code ?? err?.message ?? String(e);
}

function validDays(what: string, days: number | undefined, dflt: number): number {
  const d = days ?? dflt;
  if (!Number.isFinite(d) || d <= 0) throw new Error(`${what}: days must be a positive number, got ${String(days)}`);
  return d;
}

function serialNumber(): string {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x40; // positive, and no leading zero byte to trip DER encoders
  return b.toString("hex");
}

async function exists(p: string): Promise<boolean> {
  try {
    await stat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
    throw e;
  }
}

/** Write via a temp file + rename, so readers never see half a file and a key is never briefly world-readable. */
export async function writeAtomic(file: string, data: string, mode: number): Promise<void> {
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString("hex")}.tmp`;
  try {
    await writeFile(tmp, data, { mode, flag: "wx" });
    await rename(tmp, file);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw new Error(`cannot write ${file}: ${errCode(e)}`);
  }
}

function privateKeyPem(key: wc.CryptoKey): string {
  return KeyObject.from(key).export({ type: "pkcs8", format: "pem" }) as string;
}

/** A CA in memory: what signLeaf needs to sign with it. */
export interface CaSigner {
  /** the CA certificate, PEM */
  certPem: string;
  /** the CA's private key (ECDSA P-256, P-384 or P-521), usable for "sign" */
  signingKey: wc.CryptoKey;
}

/** A new CA in memory: its certificate and key as PEM (what createCA writes to ca.crt and ca.key), and the key to sign with. */
export interface NewCA extends CaSigner {
  /** the private key, PKCS#8 PEM */
  keyPem: string;
}

/** A certificate and its private key (PKCS#8), both PEM. */
export interface IssuedPem {
  certPem: string;
  keyPem: string;
}

/** A subject alternative name: an IP address or a DNS name. */
export interface San {
  type: "ip" | "dns";
  value: string;
}

export interface LeafOptions {
  /** the subject's CN (Kubernetes: the user name; understudy: the agent name) */
  commonName: string;
  /** the subject's O values, one RDN each (Kubernetes: the user's groups) */
  organizations?: readonly string[];
  /** the extended key usage: TLS server, TLS client, or both */
  usage: "server" | "client" | "both";
  /** subject alternative names, in this order */
  sans?: readonly San[];
  /** validity; capped at the CA's own expiry */
  days: number;
}

/**
 * Generate a self-signed CA in memory: ECDSA P-256, CA:true with pathlen 0 (it signs
 * leaves only), keyCertSign + cRLSign + digitalSignature, valid `days` (from BACKDATE_MS ago).
 */
export async function newCA(commonName: string, days: number): Promise<NewCA> {
  const validity = validDays("newCA", days, CA_DAYS);
  const x509 = await loadX509();
  const keys = await webcrypto.subtle.generateKey(EC, true, ["sign", "verify"]);
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned(
    {
      serialNumber: serialNumber(),
      name: [{ CN: [commonName] }],
      notBefore: new Date(now - BACKDATE_MS),
      notAfter: new Date(now + validity * DAY_MS),
      signingAlgorithm: SIGN,
      keys,
      extensions: [
        new x509.BasicConstraintsExtension(true, 0, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign | x509.KeyUsageFlags.digitalSignature, true),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey, false, webcrypto),
      ],
    },
    webcrypto,
  );
  return { certPem: cert.toString("pem") + "\n", keyPem: privateKeyPem(keys.privateKey), signingKey: keys.privateKey };
}

/**
 * The one place certificates are built: a leaf for `publicKey`, signed by `ca`: CA:false,
 * digitalSignature, the extended key usage(s) of `o.usage`, subject and authority key
 * identifiers, the SANs given. A certificate cannot outlive its CA: notAfter is at most the CA's.
 */
async function buildLeaf(what: string, ca: CaSigner, publicKey: wc.CryptoKey | X509.PublicKey, o: LeafOptions): Promise<string> {
  const days = validDays(what, o.days, CERT_DAYS);
  const x509 = await loadX509();
  const alg = ca.signingKey.algorithm as { name: string; namedCurve?: string };
  const hash = alg.name === "ECDSA" ? Object.values(CURVES).find((c) => c.namedCurve === alg.namedCurve)?.hash : undefined;
  if (!hash) throw new Error(`${what}: unsupported CA key (need an ECDSA P-256/P-384/P-521 key)`);
  const caCert = new x509.X509Certificate(ca.certPem);
  const now = Date.now();
  if (caCert.notAfter.getTime() <= now) throw new Error(`${what}: the CA certificate expired on ${caCert.notAfter.toISOString()}`);
  const notAfter = new Date(Math.min(now + days * DAY_MS, caCert.notAfter.getTime()));

  const caSki = caCert.getExtension(x509.SubjectKeyIdentifierExtension);
  const ekus = { server: [x509.ExtendedKeyUsage.serverAuth], client: [x509.ExtendedKeyUsage.clientAuth], both: [x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth] }[o.usage];
  const extensions: X509.Extension[] = [
    new x509.BasicConstraintsExtension(false, undefined, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
    new x509.ExtendedKeyUsageExtension(ekus),
    await x509.SubjectKeyIdentifierExtension.create(publicKey, false, webcrypto),
    caSki ? new x509.AuthorityKeyIdentifierExtension(caSki.keyId) : await x509.AuthorityKeyIdentifierExtension.create(caCert.publicKey, false, webcrypto),
  ];
  const sans = o.sans ?? [];
  if (sans.length > 0) extensions.push(new x509.SubjectAlternativeNameExtension(sans.map((s) => ({ type: s.type, value: s.value }))));
  const cert = await x509.X509CertificateGenerator.create(
    {
      serialNumber: serialNumber(),
      subject: [...(o.organizations ?? []).map((org) => ({ O: [org] })), { CN: [o.commonName] }],
      issuer: caCert.subjectName,
      notBefore: new Date(now - BACKDATE_MS),
      notAfter,
      signingAlgorithm: { name: "ECDSA", hash },
      publicKey,
      signingKey: ca.signingKey,
      extensions,
    },
    webcrypto,
  );
  return cert.toString("pem") + "\n";
}

/**
 * Sign a new leaf certificate (fresh ECDSA P-256 key) with `ca`: CA:false, digitalSignature,
 * the extended key usage(s) of `usage`, subject and authority key identifiers, the SANs given.
 * A certificate cannot outlive its CA: notAfter is at most the CA's.
 */
export async function signLeaf(ca: CaSigner, o: LeafOptions): Promise<IssuedPem> {
  validDays("signLeaf", o.days, CERT_DAYS);
  const keys = await webcrypto.subtle.generateKey(EC, true, ["sign", "verify"]);
  const certPem = await buildLeaf("signLeaf", ca, keys.publicKey, o);
  return { certPem, keyPem: privateKeyPem(keys.privateKey) };
}

/** A CSR, or what signCsr/inspectCsr were given instead, was refused: not PEM, bad self-signature, unsupported key. */
export class CsrError extends Error {
  override name = "CsrError";
}

/** What a verified CSR tells: its subject (informational only: signCsr ignores it) and its key. */
export interface CsrInfo {
  /** the subject the requester asked for, e.g. "CN=web1" */
  subject: string;
  /** SHA-256 of the public key's SubjectPublicKeyInfo (DER), hex */
  publicKeySha256: string;
}

/** Parse a PEM CSR, check its self-signature (proof the requester holds the private key) and its key type. */
async function readCsr(csrPem: string): Promise<X509.Pkcs10CertificateRequest> {
  const x509 = await loadX509();
  if (typeof csrPem !== "string" || !/-----BEGIN CERTIFICATE REQUEST-----[\s\S]+-----END CERTIFICATE REQUEST-----/.test(csrPem)) {
    throw new CsrError("not a PEM certificate request (expected -----BEGIN CERTIFICATE REQUEST-----)");
  }
  let csr: X509.Pkcs10CertificateRequest;
  try {
    csr = new x509.Pkcs10CertificateRequest(csrPem);
  } catch (e) {
    throw new CsrError(`the certificate request cannot be parsed: ${(e as Error).message}`);
  }
  let key: KeyObject;
  try {
    key = createPublicKey({ key: Buffer.from(csr.publicKey.rawData), format: "der", type: "spki" });
  } catch (e) {
    throw new CsrError(`the certificate request's public key cannot be read: ${(e as Error).message}`);
  }
  if (key.asymmetricKeyType !== "ec" || !CURVES[key.asymmetricKeyDetails?.namedCurve ?? ""]) {
    throw new CsrError(`the certificate request's key is ${key.asymmetricKeyType ?? "unknown"}${key.asymmetricKeyDetails?.namedCurve ? ` ${key.asymmetricKeyDetails.namedCurve}` : ""}; only ECDSA P-256/P-384/P-521 keys are accepted`);
  }
  let ok = false;
  try {
    ok = await csr.verify(webcrypto);
  } catch {
    ok = false;
  }
  if (!ok) throw new CsrError("the certificate request's signature does not verify with its own public key (corrupted, or not made with the matching private key)");
  return csr;
}

/** Verify a CSR (see signCsr) and say what it asks for; throws CsrError. */
export async function inspectCsr(csrPem: string): Promise<CsrInfo> {
  const csr = await readCsr(csrPem);
  return { subject: csr.subject, publicKeySha256: createHash("sha256").update(Buffer.from(csr.publicKey.rawData)).digest("hex") };
}

/**
 * Make a private key (ECDSA P-256, or the given PKCS#8/SEC1 PEM EC key) and a CSR for it,
 * self-signed with it. The CSR's subject (CN=`commonName`) is a hint only: whoever signs
 * it (signCsr) chooses the certificate's subject and SANs. The key is returned as PKCS#8 PEM.
 */
export async function createCsr(keyPem?: string, o: { commonName?: string } = {}): Promise<{ csrPem: string; keyPem: string }> {
  const x509 = await loadX509();
  let keys: wc.CryptoKeyPair;
  let hash = "SHA-256";
  if (keyPem === undefined) {
    keys = await webcrypto.subtle.generateKey(EC, true, ["sign", "verify"]);
  } else {
    let priv: KeyObject;
    try {
      priv = createPrivateKey(keyPem);
    } catch {
      throw new Error("createCsr: the key is not a usable PEM private key (unencrypted PKCS#8 or SEC1 expected)");
    }
    const curve = priv.asymmetricKeyType === "ec" ? CURVES[priv.asymmetricKeyDetails?.namedCurve ?? ""] : undefined;
    if (!curve) throw new Error("createCsr: unsupported key type (need an ECDSA P-256/P-384/P-521 key)");
    hash = curve.hash;
    const alg = { name: "ECDSA", namedCurve: curve.namedCurve };
    keys = {
      privateKey: await webcrypto.subtle.importKey("pkcs8", priv.export({ type: "pkcs8", format: "der" }), alg, true, ["sign"]),
      publicKey: await webcrypto.subtle.importKey("spki", createPublicKey(priv).export({ type: "spki", format: "der" }), alg, true, ["verify"]),
    };
  }
  const csr = await x509.Pkcs10CertificateRequestGenerator.create({ name: [{ CN: [o.commonName ?? "understudy-agent"] }], keys, signingAlgorithm: { name: "ECDSA", hash } }, webcrypto);
  return { csrPem: csr.toString("pem") + "\n", keyPem: privateKeyPem(keys.privateKey) };
}

/**
 * Sign a certificate for the key in a CSR. Only the CSR's public key is used, after its
 * self-signature is verified (CsrError otherwise): the subject, SANs and usage are the
 * signer's choice, from `o`, whatever the CSR asks for.
 */
export async function signCsr(ca: CaSigner, csrPem: string, o: Omit<LeafOptions, "days"> & { days?: number }): Promise<string> {
  if (!o.commonName) throw new Error("signCsr: a commonName is required");
  for (const s of o.sans ?? []) {
    if (s.type === "ip" ? !isIP(s.value) : s.type !== "dns" || s.value.length > 253 || !DNS_NAME.test(s.value)) throw new Error(`signCsr: invalid SAN ${s.type}:${JSON.stringify(s.value)}`);
  }
  const csr = await readCsr(csrPem);
  return buildLeaf("signCsr", ca, csr.publicKey, { ...o, days: o.days ?? CERT_DAYS });
}

/**
 * Create a CA in `dir` (mkdir -p, mode 0700): `ca.crt` and `ca.key` (mode 0600).
 * Refuses to overwrite an existing ca.key: every certificate issued by it would become useless.
 */
export async function createCA(dir: string, opts: { commonName?: string; days?: number } = {}): Promise<{ certPath: string; keyPath: string }> {
  const days = validDays("createCA", opts.days, CA_DAYS);
  const certPath = path.join(dir, "ca.crt");
  const keyPath = path.join(dir, "ca.key");
  const refuse = () => new Error(`createCA: ${keyPath} already exists; refusing to overwrite a CA key (certificates issued by it would stop working). Remove it first if you really mean to start a new CA.`);
  await mkdir(dir, { recursive: true, mode: 0o700 }).catch((e: unknown) => {
    throw new Error(`createCA: cannot create directory ${dir}: ${errCode(e)}`);
  });
  if (await exists(keyPath)) throw refuse();

  const ca = await newCA(opts.commonName ?? "understudy CA", days);
  // "wx": if another process created ca.key meanwhile, fail instead of replacing it
  try {
    await writeFile(keyPath, ca.keyPem, { mode: 0o600, flag: "wx" });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "EEXIST") throw refuse();
    throw new Error(`createCA: cannot write ${keyPath}: ${errCode(e)}`);
  }
  await writeAtomic(certPath, ca.certPem, 0o644);
  return { certPath, keyPath };
}

/** "[::1]" → "::1", "Host.Example." → "host.example"; throws on anything that is neither an IP nor a DNS name. */
function normalizeHost(h: string): San {
  let v = h.trim();
  if (v.startsWith("[") && v.endsWith("]")) v = v.slice(1, -1);
  if (isIP(v)) return { type: "ip", value: v };
  v = v.toLowerCase().replace(/\.$/, "");
  if (v.length > 253 || !DNS_NAME.test(v)) throw new Error(`issueCert: invalid host ${JSON.stringify(h)}: expected a DNS name or an IP address`);
  return { type: "dns", value: v };
}

async function readFileNamed(what: string, file: string): Promise<string> {
  try {
    return await readFile(file, "utf8");
  } catch (e) {
    throw new Error(`${what}: cannot read ${file}: ${errCode(e)}`);
  }
}

/**
 * A CA to sign with, from its certificate and private key (PEM): checks that the certificate
 * is a CA's, that the key belongs to it and is ECDSA P-256/P-384/P-521, and that the CA has
 * not expired. `names` words the errors (the files they came from, and who is asking).
 */
export async function loadCaSigner(caCertPem: string, caKeyPem: string, names: { what?: string; cert?: string; key?: string } = {}): Promise<CaSigner> {
  const what = names.what ?? "loadCaSigner";
  const certName = names.cert ?? "the CA certificate";
  const keyName = names.key ?? "the CA key";
  let caNode: NodeX509;
  let caKeyObj: KeyObject;
  try {
    caNode = new NodeX509(caCertPem);
  } catch {
    throw new Error(`${what}: ${certName} is not a PEM certificate`);
  }
  try {
    caKeyObj = createPrivateKey(caKeyPem);
  } catch {
    throw new Error(`${what}: ${keyName} is not a PEM private key`);
  }
  if (!caNode.ca) throw new Error(`${what}: ${certName} is not a CA certificate`);
  if (!caNode.checkPrivateKey(caKeyObj)) throw new Error(`${what}: ${keyName} does not belong to ${certName}`);
  const curve = caKeyObj.asymmetricKeyType === "ec" ? CURVES[caKeyObj.asymmetricKeyDetails?.namedCurve ?? ""] : undefined;
  if (!curve) throw new Error(`${what}: ${keyName}: unsupported CA key type (need an ECDSA P-256/P-384/P-521 key)`);
  const signingKey = await webcrypto.subtle.importKey("pkcs8", caKeyObj.export({ type: "pkcs8", format: "der" }), { name: "ECDSA", namedCurve: curve.namedCurve }, false, ["sign"]);
  if (caNode.validToDate.getTime() <= Date.now()) throw new Error(`${what}: the CA certificate${names.cert ? ` ${names.cert}` : ""} expired on ${caNode.validToDate.toISOString()}`);
  return { certPem: caCertPem, signingKey };
}

/**
 * Issue a certificate for agent `name` (CN = name), valid as both TLS server and client,
 * with a SAN per host (IPs as IP SANs, others as DNS SANs), signed by the CA in `caDir`.
 * Writes `<name>.crt`, `<name>.key` (0600) and a copy of `ca.crt` into `outDir`.
 */
export async function issueCert(opts: { caDir: string; name: string; hosts: string[]; outDir: string; days?: number }): Promise<{ certPath: string; keyPath: string; caPath: string }> {
  const { caDir, name, hosts, outDir } = opts;
  if (!AGENT_NAME.test(name)) throw new Error(`issueCert: invalid name ${JSON.stringify(name)}: expected an agent name (lowercase letters, digits, '.', '_' or '-', at most 63)`);
  if (name === "ca") throw new Error(`issueCert: the name "ca" is reserved (ca.crt/ca.key are the CA's files)`);
  const days = validDays("issueCert", opts.days, CERT_DAYS);
  const sans: San[] = [];
  for (const h of hosts) {
    const n = normalizeHost(h);
    if (!sans.some((s) => s.type === n.type && s.value === n.value)) sans.push(n);
  }

  const caCertFile = path.join(caDir, "ca.crt");
  const caKeyFile = path.join(caDir, "ca.key");
  const caPem = await readFileNamed("issueCert: CA certificate", caCertFile);
  const caKeyPem = await readFileNamed("issueCert: CA key", caKeyFile);
  const ca = await loadCaSigner(caPem, caKeyPem, { what: "issueCert", cert: caCertFile, key: caKeyFile });
  const leaf = await signLeaf(ca, { commonName: name, usage: "both", sans, days });

  await mkdir(outDir, { recursive: true, mode: 0o700 }).catch((e: unknown) => {
    throw new Error(`issueCert: cannot create directory ${outDir}: ${errCode(e)}`);
  });
  const certPath = path.join(outDir, `${name}.crt`);
  const keyPath = path.join(outDir, `${name}.key`);
  const caPath = path.join(outDir, "ca.crt");
  await writeAtomic(keyPath, leaf.keyPem, 0o600);
  await writeAtomic(certPath, leaf.certPem, 0o644);
  await writeAtomic(caPath, caPem, 0o644);
  return { certPath, keyPath, caPath };
}

// ---------------------------------------------------------------------------
// grpc credentials

type Material = { ca: Buffer; cert: Buffer; key: Buffer };

function readNamed(field: string, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw new Error(`${field}: cannot read ${file}: ${errCode(e)}`);
  }
}

function parseCerts(field: string, file: string, pem: Buffer): NodeX509[] {
  const blocks = pem.toString("utf8").match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (blocks.length === 0) throw new Error(`${field}: ${file} contains no PEM certificate`);
  return blocks.map((b, i) => {
    try {
      return new NodeX509(b);
    } catch {
      throw new Error(`${field}: ${file}: certificate #${i + 1} is not valid`);
    }
  });
}

/**
 * Read and cross-check ca/cert/key up front, so a misconfiguration fails at startup with a
 * message naming the field, instead of as an opaque handshake error on the *peer*.
 */
function loadMaterial(tls: Exclude<TlsConfig, { insecure: true }>): Material {
  const ca = readNamed("tls.ca", tls.ca);
  const cert = readNamed("tls.cert", tls.cert);
  const key = readNamed("tls.key", tls.key);
  const cas = parseCerts("tls.ca", tls.ca, ca);
  const [leaf, ...chain] = parseCerts("tls.cert", tls.cert, cert);
  let keyObj: KeyObject;
  try {
    keyObj = createPrivateKey(key);
  } catch {
    throw new Error(`tls.key: ${tls.key} is not a usable PEM private key (unencrypted PKCS#8 or SEC1 expected)`);
  }
  if (!leaf!.checkPrivateKey(keyObj)) throw new Error(`tls.key: ${tls.key} does not belong to the certificate in tls.cert (${tls.cert})`);
  const now = Date.now();
  if (leaf!.validToDate.getTime() < now) throw new Error(`tls.cert: ${tls.cert} expired on ${leaf!.validToDate.toISOString()}`);
  if (leaf!.validFromDate.getTime() > now) throw new Error(`tls.cert: ${tls.cert} is not valid before ${leaf!.validFromDate.toISOString()} (check the clock)`);
  // peers verify us against the same CA we verify them with: a cert from another CA can never work
  if (![...cas, ...chain].some((issuer) => leaf!.checkIssued(issuer) && leaf!.verify(issuer.publicKey))) {
    throw new Error(`tls.cert: ${tls.cert} was not issued by the CA in tls.ca (${tls.ca})`);
  }
  return { ca, cert, key };
}

/** insecure → plaintext; else TLS with client certificates required and verified against tls.ca. */
export function serverCredentials(tls: TlsConfig): grpc.ServerCredentials {
  if (tls.insecure === true) return grpc.ServerCredentials.createInsecure();
  const m = loadMaterial(tls);
  return grpc.ServerCredentials.createSsl(m.ca, [{ cert_chain: m.cert, private_key: m.key }], true);
}

/**
 * insecure → plaintext; else TLS presenting our certificate, verifying the server against
 * tls.ca, and checking the dialled host name or IP against the server certificate's SANs.
 */
export function clientCredentials(tls: TlsConfig): grpc.ChannelCredentials {
  if (tls.insecure === true) return grpc.credentials.createInsecure();
  const m = loadMaterial(tls);
  return grpc.credentials.createSsl(m.ca, m.key, m.cert, { checkServerIdentity: (host, cert) => checkServerIdentity(ipOfServerName(host) ?? host, cert) });
}

// gRPC sends the dialled host as the TLS server name (SNI), and Node warns when
// that is an IP address (DEP0123: RFC 6066 allows only DNS names there). Agents
// are mostly dialled by IP, so an IP goes as a name under .invalid (RFC 6761:
// never resolves, never a real name) that stands for it, and the identity
// check above turns it back into the IP and checks the certificate's IP SANs
// with it: the same check as before, without the warning.
const IP_NAME = /^(ip4|ip6)-([0-9a-f-]+)\.understudy\.invalid$/;

/** The server name to send for an IP host, or undefined for a DNS name. */
export function serverNameForIp(host: string): string | undefined {
  const v = isIP(host);
  if (v === 4) return `ip4-${host.replace(/\./g, "-")}.understudy.invalid`;
  if (v === 6 && !host.includes("%") && !host.includes(".")) return `ip6-${host.toLowerCase().replace(/:/g, "-")}.understudy.invalid`;
  return undefined;
}

function ipOfServerName(name: string): string | undefined {
  const m = IP_NAME.exec(name);
  if (!m) return undefined;
  const ip = m[1] === "ip4" ? m[2]!.replace(/-/g, ".") : m[2]!.replace(/-/g, ":");
  return isIP(ip) ? ip : undefined;
}

/** Channel options for dialling address with clientCredentials (see serverNameForIp). */
export function dialOptions(address: string): grpc.ChannelOptions {
  const host = splitHostPort(address)?.host;
  const name = host === undefined ? undefined : serverNameForIp(host);
  return name ? { "grpc.ssl_target_name_override": name } : {};
}

/**
 * CN of the verified client certificate of a server-side call, or undefined (insecure
 * server, no/unverified certificate, or a certificate with several CNs).
 */
export function peerCommonName(call: { getPeer(): string } & object): string | undefined {
  const getAuthContext = (call as { getAuthContext?: () => { sslPeerCertificate?: PeerCertificate } | null | undefined }).getAuthContext;
  if (typeof getAuthContext !== "function") return undefined;
  const cn: unknown = getAuthContext.call(call)?.sslPeerCertificate?.subject?.CN;
  return typeof cn === "string" && cn !== "" ? cn : undefined;
}

/** SHA-256 fingerprint of the (first) certificate in a PEM file, as `openssl x509 -fingerprint -sha256` prints it. */
export function certFingerprint(pemPath: string, field = "certificate"): string {
  const [cert] = parseCerts(field, pemPath, readNamed(field, pemPath));
  return cert!.fingerprint256;
}
