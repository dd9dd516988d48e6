// The agent bundle for tests: build it (`node bundle/build.ts --out …`, as
// test/e2e/bundle.test.ts does), and make "another version" of a built bundle
// by repacking it with a different VERSION and package.json version (what an
// upgrade needs to see; the code is the same) instead of building twice.
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readFile, rename, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const REPO = fileURLToPath(new URL("../..", import.meta.url));

export interface BuiltBundle {
  /** the .tar.gz */
  tarball: string;
  version: string;
  /** how long the build took */
  ms: number;
}

function run(cmd: string, args: string[], cwd?: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) =>
    execFile(cmd, args, { cwd, maxBuffer: 16 << 20, timeout: 600_000 }, (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr })),
  );
}

/** The version bundle/build.ts puts in the bundle: package.json's. */
export async function repoVersion(): Promise<string> {
  return (JSON.parse(await readFile(path.join(REPO, "package.json"), "utf8")) as { version: string }).version;
}

/** Build the bundle of this tree into `dir` (with the Node running the tests, Node 24). */
export async function buildBundle(dir: string): Promise<BuiltBundle> {
  const version = await repoVersion();
  const tarball = path.join(dir, `understudy-agent-${version}-linux-${process.arch}.tar.gz`);
  const t0 = Date.now();
  const r = await run(process.execPath, [path.join(REPO, "bundle", "build.ts"), "--out", tarball], REPO);
  if (r.code !== 0) throw new Error(`bundle build failed (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  return { tarball, version, ms: Date.now() - t0 };
}

/**
 * `bundle` repacked as `version`: understudy-agent-<version>/ with that VERSION
 * and package.json version (so `understudy --version` and the agent's status
 * report it). Written next to the original.
 */
export async function repackBundle(bundle: BuiltBundle, version: string): Promise<BuiltBundle> {
  const t0 = Date.now();
  const tmp = await mkdtemp(path.join(os.tmpdir(), "understudy-repack-"));
  try {
    const x = await run("tar", ["-xzf", bundle.tarball, "-C", tmp]);
    if (x.code !== 0) throw new Error(`tar -x ${bundle.tarball}: ${x.stderr}`);
    const from = path.join(tmp, `understudy-agent-${bundle.version}`);
    const to = path.join(tmp, `understudy-agent-${version}`);
    await rename(from, to);
    await writeFile(path.join(to, "VERSION"), `${version}\n`);
    const pkgFile = path.join(to, "package.json");
    const pkg = JSON.parse(await readFile(pkgFile, "utf8")) as { version: string };
    pkg.version = version;
    await writeFile(pkgFile, JSON.stringify(pkg, null, 2) + "\n");
    const tarball = path.join(path.dirname(bundle.tarball), `understudy-agent-${version}-linux-${process.arch}.tar.gz`);
    await mkdir(path.dirname(tarball), { recursive: true });
    const c = await run("tar", ["--owner=0", "--group=0", "--numeric-owner", "--use-compress-program=gzip -1", "-C", tmp, "-cf", tarball, `understudy-agent-${version}`]);
    if (c.code !== 0) throw new Error(`tar -c ${tarball}: ${c.stderr}`);
    return { tarball, version, ms: Date.now() - t0 };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
