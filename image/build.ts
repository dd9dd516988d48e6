// Build the understudy container image from this tree, with no registry, no
// daemon and no base image: an OCI image layout tar that `ctr images import`,
// `podman load`, `docker load` and `skopeo copy oci-archive:…` read.
//
//   npm run image [-- --out FILE] [--name NAME:TAG] [--bundle FILE] [--label K=V]
//   node image/build.ts --rootfs DIR    only the root file system (image/Containerfile's build stage)
//
// Default output: dist/understudy-image-<version>-linux-<arch>.oci.tar (and
// .digest next to it), named localhost/understudy:<version> (the chart's
// default image, charts/understudy/values.yaml).
//
// What the image holds (one layer, distroless style):
//   /opt/understudy/       the agent bundle unpacked (npm run bundle): Node 24, the code, production node_modules
//   /usr/share/understudy/understudy-agent-<version>-linux-<arch>.tar.gz
//                          the bundle itself, what the operator uploads to the hosts it provisions (SSH, EC2)
//   /usr/lib/x86_64-linux-gnu/…  exactly the shared libraries `ldd` lists for node and the bundle's native
//                          modules (glibc, libstdc++, libgcc_s), copied from this machine's Debian packages,
//                          with their copyright files under /usr/share/doc
//   /etc/passwd, group     root and nonroot (65532, home /home/nonroot, read-only); the image runs as 65532:65532
//   /etc/nsswitch.conf     files, then DNS
//   /tmp                   1777 (mount an emptyDir there when the root file system is read-only)
// No shell, no package manager. Entrypoint: node /opt/understudy/bin/understudy.mjs.
//
// Reproducible: the same tree (same bundle, same libraries) gives the same
// digest; every time stamp is SOURCE_DATE_EPOCH (default: the last commit's).
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmod, copyFile, lstat, mkdir, mkdtemp, readFile, readlink, realpath, rename, rm, stat, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { buildOciArchive, sha256File } from "./oci.ts";

const REPO = fileURLToPath(new URL("..", import.meta.url));
export const IMAGE_REPOSITORY = "localhost/understudy";
const PREFIX = "/opt/understudy";
const UID = 65532;

function fail(msg: string): never {
  throw new Error(`image: ${msg}`);
}

function run(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 64 << 20, ...opts });
  if (r.error) fail(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) fail(`${cmd} ${args.join(" ")} exited with ${r.status ?? r.signal}:\n${String(r.stderr ?? "").trim()}\n${String(r.stdout ?? "").trim()}`);
  return String(r.stdout ?? "");
}

function sourceDateEpoch(): number {
  const env = Number(process.env.SOURCE_DATE_EPOCH);
  if (Number.isInteger(env) && env > 0) return env;
  const r = spawnSync("git", ["-C", REPO, "log", "-1", "--format=%ct"], { encoding: "utf8" });
  const git = Number(r.stdout?.trim());
  return r.status === 0 && Number.isInteger(git) && git > 0 ? git : fail("set SOURCE_DATE_EPOCH (no git history to take the time from)");
}

/** The shared objects an ELF file loads, as `ldd` resolves them (absolute paths, the loader included). */
function neededLibraries(file: string): string[] {
  const out = run("ldd", [file]);
  const libs: string[] = [];
  for (const line of out.split("\n")) {
    const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)\s+\(/.exec(line);
    if (m) libs.push(m[1]!);
    else if (/not found/.test(line)) fail(`${file}: ${line.trim()}`);
  }
  return libs;
}

/** Copy `p` (as the loader names it) into rootfs at the same path, keeping the symlinks on the way (/lib → usr/lib, soname links). */
async function copyWithLinks(p: string, rootfs: string): Promise<void> {
  const parts = p.split("/").filter(Boolean);
  let cur = "/";
  for (let i = 0; i < parts.length; i++) {
    const next = path.join(cur, parts[i]!);
    const dest = path.join(rootfs, next);
    const st = await lstat(next);
    if (st.isSymbolicLink()) {
      const target = await readlink(next);
      if (!(await lstat(dest).catch(() => undefined))) {
        await mkdir(path.dirname(dest), { recursive: true });
        await symlink(target, dest);
      }
      // follow it and go on from there
      const resolved = path.resolve(path.dirname(next), target);
      await copyWithLinks(path.join(resolved, ...parts.slice(i + 1)), rootfs);
      return;
    }
    if (i === parts.length - 1) {
      if (!(await lstat(dest).catch(() => undefined))) {
        await mkdir(path.dirname(dest), { recursive: true });
        await copyFile(next, dest);
        await chmod(dest, 0o755);
      }
    } else if (!st.isDirectory()) fail(`${next} is not a directory`);
    cur = next;
  }
}

/** Debian packages owning these files, with versions: "libc6:amd64 2.36-9+deb12u14". */
function owningPackages(files: string[]): { name: string; version: string }[] {
  const names = new Set<string>();
  for (const f of files) {
    const r = spawnSync("dpkg-query", ["-S", f], { encoding: "utf8" });
    if (r.status !== 0) continue; // not a dpkg system, or a merged-/usr alias: try the real path below
    for (const line of r.stdout.split("\n")) {
      const m = /^([^:,\s]+(?::[a-z0-9]+)?)(?:, [^:]+)*: /.exec(line);
      if (m) names.add(m[1]!);
    }
  }
  return [...names].sort().map((name) => ({ name, version: run("dpkg-query", ["-W", "-f=${Version}", name]).trim() }));
}

async function dirs(rootfs: string, list: [string, number][]): Promise<void> {
  for (const [d, mode] of list) {
    const p = path.join(rootfs, d);
    await mkdir(p, { recursive: true });
    await chmod(p, mode);
  }
}

/** What the image is made of: the files of the code, bundle and image scripts and the lock file. */
const SOURCES = ["agent", "common", "operator", "proto/gen", "bin", "bundle", "image", "package.json", "package-lock.json"];

/**
 * A key for the image's inputs: sha256 over the commit time (the image's
 * timestamps) and the path and content of every source file (tracked or not,
 * unless ignored), so a cache of built images stays right on a dirty tree.
 */
export async function sourceKey(): Promise<string> {
  const files = run("git", ["-C", REPO, "ls-files", "-co", "--exclude-standard", "--", ...SOURCES]).split("\n").filter(Boolean).sort();
  const h = createHash("sha256");
  h.update(`epoch ${sourceDateEpoch()}\n`);
  for (const f of files) {
    const data = await readFile(path.join(REPO, f)).catch(() => undefined); // listed but deleted
    if (data) h.update(`${f}\0${data.length}\0`).update(data);
  }
  return h.digest("hex");
}

/** Where `npm run image` writes the image. */
export function defaultImageFile(version: string): string {
  return path.join(REPO, "dist", `understudy-image-${version}-linux-${process.arch}.oci.tar`);
}

export interface ImageBuild {
  file: string;
  digest: string;
  name: string;
  size: number;
  ms: number;
}

export async function buildImage(o: { out?: string; name?: string; bundle?: string; labels?: Record<string, string>; rootfs?: string } = {}): Promise<ImageBuild> {
  const started = performance.now();
  if (process.platform !== "linux") fail("the image is built on Linux");
  const pkg = JSON.parse(await readFile(path.join(REPO, "package.json"), "utf8")) as { version: string };
  const version = pkg.version;
  const arch = process.arch;
  const name = o.name ?? `${IMAGE_REPOSITORY}:${version}`;
  const out = path.resolve(o.out ?? defaultImageFile(version));
  const epoch = sourceDateEpoch();
  // (not for --rootfs: the Containerfile's build stage has no git and needs no key)
  const key = o.bundle || o.rootfs ? undefined : await sourceKey();
  const tmp = await mkdtemp(path.join(os.tmpdir(), "understudy-image-"));
  try {
    // the agent bundle: built from this tree unless one is given
    const bundleName = `understudy-agent-${version}-linux-${arch}.tar.gz`;
    let bundle = o.bundle;
    if (!bundle) {
      bundle = path.join(tmp, bundleName);
      run(process.execPath, [path.join(REPO, "bundle", "build.ts"), "--out", bundle], { cwd: REPO, env: { ...process.env, SOURCE_DATE_EPOCH: String(epoch) } });
    }
    if (path.basename(bundle) !== bundleName) fail(`--bundle ${bundle}: expected a file named ${bundleName} (the operator checks the name)`);
    // --rootfs (the Containerfile's build stage): the file system only, in a new directory
    const rootfs = o.rootfs ? path.resolve(o.rootfs) : path.join(tmp, "rootfs");
    if (o.rootfs && (await lstat(rootfs).catch(() => undefined))) fail(`--rootfs ${rootfs} exists already`);
    await dirs(rootfs, [["etc", 0o755], ["opt", 0o755], ["usr/share/understudy", 0o755], ["usr/share/doc", 0o755], ["tmp", 0o1777], ["home/nonroot", 0o755]]);

    // the bundle, unpacked at /opt/understudy, and as a file for provisioning
    run("tar", ["-xzf", bundle, "-C", path.join(rootfs, "opt"), "--no-same-owner"]);
    await rename(path.join(rootfs, "opt", `understudy-agent-${version}`), path.join(rootfs, PREFIX));
    await copyFile(bundle, path.join(rootfs, "usr/share/understudy", bundleName));
    await chmod(path.join(rootfs, "usr/share/understudy", bundleName), 0o644);
    await writeFile(path.join(rootfs, "usr/share/understudy", `${bundleName}.sha256`), `${await sha256File(bundle)}  ${bundleName}\n`, { mode: 0o644 });

    // the shared libraries node and the native modules load, nothing else
    const elves = [path.join(rootfs, PREFIX, "node/bin/node"), ...run("find", [path.join(rootfs, PREFIX, "node_modules"), "-name", "*.node", "-type", "f"]).split("\n").filter(Boolean)];
    const libs = [...new Set(elves.flatMap(neededLibraries))].sort();
    for (const l of libs) await copyWithLinks(l, rootfs);
    const real = await Promise.all(libs.map((l) => realpath(l)));
    const pkgs = owningPackages([...libs, ...real]);
    for (const p of pkgs) {
      const base = p.name.replace(/:.*/, "");
      const copyright = `/usr/share/doc/${base}/copyright`;
      if (await stat(copyright).catch(() => undefined)) {
        await mkdir(path.join(rootfs, "usr/share/doc", base), { recursive: true });
        await copyFile(copyright, path.join(rootfs, "usr/share/doc", base, "copyright"));
      }
    }

    await writeFile(path.join(rootfs, "etc/passwd"), `root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:${UID}:${UID}:nonroot:/home/nonroot:/sbin/nologin\n`, { mode: 0o644 });
    await writeFile(path.join(rootfs, "etc/group"), `root:x:0:\nnonroot:x:${UID}:\n`, { mode: 0o644 });
    await writeFile(path.join(rootfs, "etc/nsswitch.conf"), "passwd: files\ngroup: files\nhosts: files dns\n", { mode: 0o644 });

    // it runs: the image's node, with the image's libraries only (chroot needs root; else CI checks it in a pod)
    if (process.getuid?.() === 0) {
      const said = run("chroot", ["--userspec", `${UID}:${UID}`, rootfs, `${PREFIX}/node/bin/node`, `${PREFIX}/bin/understudy.mjs`, "--version"], { env: { PATH: "/usr/sbin:/usr/bin:/sbin:/bin", HOME: "/home/nonroot" } }).trim();
      if (said !== version) fail(`\`understudy --version\` in the image printed ${JSON.stringify(said)}, expected ${version}`);
    }

    if (o.rootfs) return { file: rootfs, digest: "", name, size: 0, ms: performance.now() - started };

    const labels: Record<string, string> = {
      "org.opencontainers.image.title": "understudy",
      "org.opencontainers.image.description": "understudy operator and agent (Node.js runtime included)",
      "org.opencontainers.image.version": version,
      "org.opencontainers.image.licenses": "Apache-2.0",
      "org.opencontainers.image.revision": spawnSync("git", ["-C", REPO, "rev-parse", "HEAD"], { encoding: "utf8" }).stdout?.trim() || "unknown",
      "dev.understudy.libraries": pkgs.map((p) => `${p.name}=${p.version}`).join(" "),
      ...o.labels,
    };
    const img = await buildOciArchive(rootfs, out, {
      name,
      epoch,
      user: `${UID}:${UID}`,
      entrypoint: [`${PREFIX}/node/bin/node`, `${PREFIX}/bin/understudy.mjs`],
      cmd: ["--help"],
      env: [`PATH=${PREFIX}/node/bin:/usr/local/bin:/usr/bin:/bin`, "HOME=/home/nonroot"],
      workingDir: "/",
      labels,
      createdBy: `npm run image (bundle ${bundleName}; libraries ${pkgs.map((p) => p.name).join(", ")})`,
    });
    await writeFile(`${out}.digest`, `${img.digest}\n`);
    // what it was built from, so a test can reuse it while the sources stay the same
    if (key) await writeFile(`${out}.source`, `${key}\n`);
    return { file: out, digest: img.digest, name, size: img.size, ms: performance.now() - started };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { out: { type: "string" }, name: { type: "string" }, bundle: { type: "string" }, rootfs: { type: "string" }, label: { type: "string", multiple: true }, help: { type: "boolean", short: "h" } } });
  if (values.help) {
    process.stdout.write("usage: node image/build.ts [--out FILE.oci.tar] [--name REPO:TAG] [--bundle understudy-agent-….tar.gz] [--label K=V]… | --rootfs DIR\n");
    return;
  }
  const labels: Record<string, string> = {};
  for (const l of values.label ?? []) {
    const i = l.indexOf("=");
    if (i < 1) fail(`--label ${l}: expected KEY=VALUE`);
    labels[l.slice(0, i)] = l.slice(i + 1);
  }
  const r = await buildImage({ ...(values.out ? { out: values.out } : {}), ...(values.name ? { name: values.name } : {}), ...(values.bundle ? { bundle: values.bundle } : {}), ...(values.rootfs ? { rootfs: values.rootfs } : {}), labels });
  if (values.rootfs) {
    process.stdout.write(`${r.file}\n  the image's root file system (for the Containerfile); built in ${(r.ms / 1000).toFixed(1)} s\n`);
    return;
  }
  process.stdout.write(`${r.file}\n  ${r.name}, ${(r.size / 2 ** 20).toFixed(1)} MiB, ${r.digest}; built in ${(r.ms / 1000).toFixed(1)} s\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main().catch((e: unknown) => {
    process.stderr.write(`${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  });
}
