// Build the agent bundle: one tar.gz that runs the understudy agent on a plain
// Linux host with nothing installed, the Node.js runtime included.
//
//   node bundle/build.ts [--out dist/understudy-agent-<version>-linux-<arch>.tar.gz]
//
// Inside, under understudy-agent-<version>/:
//   bin/understudy            POSIX sh launcher: the bundled node on bin/understudy.mjs
//   node/bin/node, node/LICENSE   the Node 24 runtime pinned in node_modules/node
//   agent/ common/ operator/ proto/gen/ bin/understudy.mjs   the code (TypeScript, run by type stripping)
//   node_modules/             production dependencies only (npm ci --omit=dev from package-lock.json)
//   package.json VERSION README.md install.sh understudy-agent.service agent.yaml.example
//
// The archive is reproducible for a given tree: sorted, owned by root, every
// mtime set to SOURCE_DATE_EPOCH (default: the time of the last commit).
import { spawn, spawnSync, type SpawnSyncOptions } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { chmod, copyFile, mkdir, mkdtemp, open, readdir, readFile, realpath, rename, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { createGzip } from "node:zlib";

const REPO = fileURLToPath(new URL("..", import.meta.url));
const HERE = path.join(REPO, "bundle");

/** The code directories the `understudy` command imports at run time (operator/: `understudy operator`, `kubectl`). */
const CODE_DIRS = ["agent", "common", "operator", "proto/gen"];
/** Development tools among them (they import devDependencies). */
const CODE_EXCLUDE = new Set(["operator/api/v1alpha1/generate.ts"]);

/** ELF e_machine per Node arch. */
const ELF_MACHINE: Record<string, number> = { x64: 0x3e, arm64: 0xb7 };

function fail(msg: string): never {
  process.stderr.write(`bundle: ${msg}\n`);
  process.exit(1);
}

function run(cmd: string, args: string[], opts: SpawnSyncOptions = {}): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 64 << 20, ...opts });
  if (r.error) fail(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) fail(`${cmd} ${args.join(" ")} exited with ${r.status ?? r.signal}:\n${String(r.stderr ?? "").trim()}`);
  return String(r.stdout ?? "");
}

/** e_machine of an ELF executable, or undefined when the file is not one (a wrapper script, say). */
async function elfMachine(file: string): Promise<number | undefined> {
  let fh;
  try {
    fh = await open(file, "r");
  } catch {
    return undefined;
  }
  try {
    const b = Buffer.alloc(20);
    const { bytesRead } = await fh.read(b, 0, 20, 0);
    if (bytesRead < 20 || b.readUInt32BE(0) !== 0x7f454c46 || b[5] !== 1) return undefined; // "\x7fELF", little-endian
    return b.readUInt16LE(18);
  } finally {
    await fh.close();
  }
}

/**
 * The real Node binary behind node_modules/node. npm's `node` package puts
 * node-linux-<arch>'s binary at node/bin/node (a hard link), but it may be a
 * wrapper instead; then it is asked which binary it runs.
 */
async function findNode(arch: string): Promise<{ bin: string; version: string; licenseCandidates: string[] }> {
  const machine = ELF_MACHINE[arch] ?? fail(`no Node binary for architecture ${arch}`);
  const nm = path.join(REPO, "node_modules");
  const pinned = JSON.parse(await readFile(path.join(nm, "node", "package.json"), "utf8").catch(() => fail("node_modules/node is missing: run `npm ci` first"))) as { version: string };
  const archPkgs = [path.join(nm, "node", "node_modules", `node-linux-${arch}`), path.join(nm, `node-linux-${arch}`)];
  const candidates = [path.join(nm, "node", "bin", "node"), ...archPkgs.map((d) => path.join(d, "bin", "node"))];
  let bin: string | undefined;
  for (const c of candidates) {
    if ((await elfMachine(c)) === machine) {
      bin = await realpath(c);
      break;
    }
  }
  if (!bin) {
    const r = spawnSync(candidates[0]!, ["-p", "process.execPath"], { encoding: "utf8" });
    const p = r.status === 0 ? r.stdout.trim() : "";
    if (p && (await elfMachine(p)) === machine) bin = p;
  }
  if (!bin) fail(`no ${arch} ELF Node binary found in node_modules (looked at ${candidates.join(", ")})`);
  const version = run(bin, ["--version"]).trim();
  if (version !== `v${pinned.version}`) fail(`${bin} is ${version}, but node_modules/node is ${pinned.version}`);
  if (Number(pinned.version.split(".")[0]) < 24) fail(`understudy needs Node 24 or later; node_modules/node is ${pinned.version}`);
  const licenseCandidates = [path.join(path.dirname(path.dirname(bin)), "LICENSE"), ...archPkgs.map((d) => path.join(d, "LICENSE"))];
  return { bin, version: pinned.version, licenseCandidates };
}

/** Node's LICENSE: next to the binary, or else from the node-linux-<arch> package (npm's cache first). */
async function nodeLicense(arch: string, version: string, candidates: string[], tmp: string, env: NodeJS.ProcessEnv): Promise<string> {
  for (const c of candidates) {
    const text = await readFile(c, "utf8").catch(() => undefined);
    if (text) return text;
  }
  const dir = path.join(tmp, "node-pkg");
  await mkdir(dir);
  const packed = JSON.parse(run("npm", ["pack", `node-linux-${arch}@${version}`, "--json", "--prefer-offline", "--loglevel=error", "--pack-destination", dir], { cwd: dir, env })) as { filename: string }[];
  const file = packed[0]?.filename ?? fail(`npm pack node-linux-${arch}@${version} gave no file`);
  run("tar", ["-xzf", path.join(dir, file), "-C", dir, "package/LICENSE"]);
  return readFile(path.join(dir, "package", "LICENSE"), "utf8");
}

/**
 * The environment for the nested npm: the pinned node first on PATH (npm
 * runs on it), and none of the settings an enclosing `npm run` exports that
 * would point this npm at the project (local_prefix) or change what it installs.
 */
function npmEnv(nodeBin: string): NodeJS.ProcessEnv {
  const drop = /^(npm_(?!config_)|npm_config_(local_prefix|prefix|global|global_prefix|omit|include|production|dev|only|also|dry_run|ignore_scripts|workspaces?|include_workspace_root|package_lock(_only)?|save|user_agent|npm_version)$|init_cwd$)/i;
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!drop.test(k)) env[k] = v;
  env.PATH = `${path.dirname(nodeBin)}${path.delimiter}${process.env.PATH ?? "/usr/bin:/bin"}`;
  return env;
}

/** Files npm packages ship that nothing loads at run time: types, TypeScript sources, source maps, docs, tooling config. */
const DROP_FILE = /(\.map|\.[cm]?ts|\.tsbuildinfo|\.md|\.markdown)$|^(\.[a-z].*rc(\.\w+)?|\.editorconfig|\.npmignore|\.gitattributes|\.travis\.yml|tsconfig(\..+)?\.json)$/i;
const KEEP_FILE = /^(licen[cs]e|copying|notice|authors)/i;
/** Folders at a package's top: tests, docs, examples. */
const DROP_PKG_DIR = new Set(["test", "tests", "__tests__", "docs", "example", "examples", "benchmark", "benchmarks", "bench", ".github"]);

async function prune(dir: string, pkgTop: boolean): Promise<number> {
  let dropped = 0;
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) {
      if (e.name === ".bin" || (pkgTop && DROP_PKG_DIR.has(e.name))) {
        await rm(p, { recursive: true });
        dropped++;
      } else if (e.name === "node_modules") dropped += await prune(p, false);
      else {
        // a package's top folder: node_modules/<name> or node_modules/@scope/<name>
        const parent = path.basename(dir);
        const top = parent === "node_modules" && !e.name.startsWith("@") ? true : parent.startsWith("@") && path.basename(path.dirname(dir)) === "node_modules";
        dropped += await prune(p, top);
      }
    } else if (e.isSymbolicLink()) {
      fail(`unexpected symlink in node_modules: ${p}`);
    } else if (e.name === ".package-lock.json" || (DROP_FILE.test(e.name) && !KEEP_FILE.test(e.name))) {
      await rm(p);
      dropped++;
    }
  }
  return dropped;
}

async function copyCode(from: string, to: string, rel: string): Promise<number> {
  let n = 0;
  await mkdir(to, { recursive: true });
  for (const e of await readdir(from, { withFileTypes: true })) {
    const r = `${rel}/${e.name}`;
    if (e.isDirectory()) n += await copyCode(path.join(from, e.name), path.join(to, e.name), r);
    else if (e.isFile() && e.name.endsWith(".ts") && !CODE_EXCLUDE.has(r)) {
      await copyFile(path.join(from, e.name), path.join(to, e.name));
      await chmod(path.join(to, e.name), 0o644);
      n++;
    }
  }
  return n;
}

async function install(from: string, to: string, mode: number): Promise<void> {
  await mkdir(path.dirname(to), { recursive: true });
  await copyFile(from, to);
  await chmod(to, mode);
}

async function sha256(file: string): Promise<string> {
  const h = createHash("sha256");
  await pipeline(createReadStream(file), h);
  return h.digest("hex");
}

function sourceDateEpoch(): number {
  const env = Number(process.env.SOURCE_DATE_EPOCH);
  if (Number.isInteger(env) && env > 0) return env;
  const r = spawnSync("git", ["-C", REPO, "log", "-1", "--format=%ct"], { encoding: "utf8" });
  const git = Number(r.stdout?.trim());
  return r.status === 0 && Number.isInteger(git) && git > 0 ? git : Math.floor(Date.now() / 1000);
}

async function main(): Promise<void> {
  const started = performance.now();
  const { values } = parseArgs({ options: { out: { type: "string" }, help: { type: "boolean", short: "h" } } });
  if (values.help) {
    process.stdout.write("usage: node bundle/build.ts [--out FILE.tar.gz]\n");
    return;
  }
  if (process.platform !== "linux") fail(`the agent bundle is for Linux; this is ${process.platform}`);
  const arch = process.arch;
  const pkg = JSON.parse(await readFile(path.join(REPO, "package.json"), "utf8")) as Record<string, unknown> & { version: string };
  const version = pkg.version;
  const base = `understudy-agent-${version}`;
  const out = path.resolve(values.out ?? path.join(REPO, "dist", `${base}-linux-${arch}.tar.gz`));

  const node = await findNode(arch);
  const env = npmEnv(node.bin);
  const tmp = await mkdtemp(path.join(os.tmpdir(), "understudy-bundle-"));
  try {
    const root = path.join(tmp, base);
    await mkdir(root);

    // production dependencies, exactly as locked
    const deps = path.join(tmp, "deps");
    await mkdir(deps);
    for (const f of ["package.json", "package-lock.json"]) await copyFile(path.join(REPO, f), path.join(deps, f));
    run("npm", ["ci", "--omit=dev", "--ignore-scripts", "--no-bin-links", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error", "--prefix", deps], { cwd: deps, env, stdio: ["ignore", "ignore", "pipe"] });
    await rename(path.join(deps, "node_modules"), path.join(root, "node_modules"));
    const pruned = await prune(path.join(root, "node_modules"), false);

    // the runtime
    await install(node.bin, path.join(root, "node", "bin", "node"), 0o755);
    await writeFile(path.join(root, "node", "LICENSE"), await nodeLicense(arch, node.version, node.licenseCandidates, tmp, env), { mode: 0o644 });

    // the code
    let files = 0;
    for (const d of CODE_DIRS) files += await copyCode(path.join(REPO, d), path.join(root, d), d);
    await install(path.join(REPO, "bin", "understudy.mjs"), path.join(root, "bin", "understudy.mjs"), 0o644);
    await install(path.join(HERE, "understudy.sh"), path.join(root, "bin", "understudy"), 0o755);
    await install(path.join(HERE, "install.sh"), path.join(root, "install.sh"), 0o755);
    for (const f of ["understudy-agent.service", "agent.yaml.example", "README.md"]) await install(path.join(HERE, f), path.join(root, f), 0o644);
    // package.json: what the code reads at run time (type: module, the version)
    const slim = Object.fromEntries(["name", "version", "description", "type", "private", "license", "dependencies"].filter((k) => k in pkg).map((k) => [k, pkg[k]]));
    await writeFile(path.join(root, "package.json"), JSON.stringify(slim, null, 2) + "\n", { mode: 0o644 });
    await writeFile(path.join(root, "VERSION"), version + "\n", { mode: 0o644 });

    // it runs, with no Node but its own and an empty environment
    const said = run(path.join(root, "bin", "understudy"), ["--version"], { env: { PATH: "/usr/bin:/bin" } }).trim();
    if (said !== version) fail(`the bundle's \`understudy --version\` printed ${JSON.stringify(said)}, expected ${version}`);

    await mkdir(path.dirname(out), { recursive: true });
    const partial = `${out}.partial`;
    const tar = spawn("tar", ["--sort=name", "--owner=0", "--group=0", "--numeric-owner", `--mtime=@${sourceDateEpoch()}`, "--mode=go-w", "-C", tmp, "-cf", "-", base], { stdio: ["ignore", "pipe", "inherit"] });
    const tarExit = new Promise<number | null>((resolve, reject) => {
      tar.once("error", reject);
      tar.once("close", resolve);
    });
    await pipeline(tar.stdout, createGzip({ level: 6 }), createWriteStream(partial));
    const code = await tarExit;
    if (code !== 0) fail(`tar exited with ${code}`);
    await rename(partial, out);
    const sum = await sha256(out);
    await writeFile(`${out}.sha256`, `${sum}  ${path.basename(out)}\n`);

    const size = (await stat(out)).size;
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    process.stdout.write(
      `${out}\n  ${(size / 2 ** 20).toFixed(1)} MiB, sha256 ${sum}\n` +
        `  understudy ${version}, Node ${node.version} (${path.relative(REPO, node.bin)}), ${files} code files, node_modules pruned of ${pruned} entries; built in ${secs} s\n`,
    );
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

await main();
