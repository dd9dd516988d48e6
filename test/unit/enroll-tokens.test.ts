// Enrollment tokens (operator/enroll/tokens.ts): what verifies, and every way
// a token is refused, with the reason a client can act on.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac, createPrivateKey } from "node:crypto";
import { newCA } from "../../common/tls.ts";
import { EnrollmentRefused, enrollmentKey, issueToken, tokenId, verifyToken, type EnrollmentClaims } from "../../operator/enroll/tokens.ts";

const NOW = Date.UTC(2026, 10, 27, 9, 0, 0);
const claims: EnrollmentClaims = { sub: "prod/web-data/standby", nonce: "n-1", exp: NOW + 3_600_000 };

const ca = await newCA("tokens test CA", 10);
const other = await newCA("another CA", 10);
const key = enrollmentKey(ca.keyPem);

function refused(fn: () => unknown, reason: string, message?: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof EnrollmentRefused, `expected EnrollmentRefused, got ${String(e)}`);
    assert.equal(e.reason, reason, e.message);
    if (message) assert.match(e.message, message);
    return true;
  });
}

/** base64url segments of a token */
function parts(t: string): [string, string, string] {
  const p = t.split(".");
  assert.equal(p.length, 3);
  return p as [string, string, string];
}

describe("enrollment tokens", () => {
  test("issue and verify: the claims come back, the token has the documented shape", () => {
    const t = issueToken(key, claims);
    assert.match(t, /^ust1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{43}$/);
    assert.deepEqual(JSON.parse(Buffer.from(parts(t)[1], "base64url").toString()), claims);
    assert.deepEqual(verifyToken(key, t, NOW), claims);
    // HMAC-SHA256 over "ust1.<claims>" with the derived key
    const [p, b, s] = parts(t);
    assert.equal(s, createHmac("sha256", key).update(`${p}.${b}`).digest("base64url"));
    // deterministic: the operator can re-derive a token from its claims
    assert.equal(issueToken(key, { ...claims }), t);
    // surrounding whitespace (a pasted token) does not matter
    assert.deepEqual(verifyToken(key, ` ${t}\n`, NOW), claims);
  });

  test("the key is derived from the CA key: same CA key (any PEM encoding) → same key; another CA → another", () => {
    assert.equal(key.length, 32);
    assert.deepEqual(enrollmentKey(ca.keyPem), key);
    const sec1 = createPrivateKey(ca.keyPem).export({ type: "sec1", format: "pem" }) as string;
    assert.notEqual(sec1, ca.keyPem);
    assert.deepEqual(enrollmentKey(sec1), key);
    assert.notDeepEqual(enrollmentKey(other.keyPem), key);
    assert.throws(() => enrollmentKey("not a key"), /not a usable PEM private key/);
  });

  test("tampered claims, signature or prefix: bad-signature", () => {
    const t = issueToken(key, claims);
    const [p, b, s] = parts(t);
    const forged = Buffer.from(JSON.stringify({ ...claims, sub: "prod/db/standby" })).toString("base64url");
    refused(() => verifyToken(key, `${p}.${forged}.${s}`, NOW), "bad-signature", /altered|another CA/);
    const longer = Buffer.from(JSON.stringify({ ...claims, exp: claims.exp + 86_400_000 })).toString("base64url");
    refused(() => verifyToken(key, `${p}.${longer}.${s}`, NOW), "bad-signature");
    const flipped = (s[0] === "A" ? "B" : "A") + s.slice(1);
    refused(() => verifyToken(key, `${p}.${b}.${flipped}`, NOW), "bad-signature");
    refused(() => verifyToken(key, `${p}.${b}.${s.slice(0, -2)}`, NOW), "bad-signature");
  });

  test("a token made with another CA's key: bad-signature", () => {
    const t = issueToken(enrollmentKey(other.keyPem), claims);
    refused(() => verifyToken(key, t, NOW), "bad-signature", /ask the operator for a new one/);
  });

  test("expired: refused at and after exp, with the time in the message", () => {
    const t = issueToken(key, claims);
    assert.deepEqual(verifyToken(key, t, claims.exp - 1), claims);
    refused(() => verifyToken(key, t, claims.exp), "expired", new RegExp(new Date(claims.exp).toISOString().replace(/[.]/g, "\\.")));
    refused(() => verifyToken(key, t, claims.exp + 86_400_000), "expired");
  });

  test("malformed tokens", () => {
    const t = issueToken(key, claims);
    const [, b, s] = parts(t);
    for (const bad of ["", "ust1", "ust1..", `ust2.${b}.${s}`, `${t}.extra`, `ust1.${b}`, `ust1.${b}!.${s}`, "x".repeat(5000), `ust1.${b}.${s}=`]) {
      refused(() => verifyToken(key, bad, NOW), "malformed", /not an enrollment token/);
    }
    refused(() => verifyToken(key, undefined as unknown as string, NOW), "malformed");
    // correctly signed, but the claims are not JSON / incomplete: still malformed (signature first, then shape)
    const sign = (body: string) => `ust1.${body}.${createHmac("sha256", key).update(`ust1.${body}`).digest("base64url")}`;
    refused(() => verifyToken(key, sign(Buffer.from("{nope").toString("base64url")), NOW), "malformed", /not JSON/);
    refused(() => verifyToken(key, sign(Buffer.from(JSON.stringify({ sub: "a", exp: NOW + 1000 })).toString("base64url")), NOW), "malformed", /incomplete/);
    refused(() => verifyToken(key, sign(Buffer.from(JSON.stringify({ ...claims, exp: "tomorrow" })).toString("base64url")), NOW), "malformed");
  });

  test("issueToken refuses bad claims and short keys", () => {
    assert.throws(() => issueToken(key, { ...claims, sub: "" }), /invalid claims: sub/);
    assert.throws(() => issueToken(key, { ...claims, exp: 1.5 }), /invalid claims: exp/);
    assert.throws(() => issueToken(Buffer.alloc(4), claims), /too short/);
  });

  test("tokenId: short, stable, not the token", () => {
    const t = issueToken(key, claims);
    const id = tokenId(t);
    assert.match(id, /^[0-9a-f]{12}$/);
    assert.equal(tokenId(t), id);
    assert.notEqual(tokenId(issueToken(key, { ...claims, nonce: "n-2" })), id);
    assert.ok(!t.includes(id));
  });

  test("EnrollmentRefused is an Error with a reason", () => {
    const e = new EnrollmentRefused("used", "already used");
    assert.ok(e instanceof Error);
    assert.equal(e.reason, "used");
    assert.equal(e.message, "already used");
  });
});
