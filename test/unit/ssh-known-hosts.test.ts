// known_hosts parsing and host key checks (operator/ssh/known-hosts.ts),
// against what OpenSSH's own tools make of the same keys: ssh-keygen's
// fingerprints and hashed (-H) lines, when ssh-keygen is installed.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHmac, generateKeyPairSync, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { checkHostKey, formatKnownHostsLine, hostKeyAlgorithms, hostKeyFingerprint, hostsMatch, keyBlobType, knownHostsName, parseKnownHosts } from "../../operator/ssh/known-hosts.ts";

/** An ssh-ed25519 public key blob: string "ssh-ed25519", string <32-byte key>. */
function ed25519Blob(): Buffer {
  const raw = generateKeyPairSync("ed25519").publicKey.export({ format: "der", type: "spki" }).subarray(-32);
  const t = Buffer.from("ssh-ed25519");
  const b = Buffer.alloc(4 + t.length + 4 + raw.length);
  b.writeUInt32BE(t.length, 0);
  t.copy(b, 4);
  b.writeUInt32BE(raw.length, 4 + t.length);
  raw.copy(b, 8 + t.length);
  return b;
}

function hashed(name: string): string {
  const salt = randomBytes(20);
  return `|1|${salt.toString("base64")}|${createHmac("sha1", salt).update(name).digest("base64")}`;
}

const haveKeygen = (() => {
  try {
    execFileSync("ssh-keygen", ["-?"], { stdio: "ignore" });
    return true;
  } catch (e) {
    return (e as { status?: number }).status !== undefined; // it ran (and complained about -?)
  }
})();

describe("known_hosts", () => {
  const k1 = ed25519Blob();
  const k2 = ed25519Blob();
  const b64 = (b: Buffer) => b.toString("base64");

  test("names: host on port 22, [host]:port otherwise", () => {
    assert.equal(knownHostsName("10.0.0.5", 22), "10.0.0.5");
    assert.equal(knownHostsName("10.0.0.5", 2222), "[10.0.0.5]:2222");
    assert.equal(formatKnownHostsLine("10.0.0.5", 2222, k1), `[10.0.0.5]:2222 ssh-ed25519 ${b64(k1)}`);
    assert.equal(formatKnownHostsLine("web1", 22, b64(k1)), `web1 ssh-ed25519 ${b64(k1)}`);
    assert.equal(keyBlobType(k1), "ssh-ed25519");
    assert.equal(keyBlobType(Buffer.from("nonsense")), undefined);
    assert.throws(() => formatKnownHostsLine("h", 22, Buffer.from("xx")), /not an SSH public key/);
  });

  test("fingerprint: SHA256, base64 without padding", () => {
    const fp = hostKeyFingerprint(k1);
    assert.match(fp, /^SHA256:[A-Za-z0-9+/]{43}$/);
  });

  test("patterns: lists, wildcards, negation, ports, case", () => {
    assert.ok(hostsMatch("web1,10.0.0.5", "10.0.0.5", 22));
    assert.ok(hostsMatch("WEB1.example.com", "web1.EXAMPLE.com", 22));
    assert.ok(!hostsMatch("10.0.0.5", "10.0.0.5", 2222), "a plain name is port 22 only");
    assert.ok(hostsMatch("[10.0.0.5]:2222", "10.0.0.5", 2222));
    assert.ok(!hostsMatch("[10.0.0.5]:2222", "10.0.0.5", 22));
    assert.ok(!hostsMatch("[10.0.0.5]:2222", "10.0.0.5", 2223));
    assert.ok(hostsMatch("*.example.com", "a.example.com", 22));
    assert.ok(hostsMatch("10.0.0.?", "10.0.0.7", 22));
    assert.ok(!hostsMatch("10.0.0.?", "10.0.0.17", 22));
    assert.ok(!hostsMatch("*.example.com,!bad.example.com", "bad.example.com", 22));
    assert.ok(hostsMatch("[10.0.0.*]:2222", "10.0.0.9", 2222));
    assert.ok(!hostsMatch("10.0.0.5", "10.0.0.50", 22), "no prefix matches");
    assert.ok(!hostsMatch("a+b", "aab", 22), "regex characters are literal");
  });

  test("hashed names (|1|salt|hmac)", () => {
    assert.ok(hostsMatch(hashed("10.0.0.5"), "10.0.0.5", 22));
    assert.ok(hostsMatch(hashed("[10.0.0.5]:2222"), "10.0.0.5", 2222));
    assert.ok(!hostsMatch(hashed("10.0.0.5"), "10.0.0.5", 2222));
    assert.ok(!hostsMatch(hashed("10.0.0.6"), "10.0.0.5", 22));
    assert.ok(!hostsMatch("|1|garbage", "10.0.0.5", 22));
  });

  test("check: the key on a line for the host, and nothing else", () => {
    const text = [
      "# comment",
      "",
      `[10.0.0.5]:2222 ssh-ed25519 ${b64(k1)} web1`,
      `other ssh-ed25519 ${b64(k2)}`,
      `${hashed("10.0.0.9")} ssh-ed25519 ${b64(k2)}`,
    ].join("\n");
    const kh = parseKnownHosts(text);
    assert.equal(kh.entries.length, 3);
    assert.deepEqual(kh.skipped, []);
    const ok = checkHostKey(kh, "10.0.0.5", 2222, k1);
    assert.ok(ok.ok && ok.entry.line === 3);
    assert.deepEqual(checkHostKey(kh, "10.0.0.5", 2222, k2), { ok: false, reason: "mismatch" }, "another host's key is no good here");
    assert.deepEqual(checkHostKey(kh, "10.0.0.5", 22, k1), { ok: false, reason: "unknown-host" });
    assert.ok(checkHostKey(kh, "10.0.0.9", 22, k2).ok, "hashed line");
    assert.deepEqual(checkHostKey(parseKnownHosts(""), "10.0.0.5", 22, k1), { ok: false, reason: "unknown-host" });
  });

  test("@revoked wins; @cert-authority and broken lines are skipped with a reason", () => {
    const text = [
      `10.0.0.5 ssh-ed25519 ${b64(k1)}`,
      `@revoked * ssh-ed25519 ${b64(k1)}`,
      `@cert-authority *.example.com ssh-ed25519 ${b64(k2)}`,
      "10.0.0.5 ssh-ed25519 !!!notbase64",
      `10.0.0.5 ssh-rsa ${b64(k2)}`,
      "10.0.0.5",
    ].join("\r\n");
    const kh = parseKnownHosts(text);
    assert.deepEqual(checkHostKey(kh, "10.0.0.5", 22, k1), { ok: false, reason: "revoked" });
    assert.deepEqual(
      kh.skipped.map((s) => s.line),
      [3, 4, 5, 6],
    );
    assert.match(kh.skipped[0]!.reason, /cert-authority/);
    assert.match(kh.skipped[2]!.reason, /is a ssh-ed25519 key, the line says ssh-rsa/);
  });

  test("host key algorithms follow the known key types", () => {
    assert.deepEqual(hostKeyAlgorithms(["ssh-rsa"]), ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]);
    assert.deepEqual(hostKeyAlgorithms(["ecdsa-sha2-nistp256", "ssh-ed25519"]), ["ssh-ed25519", "ecdsa-sha2-nistp256"]);
    assert.deepEqual(hostKeyAlgorithms(["sk-ssh-ed25519@openssh.com"]), []);
  });

  test("agrees with OpenSSH: ssh-keygen's fingerprint and hashed lines", { skip: !haveKeygen && "ssh-keygen is not installed" }, () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "understudy-kh-"));
    try {
      const key = path.join(dir, "k");
      execFileSync("ssh-keygen", ["-q", "-t", "ecdsa", "-N", "", "-f", key]);
      const pub = readFileSync(`${key}.pub`, "utf8").trim().split(" ");
      const blob = Buffer.from(pub[1]!, "base64");
      const fp = execFileSync("ssh-keygen", ["-lf", `${key}.pub`], { encoding: "utf8" }).split(" ")[1];
      assert.equal(hostKeyFingerprint(blob), fp);
      const kh = path.join(dir, "known_hosts");
      writeFileSync(kh, formatKnownHostsLine("10.1.2.3", 2222, blob) + "\n" + formatKnownHostsLine("10.1.2.4", 22, blob) + "\n");
      execFileSync("ssh-keygen", ["-H", "-f", kh], { stdio: "ignore" });
      const text = readFileSync(kh, "utf8");
      assert.ok(text.startsWith("|1|"), "ssh-keygen hashed the names");
      const parsed = parseKnownHosts(text);
      assert.ok(checkHostKey(parsed, "10.1.2.3", 2222, blob).ok);
      assert.ok(checkHostKey(parsed, "10.1.2.4", 22, blob).ok);
      assert.deepEqual(checkHostKey(parsed, "10.1.2.3", 22, blob), { ok: false, reason: "unknown-host" });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
