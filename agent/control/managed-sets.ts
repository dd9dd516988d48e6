// Replication sets the operator manages (ConfigureSet/RemoveSet), as opposed to
// sets in the agent's config file. They are kept in <dataDir>/managed-sets.json
// so an agent restart brings them back without the operator.
import { readFile, rename, writeFile } from "node:fs/promises";
import path from "node:path";
import { parseSetConfig, type SetConfig } from "../../common/config.ts";
import { SetSpec, setSpecHash } from "../wire.ts";

/** A set name (the rule of the config file's `sets[].name`); also a directory name under <dataDir>/sets. */
export const SET_NAME = /^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/;

export interface ManagedSet {
  spec: SetSpec;
  hash: string;
  cfg: SetConfig;
}

/** A SetSpec from the wire → a validated set config (same rules as the config file). */
export function setConfigFromSpec(spec: SetSpec, insecure: boolean): SetConfig {
  const orUndefined = (n: number) => (n > 0 ? n : undefined);
  const raw = {
    name: spec.name,
    path: spec.path,
    include: spec.include.length ? spec.include : undefined,
    exclude: spec.exclude,
    targets: spec.targets,
    mode: spec.mode || undefined,
    interval: spec.intervalMs ? `${spec.intervalMs}ms` : undefined,
    compression: spec.compression || undefined,
    bandwidthLimit: spec.bandwidthLimit,
    blockSize: orUndefined(spec.blockSize),
    queueMemory: orUndefined(spec.queueMemory),
    verifyInterval: `${spec.verifyIntervalMs}ms`,
    verifyRepair: spec.verifyRepair,
    epoch: spec.epoch,
    wholeServer: spec.wholeServer,
  };
  return parseSetConfig(Object.fromEntries(Object.entries(raw).filter(([, v]) => v !== undefined)), insecure);
}

export function managedSet(spec: SetSpec, insecure: boolean): ManagedSet {
  return { spec, hash: setSpecHash(spec), cfg: setConfigFromSpec(spec, insecure) };
}

function file(dataDir: string): string {
  return path.join(dataDir, "managed-sets.json");
}

export async function loadManagedSpecs(dataDir: string): Promise<SetSpec[]> {
  let text: string;
  try {
    text = await readFile(file(dataDir), "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
  const doc = JSON.parse(text) as { sets?: Partial<SetSpec>[] };
  // Fields missing from an older file take their protobuf defaults.
  return (doc.sets ?? []).map((s) => ({ ...SetSpec.decode(new Uint8Array()), ...s }));
}

/** Written atomically: a crash leaves the old list or the new one. */
export async function saveManagedSpecs(dataDir: string, specs: SetSpec[]): Promise<void> {
  const tmp = `${file(dataDir)}.tmp`;
  await writeFile(tmp, JSON.stringify({ sets: specs }, null, 2), { mode: 0o600 });
  await rename(tmp, file(dataDir));
}
