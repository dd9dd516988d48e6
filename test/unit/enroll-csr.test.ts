// CSR signing (common/tls.ts createCsr/inspectCsr/signCsr/loadCaSigner) and the
// reference enrollment store's single-use rules (operator/enroll/server.ts).
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { X509Certificate, createPrivateKey, createPublicKey, generateKeyPairSync } from "node:crypto";
import { CsrError, createCsr, inspectCsr, loadCaSigner, newCA, signCsr } from "../../common/tls.ts";
import { EnrollmentRefused, InMemoryEnrollmentStore } from "../../operator/enroll/server.ts";

const ca = await newCA("csr test CA", 100);
const other = await newCA("another CA", 10);

function sansOf(pem: string): string {
  return new X509Certificate(pem).subjectAltName ?? "";
}

describe("CSRs", () => {
  test("createCsr makes a P-256 key and a CSR for it; signCsr uses only the key", async () => {
    const { csrPem, keyPem } = await createCsr(undefined, { commonName: "i-want-to-be-admin" });
    assert.match(csrPem, /^-----BEGIN CERTIFICATE REQUEST-----/);
    const key = createPrivateKey(keyPem);
    assert.equal(key.asymmetricKeyDetails?.namedCurve, "prime256v1");
    const info = await inspectCsr(csrPem);
    assert.equal(info.subject, "CN=i-want-to-be-admin");
    assert.match(info.publicKeySha256, /^[0-9a-f]{64}$/);

    const certPem = await signCsr(ca, csrPem, { commonName: "dr-web1", usage: "both", sans: [{ type: "dns", value: "dr-web1.example.internal" }, { type: "ip", value: "10.0.0.9" }], days: 30 });
    const cert = new X509Certificate(certPem);
    assert.equal(cert.subject, "CN=dr-web1");
    assert.equal(sansOf(certPem), "DNS:dr-web1.example.internal, IP Address:10.0.0.9");
    assert.ok(cert.checkPrivateKey(key), "the certificate is for the CSR's key");
    assert.ok(cert.checkIssued(new X509Certificate(ca.certPem)) && cert.verify(new X509Certificate(ca.certPem).publicKey));
    assert.equal(cert.ca, false);
    assert.ok(cert.keyUsage?.includes("1.3.6.1.5.5.7.3.1") && cert.keyUsage?.includes("1.3.6.1.5.5.7.3.2"), String(cert.keyUsage));
    const days = (Date.parse(cert.validTo) - Date.now()) / 86_400_000;
    assert.ok(days > 29 && days <= 30.1, String(days));
  });

  test("createCsr with a given key keeps it", async () => {
    const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-384" });
    const pem = privateKey.export({ type: "sec1", format: "pem" }) as string;
    const r = await createCsr(pem);
    assert.equal(createPublicKey(r.keyPem).export({ type: "spki", format: "pem" }), createPublicKey(privateKey).export({ type: "spki", format: "pem" }));
    const cert = new X509Certificate(await signCsr(ca, r.csrPem, { commonName: "x", usage: "client" }));
    assert.ok(cert.checkPrivateKey(privateKey));
    await assert.rejects(createCsr("nope"), /not a usable PEM private key/);
    const { privateKey: rsa } = generateKeyPairSync("rsa", { modulusLength: 2048 });
    await assert.rejects(createCsr(rsa.export({ type: "pkcs8", format: "pem" }) as string), /unsupported key type/);
  });

  test("a CSR whose self-signature does not verify is refused", async () => {
    const { csrPem } = await createCsr(undefined, { commonName: "understudy-agent" });
    const der = Buffer.from(csrPem.replace(/-----[^-]+-----|\s/g, ""), "base64");
    const at = der.indexOf(Buffer.from("understudy-agent"));
    assert.ok(at > 0);
    der[at] = "U".charCodeAt(0); // the subject changes after signing
    const tampered = `-----BEGIN CERTIFICATE REQUEST-----\n${der.toString("base64").replace(/(.{64})/g, "$1\n")}\n-----END CERTIFICATE REQUEST-----\n`;
    await assert.rejects(inspectCsr(tampered), (e: unknown) => e instanceof CsrError && /signature does not verify/.test(e.message));
    await assert.rejects(signCsr(ca, tampered, { commonName: "x", usage: "both" }), CsrError);
  });

  test("not a CSR / bad options", async () => {
    await assert.rejects(inspectCsr("hello"), /not a PEM certificate request/);
    await assert.rejects(inspectCsr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"), CsrError);
    const { csrPem } = await createCsr();
    await assert.rejects(signCsr(ca, csrPem, { commonName: "", usage: "both" }), /commonName is required/);
    await assert.rejects(signCsr(ca, csrPem, { commonName: "x", usage: "both", sans: [{ type: "ip", value: "10.0.0" }] }), /invalid SAN ip/);
    await assert.rejects(signCsr(ca, csrPem, { commonName: "x", usage: "both", sans: [{ type: "dns", value: "a b" }] }), /invalid SAN dns/);
  });

  test("loadCaSigner checks the pair", async () => {
    const s = await loadCaSigner(ca.certPem, ca.keyPem);
    const { csrPem } = await createCsr();
    assert.match(await signCsr(s, csrPem, { commonName: "x", usage: "both" }), /BEGIN CERTIFICATE/);
    await assert.rejects(loadCaSigner(ca.certPem, other.keyPem), /the CA key does not belong to the CA certificate/);
    await assert.rejects(loadCaSigner("x", ca.keyPem), /not a PEM certificate/);
    await assert.rejects(loadCaSigner(ca.certPem, "x", { what: "op", key: "/k" }), /^Error: op: \/k is not a PEM private key/);
  });
});

describe("InMemoryEnrollmentStore", () => {
  const info = (k: string) => ({ peerAddress: "10.0.0.9", agentVersion: "0.1.0", hostname: "ip-10-0-0-9", publicKeySha256: k });
  const grant = { agentName: "dr1", sans: [{ type: "dns" as const, value: "dr1.internal" }], admins: ["understudy-operator"] };

  test("single use; the same key may ask again; unknown and superseded are refused", async () => {
    let now = 1_000_000;
    const store = new InMemoryEnrollmentStore({ now: () => now });
    store.add("ns/pair/t", { nonce: "a", ...grant });
    const claims = { sub: "ns/pair/t", nonce: "a", exp: 2e12 };
    assert.deepEqual(await store.consume(claims, info("k1")), grant);
    assert.equal(store.get("ns/pair/t")?.usedAt, 1_000_000);
    now += 5000;
    // a retry after a lost answer: same key, same grant
    assert.deepEqual(await store.consume(claims, info("k1")), grant);
    await assert.rejects(store.consume(claims, info("k2")), (e: unknown) => e instanceof EnrollmentRefused && e.reason === "used" && /already used at 1970-01-01T00:16:40\.000Z by 10\.0\.0\.9/.test(e.message));
    await assert.rejects(store.consume({ ...claims, sub: "ns/pair/other" }, info("k1")), (e: unknown) => e instanceof EnrollmentRefused && e.reason === "unknown");
    store.add("ns/pair/t", { nonce: "b", ...grant }); // reissued
    await assert.rejects(store.consume(claims, info("k3")), (e: unknown) => e instanceof EnrollmentRefused && e.reason === "superseded");
    assert.deepEqual(await store.consume({ ...claims, nonce: "b" }, info("k3")), grant);
    assert.ok(store.remove("ns/pair/t"));
    await assert.rejects(store.consume({ ...claims, nonce: "b" }, info("k3")), (e: unknown) => e instanceof EnrollmentRefused && e.reason === "unknown");
  });
});
