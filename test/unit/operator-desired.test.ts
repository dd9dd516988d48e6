// What the operator asks the source agent to run: the set's name fits the
// agent's name rule for any namespace/name Kubernetes allows, and the SetSpec
// built from a ReplicationPair carries the documented defaults and is accepted
// by the agent's own validator (the same one its config file goes through).
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { desiredSetSpec, setNameFor } from "../../operator/controllers/desired.ts";
import { setConfigFromSpec } from "../../agent/control/managed-sets.ts";
import { SetSpec } from "../../agent/wire.ts";
import { parseSetConfig } from "../../common/config.ts";
import type { ResolvedPair } from "../../operator/api/v1alpha1/index.ts";

const AGENT_SET_NAME = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;

function pair(spec: Partial<ResolvedPair["spec"]> = {}, meta: { namespace?: string; name?: string } = {}): ResolvedPair {
  return {
    metadata: { namespace: "namespace" in meta ? meta.namespace : "prod", name: meta.name ?? "www", generation: 1 },
    spec: {
      source: { agent: { address: "10.0.0.1:7702" } },
      targets: [
        { name: "dr", agent: { address: "10.0.0.2:7702" } },
        { name: "backup", agent: { address: "backup.example.com:7702" } },
      ],
      replicationSet: { path: "/srv/www" },
      ...spec,
    },
  };
}

// Kubernetes names: a namespace is a DNS label (RFC 1123, <= 63), most object
// names a DNS subdomain (labels joined by dots, <= 253).
const dnsLabel = (max: number) =>
  fc
    .tuple(fc.constantFrom(..."abcdefghijklmnopqrstuvwxyz0123456789"), fc.string({ unit: fc.constantFrom(..."abz09-"), maxLength: max - 2 }), fc.constantFrom(..."az09"))
    .map(([a, mid, z]) => `${a}${mid}${z}`);
const namespace = fc.oneof(dnsLabel(63), fc.constantFrom("a", "default", "x".repeat(63)));
const subdomain = fc.oneof(
  fc.array(fc.oneof(dnsLabel(63), fc.constantFrom("a", "0")), { minLength: 1, maxLength: 6 }).map((ls) => ls.join(".").slice(0, 253).replace(/[.-]+$/, "")).filter((s) => s.length > 0 && /[a-z0-9]$/.test(s)),
  // many short labels, so the cut at 54 characters often lands on a '.' or '-'
  fc.array(fc.constantFrom("a", "b0", "a-b", "a--b", "0"), { minLength: 10, maxLength: 60 }).map((ls) => ls.join(".")),
  fc.constantFrom("a", "www", "a".repeat(253)),
);

test("short names are <namespace>.<name>, and a missing namespace is default", () => {
  assert.equal(setNameFor(pair()), "prod.www");
  assert.equal(setNameFor(pair({}, { namespace: undefined, name: "www" })), "default.www");
  const exactly63 = "n".repeat(10) + "." + "m".repeat(52);
  assert.equal(setNameFor(pair({}, { namespace: "n".repeat(10), name: "m".repeat(52) })), exactly63, "63 characters still fit unshortened");
});

test("property: the set name fits the agent's name rule for any valid namespace and name", () => {
  fc.assert(
    fc.property(namespace, subdomain, (ns, name) => {
      const n = setNameFor(pair({}, { namespace: ns, name }));
      assert.ok(n.length <= 63, `${n} is ${n.length} characters`);
      assert.match(n, AGENT_SET_NAME);
      if (ns.length + 1 + name.length <= 63) assert.equal(n, `${ns}.${name}`);
      else assert.ok(n.startsWith(`${ns}.${name}`.slice(0, 20)), "a shortened name still reads like the pair's");
      assert.equal(setNameFor(pair({}, { namespace: ns, name })), n, "deterministic");
    }),
    { numRuns: 2000 },
  );
});

test("long names that share a prefix get distinct set names", () => {
  const prefix = "payments-ledger-archive-replication-for-the-primary-database-cluster";
  const names = ["a", "b", "a2", "shard-1", "shard-2", "shard-1.x"].map((s) => `${prefix}-${s}`);
  const sets = names.map((name) => setNameFor(pair({}, { namespace: "finance", name })));
  assert.equal(new Set(sets).size, names.length, sets.join("\n"));
  for (const s of sets) {
    assert.ok(s.length <= 63);
    assert.match(s, AGENT_SET_NAME);
  }
  // Across namespaces too (the same long name in two namespaces).
  assert.notEqual(setNameFor(pair({}, { namespace: "a", name: prefix })), setNameFor(pair({}, { namespace: "b", name: prefix })));
  // A cut that ends in '.', '-' or '_' is trimmed before the hash (the name must end alphanumeric anyway).
  const dotted = setNameFor(pair({}, { namespace: "ns", name: `${"a".repeat(50)}.-.-${"b".repeat(30)}` }));
  assert.match(dotted, /^ns\.a{50}-[0-9a-f]{8}$/);
});

test("desiredSetSpec fills in the documented defaults", () => {
  assert.deepEqual(desiredSetSpec(pair()), {
    name: "prod.www",
    path: "/srv/www",
    include: ["**"],
    exclude: [],
    targets: ["10.0.0.2:7702", "backup.example.com:7702"],
    mode: "continuous",
    intervalMs: 0,
    compression: "fast",
    bandwidthLimit: 0,
    blockSize: 65536,
    queueMemory: 32 * 1024 * 1024,
    verifyIntervalMs: 0,
    verifyRepair: false,
    epoch: 0,
    wholeServer: false,
  } satisfies SetSpec);
});

test("desiredSetSpec parses sizes and durations with the agent's syntax", () => {
  const s = desiredSetSpec(
    pair({
      replicationSet: { path: "/data", include: ["*.db"], exclude: ["tmp/**"] },
      mode: "scheduled",
      interval: "5m",
      compression: "max",
      bandwidthLimit: "10MiB",
      queueMemory: "1.5GiB",
      mirror: { mode: "full", blockSize: 1048576 },
      verify: { interval: "24h", repair: true },
    }),
  );
  assert.deepEqual(
    { ...s, name: undefined },
    { name: undefined, path: "/data", include: ["*.db"], exclude: ["tmp/**"], targets: ["10.0.0.2:7702", "backup.example.com:7702"], mode: "scheduled", intervalMs: 300_000, compression: "max", bandwidthLimit: 10_485_760, blockSize: 1_048_576, queueMemory: 1.5 * 1024 ** 3, verifyIntervalMs: 86_400_000, verifyRepair: true, epoch: 0, wholeServer: false },
  );
  assert.equal(desiredSetSpec(pair({ bandwidthLimit: "64KB", queueMemory: "4096", verify: { interval: "250ms" } })).bandwidthLimit, 64_000);
  assert.equal(desiredSetSpec(pair({ queueMemory: "4096" })).queueMemory, 4096);
  assert.equal(desiredSetSpec(pair({ verify: { interval: "250ms" } })).verifyIntervalMs, 250);
  assert.equal(desiredSetSpec(pair({ mode: "continuous", interval: "5m" })).intervalMs, 0, "the interval means nothing in continuous mode");
});

test("the agent accepts the spec and runs it with the same values (defaults agree with the agent's own)", () => {
  const minimal = desiredSetSpec(pair());
  const cfg = setConfigFromSpec(minimal, false);
  // A minimal pair must mean what a minimal set in the agent's config file means.
  assert.deepEqual(cfg, parseSetConfig({ name: "prod.www", path: "/srv/www", targets: ["10.0.0.2:7702", "backup.example.com:7702"] }, false));

  const full = setConfigFromSpec(desiredSetSpec(pair({ mode: "scheduled", interval: "5m", compression: "none", bandwidthLimit: "10MiB", queueMemory: "64MiB", mirror: { blockSize: 4096 }, verify: { interval: "1h", repair: true } })), false);
  assert.deepEqual(
    [full.mode, full.interval, full.compression, full.bandwidthLimit, full.queueMemory, full.blockSize, full.verifyInterval, full.verifyRepair],
    ["scheduled", 300_000, "none", 10_485_760, 64 * 1024 * 1024, 4096, 3_600_000, true],
  );
});

// Sizes and durations as the CRD lets them through (its CEL patterns), within
// sane magnitudes (uint64 fields beyond 2^53 cannot be sent at all).
const crdSize = fc.tuple(fc.nat({ max: 4096 }), fc.option(fc.nat({ max: 99 }), { nil: undefined }), fc.boolean(), fc.constantFrom("", "B", "K", "KiB", "KB", "M", "MiB", "MB", "G", "GiB", "GB")).map(([n, frac, space, unit]) => `${n}${frac === undefined ? "" : `.${frac}`}${space && unit ? " " : ""}${unit}`);
const crdDuration = fc.tuple(fc.integer({ min: 1, max: 100_000 }), fc.constantFrom("ms", "s", "m", "h")).map(([n, u]) => `${n}${u}`);
const blockSizes = [4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216] as const;

test("property: whatever the CRD admits, the agent accepts, also after the protobuf round trip", () => {
  fc.assert(
    fc.property(
      namespace,
      subdomain,
      fc.record({
        mode: fc.constantFrom("continuous" as const, "scheduled" as const),
        interval: crdDuration,
        compression: fc.constantFrom("none" as const, "fast" as const, "balanced" as const, "max" as const),
        bandwidthLimit: crdSize,
        queueMemory: crdSize,
        blockSize: fc.constantFrom(...blockSizes),
        verifyInterval: fc.oneof(crdDuration, fc.constant("0s")),
        repair: fc.boolean(),
      }),
      (ns, name, o) => {
        const spec = desiredSetSpec(pair({ mode: o.mode, interval: o.interval, compression: o.compression, bandwidthLimit: o.bandwidthLimit, queueMemory: o.queueMemory, mirror: { blockSize: o.blockSize }, verify: { interval: o.verifyInterval, repair: o.repair } }, { namespace: ns, name }));
        const wire = SetSpec.decode(SetSpec.encode(spec).finish());
        assert.deepEqual(wire, spec);
        const cfg = setConfigFromSpec(wire, false);
        assert.equal(cfg.name, spec.name);
        assert.equal(cfg.blockSize, o.blockSize);
        assert.equal(cfg.interval, o.mode === "scheduled" ? spec.intervalMs : undefined);
        assert.equal(cfg.verifyInterval, spec.verifyIntervalMs);
        assert.equal(cfg.bandwidthLimit, spec.bandwidthLimit);
        if (spec.queueMemory > 0) assert.equal(cfg.queueMemory, spec.queueMemory);
      },
    ),
    { numRuns: 500 },
  );
});
