// The config loader: defaults, units, relative paths, and errors that name the bad field.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { ConfigError, loadAgentConfig, parseAgentConfig, parseDuration, parseSize } from "../../common/config.ts";

const base = { name: "web1", listen: "127.0.0.1:7701", dataDir: "state", tls: { insecure: true } };

test("sizes and durations", () => {
  assert.equal(parseSize("64KiB"), 65536);
  assert.equal(parseSize("1.5 GiB"), 1.5 * 1024 ** 3);
  assert.equal(parseSize(4096), 4096);
  assert.throws(() => parseSize("ten"), /not a size/);
  assert.equal(parseDuration("250ms"), 250);
  assert.equal(parseDuration("5m"), 300_000);
  assert.equal(parseDuration(2), 2000);
  assert.throws(() => parseDuration("soon"), /not a duration/);
});

test("defaults are filled in and relative paths resolve against the config's directory", () => {
  const c = parseAgentConfig({ ...base, source: { sets: [{ name: "www", path: "srv", targets: ["127.0.0.1:7702"] }] }, target: { root: "r" } }, "/etc/understudy");
  const s = c.source!.sets[0]!;
  assert.equal(c.dataDir, "/etc/understudy/state");
  assert.equal(s.path, "/etc/understudy/srv");
  assert.equal(c.target!.root, "/etc/understudy/r");
  assert.deepEqual([s.include, s.exclude, s.compression, s.blockSize, s.queueMemory, s.rescanInterval, s.mode], [["**"], [], "fast", 65536, 32 * 1024 * 1024, 300_000, "continuous"]);
  assert.equal(c.target!.syncInterval, 50);
});

test("errors name the field", () => {
  const bad = (raw: unknown, re: RegExp) => assert.throws(() => parseAgentConfig(raw, "/"), (e: unknown) => e instanceof ConfigError && re.test((e as Error).message));
  bad({ ...base, source: { sets: [{ name: "www", path: "/s", targets: ["nope"] }] } }, /source\.sets\[0\]\.targets\[0\]: expected host:port/);
  bad({ ...base, listen: "10.1.2.3:7701" }, /listen: tls\.insecure is allowed only on loopback/);
  bad({ ...base, source: { sets: [{ name: "www", path: "/s", targets: ["10.0.0.2:7702"] }] } }, /source\.sets\[0\]\.targets\[0\]: tls\.insecure/);
  bad({ ...base, source: { sets: [{ name: "www", path: "/s", targets: ["127.0.0.1:1"], blockSize: "3KiB" }] } }, /blockSize must be a power of two/);
  bad({ ...base, source: { sets: [{ name: "www", path: "/s", targets: ["127.0.0.1:1"], mode: "scheduled" }] } }, /interval: scheduled mode needs `interval`/);
  bad({ ...base, source: { sets: [{ name: "www", path: "/s", targets: ["127.0.0.1:1"], compresion: "max" }] } }, /compresion/);
  bad({ ...base, name: "Web 1" }, /name: expected a lowercase name/);
  bad({ ...base, source: { sets: [{ name: "a", path: "/s", targets: ["127.0.0.1:1"] }, { name: "a", path: "/t", targets: ["127.0.0.1:1"] }] } }, /duplicate set name a/);
});

test("unreadable and non-YAML files get a clear error", async () => {
  const d = await mkdtemp(path.join(os.tmpdir(), "cfg-"));
  await assert.rejects(loadAgentConfig(path.join(d, "missing.yaml")), /cannot read config .*missing\.yaml/);
  await writeFile(path.join(d, "bad.yaml"), "name: [unclosed");
  await assert.rejects(loadAgentConfig(path.join(d, "bad.yaml")), /is not valid YAML/);
});
