// One-time enrollment tokens. A token is self-describing and HMAC'd:
//
//   ust1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, "ust1.<claims part>"))>
//
// so the operator can check one after a restart without having stored it. The
// HMAC key is derived from the CA key (enrollmentKey), so there is no extra
// secret to manage; rotating the CA invalidates every outstanding token. A
// token alone is not single-use: the EnrollmentStore's consume() makes it so
// (see server.ts). Tokens are secrets: log tokenId(token), never the token.
import { createHash, createHmac, createPrivateKey, hkdfSync, timingSafeEqual } from "node:crypto";
import { z } from "zod";

const PREFIX = "ust1";
const HKDF_INFO = "understudy enrollment v1";
/** longer than any token we issue, short enough that parsing garbage costs nothing */
const MAX_TOKEN_LENGTH = 4096;

/** What a token says: who may enroll with it (sub), which issue of it (nonce), until when (exp). */
export interface EnrollmentClaims {
  /** the enrollment subject: what the store knows the pending agent by (e.g. "<namespace>/<pair>/<target>") */
  sub: string;
  /** distinguishes reissues for the same subject: only the newest token of a subject is valid */
  nonce: string;
  /** expiry, unix milliseconds */
  exp: number;
}

export type RefusalReason =
  /** not a token at all (wrong shape, prefix, encoding or claims) */
  | "malformed"
  /** the HMAC does not match: tampered with, or made with another CA's key */
  | "bad-signature"
  | "expired"
  /** consumed already */
  | "used"
  /** the store knows no pending enrollment for this subject */
  | "unknown"
  /** a newer token was issued for this subject */
  | "superseded"
  /** the CSR in the request was refused */
  | "bad-csr"
  /** the store refused for a reason of its own (its message says which) */
  | "denied";

/** An enrollment was refused; `reason` for programs, `message` for people (safe to show to the requester). */
export class EnrollmentRefused extends Error {
  override name = "EnrollmentRefused";
  readonly reason: RefusalReason;
  constructor(reason: RefusalReason, message: string) {
    super(message);
    this.reason = reason;
  }
}

const ClaimsSchema = z
  .object({
    sub: z.string().min(1).max(512),
    nonce: z.string().min(1).max(256),
    exp: z.number().int().positive(),
  })
  .strict();

/**
 * The HMAC key for tokens, derived from the CA's private key (PEM, any encoding Node reads)
 * with HKDF-SHA256, info "understudy enrollment v1". The key is normalised to PKCS#8 DER
 * first, so the same CA key in another PEM encoding derives the same HMAC key.
 */
export function enrollmentKey(caKeyPem: string): Buffer {
  let der: Buffer;
  try {
    der = createPrivateKey(caKeyPem).export({ type: "pkcs8", format: "der" });
  } catch {
    throw new Error("enrollmentKey: the CA key is not a usable PEM private key");
  }
  return Buffer.from(hkdfSync("sha256", der, Buffer.alloc(0), HKDF_INFO, 32));
}

function mac(key: Buffer, signingInput: string): Buffer {
  return createHmac("sha256", key).update(signingInput).digest();
}

/** A token for `claims`, signed with `key` (from enrollmentKey). */
export function issueToken(key: Buffer, claims: EnrollmentClaims): string {
  const c = ClaimsSchema.safeParse(claims);
  if (!c.success) throw new Error(`issueToken: invalid claims: ${c.error.issues.map((i) => `${i.path.join(".") || "claims"}: ${i.message}`).join("; ")}`);
  if (key.length < 16) throw new Error("issueToken: the key is too short (use enrollmentKey)");
  // fixed field order, so a token is a function of its claims
  const body = Buffer.from(JSON.stringify({ sub: c.data.sub, nonce: c.data.nonce, exp: c.data.exp })).toString("base64url");
  const input = `${PREFIX}.${body}`;
  return `${input}.${mac(key, input).toString("base64url")}`;
}

const B64URL = /^[A-Za-z0-9_-]+$/;

/**
 * Check a token's signature and expiry (`now`, unix ms) and return its claims; throws
 * EnrollmentRefused ("malformed", "bad-signature" or "expired"). The signature is checked
 * (in constant time) before the claims are even parsed.
 */
export function verifyToken(key: Buffer, token: string, now: number): EnrollmentClaims {
  const malformed = (why: string) => new EnrollmentRefused("malformed", `not an enrollment token (${why}); pass the token exactly as the operator printed it`);
  if (typeof token !== "string" || token.length === 0) throw malformed("empty");
  if (token.length > MAX_TOKEN_LENGTH) throw malformed("too long");
  const parts = token.trim().split(".");
  if (parts.length !== 3 || parts[0] !== PREFIX) throw malformed(`expected ${PREFIX}.<claims>.<signature>`);
  const [, body, sig] = parts as [string, string, string];
  if (!B64URL.test(body) || !B64URL.test(sig)) throw malformed("not base64url");
  const given = Buffer.from(sig, "base64url");
  const want = mac(key, `${PREFIX}.${body}`);
  if (given.length !== want.length || !timingSafeEqual(given, want)) {
    throw new EnrollmentRefused("bad-signature", "the enrollment token's signature does not verify: it was altered, or issued by an operator with another CA; ask the operator for a new one");
  }
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(body, "base64url").toString("utf8"));
  } catch {
    throw malformed("claims are not JSON");
  }
  const c = ClaimsSchema.safeParse(raw);
  if (!c.success) throw malformed("claims are incomplete");
  if (now >= c.data.exp) throw new EnrollmentRefused("expired", `the enrollment token expired at ${new Date(c.data.exp).toISOString()}; ask the operator for a new one`);
  return c.data;
}

/** A short, non-secret id of a token for logs and messages: the first 12 hex digits of its SHA-256. */
export function tokenId(token: string): string {
  return createHash("sha256").update(token.trim()).digest("hex").slice(0, 12);
}
