// Fuzzing the one config loader (common/config.ts): any YAML text, and any
// near-valid config object (fields of the wrong type, missing, extra, out of
// range), gives a config or a ConfigError whose message names the file and
// a field; never another exception. Accepted configs hold their promises:
// absolute paths, loopback-only plaintext, sizes and durations as numbers.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import fc from "fast-check";
import YAML from "yaml";
import { ConfigError, isLoopback, loadAgentConfig, parseAgentConfig, parseSetConfig, splitHostPort } from "../../common/config.ts";
import { params } from "./fuzz.ts";

const junk = fc.oneof(fc.string({ maxLength: 12 }), fc.integer(), fc.double(), fc.boolean(), fc.constant(null), fc.constant([]), fc.constant({}), fc.constantFrom("-1", "1e999", "NaN", "../../etc", "/abs", "0.0.0.0:1", "[::]:7702", "10.0.0.1:99999", "1KiB", "5m", "x:y"));
const maybe = <T>(a: fc.Arbitrary<T>) => fc.oneof({ weight: 3, arbitrary: a }, { weight: 1, arbitrary: junk });
const nameA = maybe(fc.constantFrom("web", "db-1", "a.b", "Bad", "", "-x", "x".repeat(70)));
const hostPort = maybe(fc.constantFrom("127.0.0.1:7702", "localhost:1", "[::1]:80", "10.1.2.3:7702", "example.com:443", ":80", "h:"));
const set = fc.record(
  {
    name: nameA,
    path: maybe(fc.constantFrom("data", "/srv/www", "../up", "", "a/../../b")),
    targets: maybe(fc.array(hostPort, { maxLength: 3 })),
    mode: maybe(fc.constantFrom("continuous", "scheduled", "other")),
    interval: maybe(fc.constantFrom("5m", "0", 3, "1x", -1)),
    compression: maybe(fc.constantFrom("none", "fast", "balanced", "max", "zip")),
    bandwidthLimit: maybe(fc.constantFrom("1MiB", 0, "10 GB", "-5", 1.5)),
    blockSize: maybe(fc.constantFrom("64KiB", 4096, 3000, "32MiB", 65536)),
    queueMemory: maybe(fc.constantFrom("32MiB", 0)),
    rescanInterval: maybe(fc.constantFrom("5m", 0, "1h", "soon")),
    verifyInterval: maybe(fc.constantFrom("1h", 0)),
    verifyRepair: maybe(fc.boolean()),
    epoch: maybe(fc.constantFrom(0, 7, -1, 2 ** 60, 1.5)),
    wholeServer: maybe(fc.boolean()),
    include: maybe(fc.array(fc.constantFrom("**", "*.txt", ""), { maxLength: 2 })),
    exclude: maybe(fc.array(fc.constantFrom("tmp/**", ""), { maxLength: 2 })),
    surprise: junk,
  },
  { requiredKeys: [] },
);
const config = fc.record(
  {
    name: nameA,
    listen: hostPort,
    dataDir: maybe(fc.constantFrom("state", "/var/lib/understudy", "")),
    tls: maybe(fc.oneof(fc.constant({ insecure: true }), fc.record({ ca: maybe(fc.constant("ca.pem")), cert: maybe(fc.constant("c.pem")), key: maybe(fc.constant("k.pem")), insecure: maybe(fc.constant(false)) }, { requiredKeys: [] }))),
    source: maybe(fc.record({ sets: maybe(fc.array(set, { maxLength: 3 })) }, { requiredKeys: [] })),
    target: maybe(fc.record({ root: maybe(fc.constantFrom("images", "/srv/images", "")), syncInterval: maybe(fc.constantFrom("50ms", 0, "never")) }, { requiredKeys: [] })),
    control: maybe(fc.record({ admins: maybe(fc.array(fc.constantFrom("understudy-operator", "", "x"), { maxLength: 2 })), allowCommands: maybe(fc.boolean()) }, { requiredKeys: [] })),
    extra: junk,
  },
  { requiredKeys: [] },
);

function checkAccepted(c: ReturnType<typeof parseAgentConfig>): void {
  assert.ok(path.isAbsolute(c.dataDir), "dataDir is made absolute");
  if (c.target) assert.ok(path.isAbsolute(c.target.root), "target.root is made absolute");
  for (const s of c.source?.sets ?? []) {
    assert.ok(path.isAbsolute(s.path), "set paths are made absolute");
    assert.ok(Number.isFinite(s.blockSize) && Number.isFinite(s.bandwidthLimit) && Number.isFinite(s.rescanInterval), "sizes and durations are numbers");
    if (c.tls.insecure) for (const t of s.targets) assert.ok(isLoopback(splitHostPort(t)!.host), `plaintext only on loopback (target ${t})`);
  }
  if (c.tls.insecure) assert.ok(isLoopback(splitHostPort(c.listen)!.host), `plaintext only on loopback (listen ${c.listen})`);
}

function parsesOrRefuses(fn: () => unknown, file: string): void {
  try {
    fn();
  } catch (e) {
    if (!(e instanceof ConfigError)) throw new Error(`threw ${(e as Error)?.constructor?.name}, not a ConfigError: ${(e as Error)?.message}`, { cause: e });
    assert.ok(e.message.includes(file), `the error names the file: ${e.message}`);
  }
}

test("fuzz: near-valid config objects load or give a ConfigError naming the field", () => {
  fc.assert(
    fc.property(config, (raw) => {
      try {
        checkAccepted(parseAgentConfig(raw, "/etc/understudy", "agent.yaml"));
      } catch (e) {
        if (!(e instanceof ConfigError)) throw new Error(`threw ${(e as Error)?.constructor?.name}, not a ConfigError: ${(e as Error)?.message}`, { cause: e });
        assert.match(e.message, /^invalid config agent\.yaml:\n( {2}\S.*: .+\n?)+$/, `every line names a field: ${e.message}`);
      }
    }),
    params(400),
  );
});

test("fuzz: sets given over the control service are validated the same way", () => {
  fc.assert(
    fc.property(set, fc.boolean(), (raw, insecure) => {
      parsesOrRefuses(() => {
        const s = parseSetConfig(raw, insecure);
        assert.ok(path.isAbsolute(s.path));
        if (insecure) for (const t of s.targets) assert.ok(isLoopback(splitHostPort(t)!.host));
      }, "replication set");
    }),
    params(400),
  );
});

test("fuzz: any YAML text (or not YAML at all) as a config file", async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), "fuzz-config-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const file = path.join(dir, "agent.yaml");
  await fc.assert(
    fc.asyncProperty(fc.oneof(config.map((c) => YAML.stringify(c)), fc.string({ maxLength: 200 }), fc.constantFrom("a: [", "&a [*a]", "!!binary x", "? [a]\n: b", "--- 1\n--- 2", "\u0000", "a: !!js/function 'x'")), async (text) => {
      await writeFile(file, text);
      try {
        await loadAgentConfig(file);
      } catch (e) {
        if (!(e instanceof ConfigError)) throw new Error(`threw ${(e as Error)?.constructor?.name}, not a ConfigError: ${(e as Error)?.message}`, { cause: e });
        assert.ok(e.message.includes(file), `the error names the file: ${e.message}`);
      }
    }),
    params(300),
  );
});
