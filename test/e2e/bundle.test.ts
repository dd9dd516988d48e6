// The agent bundle as an operator meets it: `node bundle/build.ts` makes one
// tar.gz; unpacked, it runs with no Node on the host (PATH has none, the
// environment is empty): --version, certs, a pair of agents that replicates
// and answers status. install.sh lays out <prefix>/understudy-<version> with
// the <prefix>/understudy symlink, is idempotent, never overwrites the config,
// upgrades and rolls back by swapping the link, and installs a systemd unit
// that systemd-analyze accepts.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { appendFile, cp, lstat, mkdir, open, readdir, readFile, readlink, realpath, rm, stat, symlink, writeFile } from "node:fs/promises";
import path from "node:path";
import YAML from "yaml";
import { setAttribute } from "@napi-rs/xattr";
import { ChildProc, REPO, compareTrees, freePort, snapshotTree, tmpDir, waitFor } from "./harness.ts";

const PKG = JSON.parse(await readFile(path.join(REPO, "package.json"), "utf8")) as { version: string; dependencies: Record<string, string> };
const VERSION = PKG.version;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv, cwd?: string): Promise<Run> {
  return new Promise((resolve) =>
    execFile(cmd, args, { env, cwd, maxBuffer: 16 << 20, timeout: 300_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr }),
    ),
  );
}

/**
 * A PATH with every command of /usr/bin, /bin, /usr/sbin and /sbin except
 * Node's (this machine has a system node in /usr/bin): the bundle must not
 * need one.
 */
async function pathWithoutNode(dir: string): Promise<string> {
  await mkdir(dir);
  const seen = new Set<string>();
  for (const d of ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]) {
    const real = await realpath(d).catch(() => undefined);
    if (!real || seen.has(real)) continue;
    seen.add(real);
    for (const n of await readdir(real)) {
      if (/^(node|nodejs|npm|npx|corepack)$/.test(n) || existsSync(path.join(dir, n))) continue;
      await symlink(path.join(real, n), path.join(dir, n));
    }
  }
  return dir;
}

class BundleAgent extends ChildProc {
  readonly bin: string;
  constructor(bin: string, logPath: string) {
    super(logPath, 10_000);
    this.bin = bin;
  }
  start(config: string, env: NodeJS.ProcessEnv): void {
    this.spawnLogged(this.bin, ["agent", "--config", config], env);
  }
  get exitCode(): number | null {
    return this.proc?.exitCode ?? null;
  }
}

describe("agent bundle", { timeout: 900_000 }, () => {
  let tmp = "";
  let tarball = "";
  let dir = ""; // the unpacked bundle
  let bin = ""; // its bin/understudy
  let bare: NodeJS.ProcessEnv = {}; // env -i PATH=<no node>
  let buildMs = 0;

  before(async () => {
    tmp = await tmpDir("understudy-bundle-");
    tarball = path.join(tmp, "dist", `understudy-agent-${VERSION}-linux-${process.arch}.tar.gz`);
    const t0 = Date.now();
    const b = await run(process.execPath, [path.join(REPO, "bundle", "build.ts"), "--out", tarball], process.env, REPO);
    buildMs = Date.now() - t0;
    assert.equal(b.code, 0, `bundle build failed:\n${b.stdout}\n${b.stderr}`);
    const x = path.join(tmp, "x");
    await mkdir(x);
    const u = await run("tar", ["-xzf", tarball, "-C", x], process.env);
    assert.equal(u.code, 0, u.stderr);
    dir = path.join(x, `understudy-agent-${VERSION}`);
    bin = path.join(dir, "bin", "understudy");
    bare = { PATH: await pathWithoutNode(path.join(tmp, "path")) };
  });
  after(async () => {
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  test("the tarball: runtime, code and production dependencies only", async (t) => {
    const size = (await stat(tarball)).size;
    t.diagnostic(`built in ${(buildMs / 1000).toFixed(1)} s, ${(size / 2 ** 20).toFixed(1)} MiB`);
    assert.ok(size < 80 * 2 ** 20, `the bundle stays small (${size} bytes)`);
    const sum = createHash("sha256").update(await readFile(tarball)).digest("hex");
    assert.equal(await readFile(`${tarball}.sha256`, "utf8"), `${sum}  ${path.basename(tarball)}\n`);
    const list = await run("tar", ["-tvzf", tarball], process.env);
    for (const line of list.stdout.trim().split("\n")) {
      assert.match(line, new RegExp(`^\\S+ 0/0 .* understudy-agent-${VERSION.replace(/\./g, "\\.")}/`), `owned by root, under one folder: ${line}`);
    }

    assert.equal(await readFile(path.join(dir, "VERSION"), "utf8"), `${VERSION}\n`);
    const fh = await open(path.join(dir, "node", "bin", "node"), "r");
    const magic = Buffer.alloc(4);
    await fh.read(magic, 0, 4, 0);
    await fh.close();
    assert.deepEqual([...magic], [0x7f, 0x45, 0x4c, 0x46], "node/bin/node is an ELF executable");
    assert.ok((await stat(path.join(dir, "node", "bin", "node"))).mode & 0o111);
    assert.match(await readFile(path.join(dir, "node", "LICENSE"), "utf8"), /Node\.js is licensed/);
    const pkg = JSON.parse(await readFile(path.join(dir, "package.json"), "utf8")) as Record<string, unknown>;
    assert.equal(pkg.type, "module");
    assert.equal(pkg.version, VERSION);
    assert.ok(!("devDependencies" in pkg) && !("scripts" in pkg));
    for (const d of Object.keys(PKG.dependencies)) assert.ok(existsSync(path.join(dir, "node_modules", d, "package.json")), `dependency ${d}`);
    // nothing the lockfile marks dev-only (typescript, eslint, the node package, ...)
    const lock = JSON.parse(await readFile(path.join(REPO, "package-lock.json"), "utf8")) as { packages: Record<string, { dev?: boolean }> };
    const devOnly = Object.entries(lock.packages).filter(([p, e]) => p && e.dev).map(([p]) => p);
    assert.ok(devOnly.includes("node_modules/typescript") && devOnly.includes("node_modules/node"));
    assert.deepEqual(devOnly.filter((p) => existsSync(path.join(dir, p))), [], "no dev-only packages");
    for (const f of ["bin/understudy.mjs", "agent/cli.ts", "common/config.ts", "operator/main.ts", "proto/gen/understudy/v1/replication.ts", "install.sh", "understudy-agent.service", "agent.yaml.example", "README.md"]) {
      assert.ok(existsSync(path.join(dir, f)), f);
    }
    for (const absent of ["test", "node_modules/.bin", "operator/api/v1alpha1/generate.ts", "package-lock.json"]) assert.ok(!existsSync(path.join(dir, absent)), `no ${absent}`);
    const junk = list.stdout.split("\n").filter((l) => /\/node_modules\/.*(\.d\.[cm]?ts|\.map|\/CHANGELOG\.md)$/.test(l));
    assert.deepEqual(junk, [], "no types, source maps or changelogs in node_modules");
  });

  test("it runs with no Node on the host: --version, certs", async () => {
    const which = await run("/bin/sh", ["-c", "command -v node || command -v nodejs"], bare);
    assert.notEqual(which.code, 0, `no node on this PATH (found ${which.stdout.trim()})`);
    const v = await run(bin, ["--version"], bare);
    assert.equal(v.code, 0, v.stderr);
    assert.equal(v.stdout.trim(), VERSION);
    assert.equal(v.stderr, "", "no warnings");

    const pki = path.join(tmp, "pki");
    const init = await run(bin, ["certs", "init", "--dir", pki], bare);
    assert.equal(init.code, 0, init.stderr);
    assert.ok(existsSync(path.join(pki, "ca.crt")) && existsSync(path.join(pki, "ca.key")));
    const issue = await run(bin, ["certs", "issue", "--dir", pki, "--name", "web1", "--host", "10.0.0.5"], bare);
    assert.equal(issue.code, 0, issue.stderr);
    assert.equal((await stat(path.join(pki, "web1.key"))).mode & 0o777, 0o600);

    // through a symlink on PATH, as /usr/local/bin/understudy would be
    const link = path.join(tmp, "linkdir", "understudy");
    await mkdir(path.dirname(link));
    await symlink(bin, link);
    const viaLink = await run("/bin/sh", ["-c", "understudy --version"], { PATH: `${path.dirname(link)}:${bare.PATH}` });
    assert.equal(viaLink.stdout.trim(), VERSION, viaLink.stderr);
  });

  test("agents from the bundle replicate and answer status", async () => {
    const w = path.join(tmp, "agents");
    await mkdir(path.join(w, "src", "sub"), { recursive: true });
    await writeFile(path.join(w, "src", "hello.txt"), "from the bundle\n");
    // The xattr addon (a prebuilt N-API binary in node_modules) must load from the bundle too: compareTrees compares xattrs.
    await setAttribute(path.join(w, "src", "hello.txt"), "user.origin", Buffer.from("bundle"));
    await writeFile(path.join(w, "src", "sub", "data.bin"), Buffer.alloc(300_000, 7));
    const [sp, tp] = [await freePort(), await freePort()];
    await writeFile(path.join(w, "dr1.yaml"), YAML.stringify({ name: "dr1", listen: `127.0.0.1:${tp}`, dataDir: "s-dr1", tls: { insecure: true }, target: { root: "dst" } }));
    await writeFile(path.join(w, "web1.yaml"), YAML.stringify({ name: "web1", listen: `127.0.0.1:${sp}`, dataDir: "s-web1", tls: { insecure: true }, source: { sets: [{ name: "www", path: "src", targets: [`127.0.0.1:${tp}`] }] } }));
    const env = { ...bare, MALLOC_MMAP_THRESHOLD_: "131072" };
    const agents = { dr1: new BundleAgent(bin, path.join(w, "dr1.log")), web1: new BundleAgent(bin, path.join(w, "web1.log")) };
    try {
      for (const [n, a] of Object.entries(agents)) {
        a.start(path.join(w, `${n}.yaml`), env);
        const port = n === "dr1" ? tp : sp;
        await waitFor(`bundled agent ${n} to answer status`, async () => {
          if (a.exitCode !== null) throw new Error(`agent ${n} exited with ${a.exitCode}: ${await a.log()}`);
          return (await run(bin, ["status", "--agent", `127.0.0.1:${port}`, "--json"], bare)).code === 0;
        }, 60_000, 250);
      }
      let diff: string[] = [];
      await waitFor("the replica", async () => {
        diff = compareTrees(await snapshotTree(path.join(w, "src")), await snapshotTree(path.join(w, "dst", "web1", "www")));
        return diff.length === 0;
      }, 60_000).catch(async (e: Error) => assert.fail(`${e.message}: ${diff.join("; ")}\n${await agents.web1.log()}\n${await agents.dr1.log()}`));

      const st = await run(bin, ["status", "--agent", `127.0.0.1:${sp}`, "--json"], bare);
      assert.equal(st.code, 0, st.stderr);
      const s = JSON.parse(st.stdout) as { name: string; agentVersion: string; sets: { name: string; targets: { address: string }[] }[] };
      assert.equal(s.name, "web1");
      assert.equal(s.agentVersion, VERSION);
      assert.equal(s.sets[0]?.name, "www");
      assert.equal(s.sets[0]?.targets[0]?.address, `127.0.0.1:${tp}`);
      const human = await run(bin, ["status", "--agent", `127.0.0.1:${tp}`], bare);
      assert.equal(human.code, 0, human.stderr);
      assert.match(human.stdout, /web1/);
      assert.doesNotMatch(await agents.web1.log(), /extended attributes are not replicated/);
    } finally {
      for (const a of Object.values(agents)) await a.stop();
    }
    for (const [n, a] of Object.entries(agents)) assert.equal(a.exitCode, 0, `agent ${n} stops cleanly on SIGTERM: ${await a.log()}`);
  });

  test("install.sh: symlinked layout, idempotent, keeps the config, upgrades and rolls back, systemd unit", async (t) => {
    const opt = path.join(tmp, "opt");
    const etc = path.join(tmp, "etc");
    const name = `understudy-${VERSION}`;
    const install = (from: string, ...extra: string[]) => run("/bin/sh", [path.join(from, "install.sh"), "--prefix", opt, "--etc", etc, ...extra], bare);
    const layout = async () => ({ entries: (await readdir(opt)).sort(), link: await readlink(path.join(opt, "understudy")) });

    const first = await install(dir, "--no-systemd");
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /next steps/);
    assert.deepEqual(await layout(), { entries: ["understudy", name].sort(), link: name });
    assert.ok((await lstat(path.join(opt, "understudy"))).isSymbolicLink());
    const conf = path.join(etc, "understudy", "agent.yaml");
    assert.equal((await stat(conf)).mode & 0o777, 0o600);
    assert.equal(await readFile(conf, "utf8"), await readFile(path.join(dir, "agent.yaml.example"), "utf8"));
    assert.ok(!existsSync(path.join(etc, "systemd")), "--no-systemd installs no unit");
    const installed = path.join(opt, "understudy", "bin", "understudy");
    assert.equal((await run(installed, ["--version"], bare)).stdout.trim(), VERSION);
    // the example config is refused until it is filled in
    const refused = await run(installed, ["agent", "--config", conf], bare);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /name/);

    await appendFile(conf, "# mine\n");
    const again = await install(dir, "--no-systemd");
    assert.equal(again.code, 0, again.stderr);
    assert.match(again.stdout, /already installed/);
    assert.match(again.stdout, /kept .*agent\.yaml/);
    assert.match(await readFile(conf, "utf8"), /# mine\n$/, "an existing config is never overwritten");
    assert.deepEqual(await layout(), { entries: ["understudy", name].sort(), link: name });

    // another build of the same version replaces the installed files (the link never dangles)
    await appendFile(path.join(dir, "README.md"), "\nrebuilt\n");
    const rebuilt = await install(dir, "--no-systemd");
    assert.equal(rebuilt.code, 0, rebuilt.stderr);
    assert.match(rebuilt.stdout, new RegExp(`installed ${opt}/${name}`));
    assert.deepEqual(await layout(), { entries: ["understudy", name].sort(), link: name }, "no leftovers");
    assert.match(await readFile(path.join(opt, "understudy", "README.md"), "utf8"), /rebuilt\n$/);

    // an upgrade: a new folder next to the old one, the link swapped; then a rollback
    const next = `${VERSION}-next`;
    const nextDir = path.join(tmp, "x", `understudy-agent-${next}`);
    await cp(dir, nextDir, { recursive: true });
    await writeFile(path.join(nextDir, "VERSION"), `${next}\n`);
    const nextPkg = path.join(nextDir, "package.json");
    await writeFile(nextPkg, (await readFile(nextPkg, "utf8")).replace(`"version": "${VERSION}"`, `"version": "${next}"`));
    const up = await install(nextDir, "--no-systemd");
    assert.equal(up.code, 0, up.stderr);
    assert.deepEqual(await layout(), { entries: ["understudy", name, `understudy-${next}`].sort(), link: `understudy-${next}` });
    assert.equal((await run(installed, ["--version"], bare)).stdout.trim(), next);
    await rm(nextDir, { recursive: true });
    const back = await install(dir, "--no-systemd");
    assert.equal(back.code, 0, back.stderr);
    assert.deepEqual(await layout(), { entries: ["understudy", name, `understudy-${next}`].sort(), link: name });
    assert.equal((await run(installed, ["--version"], bare)).stdout.trim(), VERSION);

    // refusals: an unknown option; a real directory where the link belongs
    assert.equal((await install(dir, "--bogus")).code, 2);
    const other = path.join(tmp, "opt-other");
    await mkdir(path.join(other, "understudy"), { recursive: true });
    const clash = await run("/bin/sh", [path.join(dir, "install.sh"), "--prefix", other, "--etc", etc, "--no-systemd"], bare);
    assert.equal(clash.code, 1);
    assert.match(clash.stderr, /not a symlink/);
    assert.deepEqual(await readdir(other), ["understudy"]);

    // the systemd unit: the shipped one as specified, installed with this prefix's paths
    const shipped = await readFile(path.join(dir, "understudy-agent.service"), "utf8");
    for (const line of [
      "Type=simple",
      "ExecStart=/opt/understudy/bin/understudy agent --config /etc/understudy/agent.yaml",
      "Environment=MALLOC_MMAP_THRESHOLD_=131072",
      "Restart=on-failure",
      "RestartSec=2s",
      "LimitNOFILE=1048576",
      "NoNewPrivileges=yes",
      "WantedBy=multi-user.target",
    ]) {
      assert.ok(shipped.split("\n").includes(line), `unit has ${line}`);
    }
    assert.ok(!/^ProtectSystem=/m.test(shipped), "no ProtectSystem (sets may live under /usr)");
    const withUnit = await install(dir);
    assert.equal(withUnit.code, 0, withUnit.stderr);
    const unitPath = path.join(etc, "systemd", "system", "understudy-agent.service");
    const unit = await readFile(unitPath, "utf8");
    assert.equal(unit, shipped.replaceAll("/opt/understudy/", `${opt}/understudy/`).replaceAll("/etc/understudy/", `${etc}/understudy/`));
    assert.match(unit, new RegExp(`^ExecStart=${opt}/understudy/bin/understudy agent --config ${etc}/understudy/agent\\.yaml$`, "m"));
    assert.match(await readFile(conf, "utf8"), /# mine\n$/);

    const sa = await run("/bin/sh", ["-c", "command -v systemd-analyze"], process.env);
    if (sa.code === 0) {
      // verify loads the unit as systemd would, and checks that ExecStart= is executable
      const v = await run("systemd-analyze", ["verify", unitPath], process.env);
      const ours = v.stderr.split("\n").filter((l) => l.includes("understudy-agent"));
      assert.equal(v.code, 0, v.stderr);
      assert.deepEqual(ours, [], "systemd-analyze verify has nothing to say about the unit");
    } else {
      // Only this assertion depends on systemd being installed on the test machine.
      t.diagnostic("systemd-analyze is not installed here: the unit was not verified by systemd");
    }
  });
});
