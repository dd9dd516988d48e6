// Install, upgrade, start and stop the understudy agent on a host over SSH,
// from the agent bundle (`npm run bundle`) and the host's config files.
//
// On the host (defaults; prefix and etcDir are options):
//   /opt/understudy -> understudy-<version>    the program, laid out by the bundle's install.sh
//   /etc/understudy/agent.yaml, tls/…          the files given, written atomically with their modes
//   /etc/understudy/run/agent.pid, agent.log   with start "process": the detached agent's pid and output
//
// installAgent is idempotent. It looks first (installed version, sha256 and
// mode of each config file, the running agent and the version it runs): when
// the version is installed and the files are the same it changes nothing and
// only makes sure the agent runs. Otherwise it uploads over SFTP into a
// private temporary directory (the bundle only when the version differs),
// runs the bundle's install.sh (which swaps the <prefix> symlink in one
// rename and keeps the previous version), moves each file into place (a
// temporary file in the same directory, chmod, rename), and restarts the agent.
//
// A user other than root works through `sudo -n` (passwordless sudo); the
// private key and the files' contents are never logged.
import { createHash } from "node:crypto";
import { stat } from "node:fs/promises";
import path from "node:path";
import type { Logger } from "../../common/log.ts";
import { RemoteCommandError, SshError, SudoError, tail } from "./errors.ts";
import { shq, SshSession, targetName, type ExecResult, type SshTarget } from "./session.ts";

export type { SshTarget } from "./session.ts";

export type StartMode = "systemd" | "process" | "auto";

export interface AgentFile {
  content: string | Buffer;
  /** permission bits, e.g. 0o600; a `.key` file must not be readable by group or others */
  mode: number;
}

export interface RemoteLayout {
  /** the symlink to the installed version; its parent is install.sh's --prefix (default /opt/understudy) */
  prefix?: string;
  /** the config directory; its parent is install.sh's --etc (default /etc/understudy) */
  etcDir?: string;
  /** pid file and log of an agent started as a process (default <etcDir>/run) */
  runDir?: string;
}

export interface SshCommon extends SshTarget, RemoteLayout {
  log: Logger;
  onProgress?: (msg: string) => void;
  /** the whole operation, connecting included (default 10 minutes) */
  timeoutMs?: number;
}

export interface InstallOptions extends SshCommon {
  /** the agent bundle, a local .tar.gz made by `npm run bundle` */
  bundlePath: string;
  /** the version the bundle holds (its VERSION) */
  version: string;
  /** written under etcDir, by relative path: agent.yaml, tls/agent.crt, tls/agent.key, tls/ca.crt, … */
  files: Record<string, AgentFile>;
  /** systemd: the unit install.sh installs; process: detached with setsid/nohup and a pid file; auto: systemd when it runs */
  start: StartMode;
  /**
   * Keep the certificate and key already on the host when `accept` takes the
   * certificate (e.g. issued by this CA, for this name, far from expiry):
   * a new one for the same identity is not a change worth restarting the
   * agent for (an operator restarted signs anew). Both names must be in files.
   */
  keepCertificate?: { cert: string; key: string; accept: (certPem: string) => boolean };
}

export interface InstallResult {
  /** the version installed now */
  installedVersion: string;
  /** the version installed before this call; absent on a fresh host */
  previousVersion?: string;
  /** whether this call ran install.sh (a new version, or none was installed) */
  installed: boolean;
  /** the config files this call wrote (the others were already the same) */
  filesWritten: string[];
  /** the certificate and key left as they were on the host (keepCertificate accepted them) */
  filesKept?: string[];
  /** whether this call started (or restarted) the agent */
  started: boolean;
  /** the agent's pid, when it runs */
  pid?: number;
  /** how the agent is run on this host */
  startMode: "systemd" | "process";
}

const DEFAULT_TIMEOUT_MS = 10 * 60_000;
const CONNECT_TIMEOUT_MS = 30_000;
const UNIT = "understudy-agent";
/** how long a started agent has to say it listens (or die) */
const START_WAIT_S = 30;
const SAFE_PATH = /^\/[A-Za-z0-9._/+-]*$/;
const SAFE_FILE = /^[A-Za-z0-9_][A-Za-z0-9._-]*(\/[A-Za-z0-9_][A-Za-z0-9._-]*)*$/;

interface Layout {
  /** <prefix>: the symlink */
  link: string;
  /** install.sh --prefix */
  prefixRoot: string;
  /** <etcDir> */
  conf: string;
  /** install.sh --etc */
  etcRoot: string;
  run: string;
}

function layout(o: RemoteLayout): Layout {
  const link = o.prefix ?? "/opt/understudy";
  const conf = o.etcDir ?? "/etc/understudy";
  const run = o.runDir ?? `${conf}/run`;
  for (const [k, v] of [["prefix", link], ["etcDir", conf], ["runDir", run]] as const) {
    if (!SAFE_PATH.test(v) || v.split("/").some((s) => s === "." || s === "..") || v.length < 2 || v.endsWith("/")) {
      throw new SshError("Invalid", `${k} must be an absolute path of letters, digits and . _ / + - (it goes into the systemd unit): ${JSON.stringify(v)}`);
    }
  }
  // install.sh names them: <--prefix>/understudy and <--etc>/understudy
  if (path.posix.basename(link) !== "understudy") throw new SshError("Invalid", `prefix must end in /understudy (install.sh makes <dir>/understudy the symlink to the version): ${link}`);
  if (path.posix.basename(conf) !== "understudy") throw new SshError("Invalid", `etcDir must end in /understudy (install.sh's config directory is <dir>/understudy): ${conf}`);
  return { link, prefixRoot: path.posix.dirname(link), conf, etcRoot: path.posix.dirname(conf), run };
}

function checkFiles(files: Record<string, AgentFile>, keep?: InstallOptions["keepCertificate"]): void {
  if (keep && (!files[keep.cert] || !files[keep.key])) throw new SshError("Invalid", `keepCertificate: ${keep.cert} and ${keep.key} must both be in files`);
  for (const [name, f] of Object.entries(files)) {
    if (!SAFE_FILE.test(name) || name.split("/").some((s) => s === "..")) throw new SshError("Invalid", `files: ${JSON.stringify(name)}: expected a relative path of letters, digits and . _ - (e.g. tls/agent.key)`);
    if (!Number.isInteger(f.mode) || f.mode < 0 || f.mode > 0o777) throw new SshError("Invalid", `files: ${name}: mode must be permission bits (0 to 0o777), got ${f.mode}`);
    if (/\.key$/.test(name) && f.mode & 0o077) throw new SshError("Invalid", `files: ${name}: a private key must not be readable by group or others (mode ${f.mode.toString(8).padStart(4, "0")}; use 0600)`);
  }
}

function sha256(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

function parseKv(out: string): { one: Map<string, string>; many: Map<string, string[]> } {
  const one = new Map<string, string>();
  const many = new Map<string, string[]>();
  for (const line of out.split("\n")) {
    const i = line.indexOf("=");
    if (i <= 0) continue;
    const k = line.slice(0, i);
    const v = line.slice(i + 1);
    one.set(k, v);
    many.set(k, [...(many.get(k) ?? []), v]);
  }
  return { one, many };
}

// ---------------------------------------------------------------- remote scripts (POSIX sh)

/** `ours PID`: PID is an understudy agent (a zombie or a reused pid is not). */
const OURS = `ours() { [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] && tr '\\000' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'understudy.mjs agent'; }`;
/** `running PID`: PID runs (a zombie does not), whatever it is (a new agent is a shell script for a moment). */
const RUNNING = `running() { st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; st=\${st##*) }; [ "\${st%% *}" != Z ]; }`;

/** args: link conf run file…; prints key=value lines. */
const PROBE = `${OURS}
link=$1 conf=$2 run=$3; shift 3
echo "uid=$(id -u)"
[ -f "$link/VERSION" ] && echo "version=$(cat "$link/VERSION")"
for f in "$@"; do
  p=$conf/$f
  if [ -f "$p" ] && [ ! -L "$p" ]; then echo "file=$(sha256sum <"$p" | cut -d' ' -f1) $(stat -c %a "$p") $f"; fi
done
pid=$(cat "$run/agent.pid" 2>/dev/null || true)
if ours "$pid"; then echo "ppid=$pid"; echo "pexe=$(readlink "/proc/$pid/exe" 2>/dev/null)"; fi
if command -v systemctl >/dev/null 2>&1; then
  echo "systemd=$(systemctl is-system-running 2>/dev/null || true)"
  spid=$(systemctl show -p MainPID --value ${UNIT} 2>/dev/null || true)
  if [ -n "$spid" ] && [ "$spid" != 0 ] && ours "$spid"; then echo "spid=$spid"; echo "sexe=$(readlink "/proc/$spid/exe" 2>/dev/null)"; fi
fi
exit 0`;

/** args: stage version prefixRoot etcRoot systemd(yes|no) then triples: index mode file. */
const INSTALL = `set -eu
die() { echo "$*" >&2; exit 1; }
stage=$1 version=$2 prefixroot=$3 etcroot=$4 systemd=$5; shift 5
conf=$etcroot/understudy
if [ -f "$stage/bundle.tar.gz" ]; then
  mkdir "$stage/x"
  tar -xzf "$stage/bundle.tar.gz" -C "$stage/x" || die "cannot unpack the bundle (a damaged upload?)"
  dir=$stage/x/understudy-agent-$version
  [ -f "$dir/VERSION" ] || die "the bundle has no understudy-agent-$version/ (it holds: $(ls "$stage/x" | tr '\\n' ' '))"
  got=$(cat "$dir/VERSION")
  [ "$got" = "$version" ] || die "the bundle's VERSION is $got, expected $version"
  if [ "$systemd" = yes ]; then sh "$dir/install.sh" --prefix "$prefixroot" --etc "$etcroot"; else sh "$dir/install.sh" --prefix "$prefixroot" --etc "$etcroot" --no-systemd; fi
fi
while [ $# -ge 3 ]; do
  i=$1 mode=$2 f=$3; shift 3
  dest=$conf/$f
  d=\${dest%/*}
  (umask 077 && mkdir -p "$d")
  tmp=$d/.\${dest##*/}.tmp.$$
  cp "$stage/f$i" "$tmp"
  chmod "$mode" "$tmp"
  [ "$(id -u)" != 0 ] || chown 0:0 "$tmp"
  mv -f "$tmp" "$dest"
  echo "wrote $dest"
done`;

/** args: mode(process|systemd) link conf run restart(yes|no) wait-seconds; prints pid= and started=. */
const START = `set -eu
${OURS}
${RUNNING}
mode=$1 link=$2 conf=$3 run=$4 restart=$5 wait=$6
if [ "$mode" = systemd ]; then
  systemctl daemon-reload
  systemctl enable ${UNIT} >/dev/null 2>&1 || true
  if systemctl is-active --quiet ${UNIT} && [ "$restart" = no ]; then started=no; else systemctl restart ${UNIT}; started=yes; fi
  sleep 2
  if ! systemctl is-active --quiet ${UNIT}; then
    echo "the agent (systemd unit ${UNIT}) does not stay up; its last lines:" >&2
    journalctl -u ${UNIT} -n 25 --no-pager >&2 2>/dev/null || true
    exit 3
  fi
  echo "pid=$(systemctl show -p MainPID --value ${UNIT})"
  echo "started=$started"
  exit 0
fi
mkdir -p "$run"
pidf=$run/agent.pid log=$run/agent.log
pid=$(cat "$pidf" 2>/dev/null || true)
if ours "$pid"; then
  if [ "$restart" = no ]; then echo "pid=$pid"; echo started=no; exit 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  i=0; while ours "$pid" && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
fi
[ -x "$link/bin/understudy" ] || { echo "$link/bin/understudy is missing: the agent is not installed" >&2; exit 3; }
[ -f "$conf/agent.yaml" ] || { echo "$conf/agent.yaml is missing" >&2; exit 3; }
cd /
echo "--- $(date -u +%FT%TZ) starting $link/bin/understudy agent --config $conf/agent.yaml" >>"$log"
from=$(($(wc -c <"$log") + 1))
setsid=$(command -v setsid || true)
MALLOC_MMAP_THRESHOLD_=131072 $setsid nohup "$link/bin/understudy" agent --config "$conf/agent.yaml" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidf.tmp.$$"
mv -f "$pidf.tmp.$$" "$pidf"
# up when it says it listens; a bad config makes it exit first. One that says
# nothing (a quieter log level) but still runs after the wait counts as up.
i=0
while [ $i -lt $((wait * 10)) ]; do
  running "$pid" || break
  tail -c +"$from" "$log" 2>/dev/null | grep -q '"agent listening"' && break
  sleep 0.1; i=$((i + 1))
done
if ! running "$pid"; then
  echo "the agent exited right after it started; the end of $log:" >&2
  tail -c +"$from" "$log" | tail -n 25 >&2
  exit 3
fi
echo "pid=$pid"
echo started=yes`;

/** args: mode(process|systemd) run; prints stopped=yes|no. */
const STOP = `set -eu
${OURS}
mode=$1 run=$2
if [ "$mode" = systemd ]; then
  if systemctl is-active --quiet ${UNIT}; then systemctl stop ${UNIT}; echo stopped=yes; else echo stopped=no; fi
  exit 0
fi
pid=$(cat "$run/agent.pid" 2>/dev/null || true)
if ours "$pid"; then
  kill -TERM "$pid" 2>/dev/null || true
  i=0; while ours "$pid" && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
  ours "$pid" && { echo "agent pid $pid does not stop" >&2; exit 3; }
  rm -f "$run/agent.pid"
  echo stopped=yes
else
  rm -f "$run/agent.pid"
  echo stopped=no
fi`;

// ---------------------------------------------------------------- the operation

/** One operation on one host: a session, a deadline, root or sudo -n. */
class Remote {
  readonly s: SshSession;
  readonly t: SshCommon;
  private sudo = false;

  private constructor(s: SshSession, t: SshCommon) {
    this.s = s;
    this.t = t;
  }

  static async open(t: SshCommon, deadlineMs: number): Promise<Remote> {
    const s = await SshSession.connect(t, { log: t.log, timeoutMs: Math.min(CONNECT_TIMEOUT_MS, deadlineMs) });
    const r = new Remote(s, t);
    try {
      await r.becomeRoot();
    } catch (e) {
      s.close();
      throw e;
    }
    return r;
  }

  private async becomeRoot(): Promise<void> {
    const id = await this.s.exec("id -u", { what: "id -u" });
    if (id.code !== 0) throw new SshError("Install", `${targetName(this.t)}: \`id -u\` failed (exit ${id.code}): ${tail(id.stderr)}`);
    if (id.stdout.trim() === "0") return;
    const probe = await this.s.exec("sudo -n true", { what: "sudo -n true" });
    if (probe.code !== 0) {
      const err = probe.stderr.trim();
      const why = /password is required/i.test(err)
        ? "sudo asks for a password"
        : probe.code === 127 || /not found/i.test(err)
          ? "sudo is not installed"
          : /not in the sudoers|not allowed|may not run/i.test(err)
            ? "the user may not use sudo"
            : `\`sudo -n true\` failed (exit ${probe.code}): ${tail(err, 3)}`;
      throw new SudoError(`${targetName(this.t)}: ${this.t.user} is not root and ${why}; installing the agent needs root: log in as root, or allow ${this.t.user} passwordless sudo (NOPASSWD)`);
    }
    this.sudo = true;
  }

  /** Run a script as root: `sh -c SCRIPT sh ARGS…`, through sudo -n when the user is not root. */
  async root(step: string, script: string, args: string[], timeoutMs = 5 * 60_000): Promise<ExecResult> {
    const cmd = `${this.sudo ? "sudo -n -- " : ""}sh -c ${shq(script)} sh ${args.map(shq).join(" ")}`;
    return this.s.exec(cmd, { what: step, timeoutMs });
  }

  /** root(), and a non-zero exit is a RemoteCommandError with the end of stderr. */
  async rootOk(step: string, code: "Install" | "Agent", script: string, args: string[], timeoutMs?: number): Promise<ExecResult> {
    const r = await this.root(step, script, args, timeoutMs);
    if (r.code !== 0) {
      const t = tail(r.stderr || r.stdout);
      throw new RemoteCommandError(code, step, r.code, t, `${targetName(this.t)}: ${step} failed (${r.code === null ? `signal ${r.signal ?? "?"}` : `exit ${r.code}`})${t ? `:\n${t}` : ""}`);
    }
    return r;
  }

  async mktemp(): Promise<string> {
    const r = await this.s.exec(`umask 077 && mktemp -d "\${TMPDIR:-/tmp}/understudy-install.XXXXXXXX"`, { what: "mktemp", timeoutMs: 30_000 });
    const dir = r.stdout.trim();
    if (r.code !== 0 || !dir.startsWith("/")) throw new SshError("Install", `${targetName(this.t)}: cannot make a temporary directory: ${tail(r.stderr)}`);
    return dir;
  }

  close(): void {
    this.s.close();
  }
}

interface Probe {
  uid: string;
  version?: string;
  files: Map<string, { sha256: string; mode: number }>;
  systemd: boolean;
  process?: { pid: number; version?: string };
  unit?: { pid: number; version?: string };
}

/** The version a running agent runs, from its executable: <prefix>/understudy-<version>/node/bin/node. */
function exeVersion(exe: string | undefined): string | undefined {
  if (!exe || exe.endsWith(" (deleted)")) return undefined;
  return /\/understudy-([A-Za-z0-9.+_-]+)\/node\/bin\/node$/.exec(exe)?.[1];
}

async function probe(r: Remote, l: Layout, files: string[]): Promise<Probe> {
  const res = await r.rootOk("looking at the installed agent", "Install", PROBE, [l.link, l.conf, l.run, ...files], 60_000);
  const { one, many } = parseKv(res.stdout);
  const p: Probe = { uid: one.get("uid") ?? "", files: new Map(), systemd: ["running", "degraded", "starting", "initializing", "maintenance"].includes(one.get("systemd") ?? "") };
  const v = one.get("version");
  if (v) p.version = v.trim();
  for (const line of many.get("file") ?? []) {
    const [sum, mode, ...name] = line.split(" ");
    if (sum && mode) p.files.set(name.join(" "), { sha256: sum, mode: parseInt(mode, 8) });
  }
  const pp = Number(one.get("ppid"));
  if (pp > 0) p.process = { pid: pp, ...(exeVersion(one.get("pexe")) ? { version: exeVersion(one.get("pexe"))! } : {}) };
  const sp = Number(one.get("spid"));
  if (sp > 0) p.unit = { pid: sp, ...(exeVersion(one.get("sexe")) ? { version: exeVersion(one.get("sexe"))! } : {}) };
  return p;
}

function resolveMode(start: StartMode, p: Probe, l: Layout): "systemd" | "process" {
  if (start === "process") return "process";
  const systemdOk = p.systemd && l.etcRoot === "/etc";
  if (start === "systemd") {
    if (l.etcRoot !== "/etc") throw new SshError("Invalid", `start: systemd needs etcDir /etc/understudy (install.sh puts the unit in <etc>/systemd/system); it is ${l.conf}`);
    if (!p.systemd) throw new SshError("Agent", "start: systemd, but systemd does not run on this host (`systemctl is-system-running` says otherwise); use start: process or auto");
    return "systemd";
  }
  return systemdOk ? "systemd" : "process";
}

/**
 * Run `body` against the host within the operation's deadline; the session is
 * closed afterwards whatever happens.
 */
async function withRemote<T>(t: SshCommon, body: (r: Remote, progress: (m: string) => void) => Promise<T>): Promise<T> {
  const timeoutMs = t.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const started = Date.now();
  let step = "connecting";
  const progress = (m: string) => {
    step = m;
    t.log.info({ host: t.host, port: t.port, user: t.user }, `ssh: ${m}`);
    t.onProgress?.(m);
  };
  let remote: Remote | undefined;
  let timer: NodeJS.Timeout | undefined;
  let timedOut: SshError | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      timedOut = new SshError("Timeout", `${targetName(t)}: did not finish within ${(timeoutMs / 1000).toFixed(0)} s (at: ${step})`, true);
      remote?.s.abort(timedOut);
      reject(timedOut);
    }, timeoutMs);
  });
  deadline.catch(() => undefined);
  const work = (async () => {
    progress(`connecting to ${targetName(t)}`);
    const r = await Remote.open(t, timeoutMs);
    if (timedOut) {
      // the deadline passed while connecting: this session is nobody's
      r.close();
      throw timedOut;
    }
    remote = r;
    return body(r, progress);
  })();
  work.catch(() => undefined);
  try {
    return await Promise.race([work, deadline]);
  } finally {
    clearTimeout(timer);
    remote?.close();
    t.log.debug({ host: t.host, port: t.port, ms: Date.now() - started }, "ssh: done");
  }
}

/** Install or upgrade the agent, write its files, and make sure it runs. */
export async function installAgent(o: InstallOptions): Promise<InstallResult> {
  const l = layout(o);
  checkFiles(o.files, o.keepCertificate);
  if (!/^[A-Za-z0-9.+_-]+$/.test(o.version)) throw new SshError("Invalid", `version: expected letters, digits and . + _ - (as install.sh accepts), got ${JSON.stringify(o.version)}`);
  if (!["systemd", "process", "auto"].includes(o.start)) throw new SshError("Invalid", `start: expected systemd, process or auto, got ${JSON.stringify(o.start)}`);
  const bundle = await stat(o.bundlePath).catch(() => undefined);
  if (!bundle?.isFile()) throw new SshError("Invalid", `bundlePath: no such file: ${o.bundlePath} (make it with \`npm run bundle\`)`);
  const names = Object.keys(o.files).sort();
  const contents = new Map(names.map((n) => [n, Buffer.from(o.files[n]!.content)]));

  return withRemote(o, async (r, progress) => {
    progress("looking at the installed agent");
    const before = await probe(r, l, names);
    const mode = resolveMode(o.start, before, l);
    const running = mode === "systemd" ? before.unit : before.process;
    const needInstall = before.version !== o.version;
    let changed = names.filter((n) => {
      const have = before.files.get(n);
      return !have || have.sha256 !== sha256(contents.get(n)!) || have.mode !== o.files[n]!.mode;
    });
    const kept: string[] = [];
    const k = o.keepCertificate;
    if (k && changed.includes(k.cert) && before.files.get(k.cert)?.mode === o.files[k.cert]!.mode && before.files.get(k.key)?.mode === o.files[k.key]!.mode) {
      const pem = (await r.rootOk("reading the installed certificate", "Install", 'cat -- "$1"', [`${l.conf}/${k.cert}`], 30_000)).stdout;
      let ok = false;
      try {
        ok = k.accept(pem);
      } catch {
        ok = false; // unreadable: replace it
      }
      if (ok) {
        kept.push(k.cert, k.key);
        changed = changed.filter((n) => n !== k.cert && n !== k.key);
      }
    }
    o.log.info(
      { host: o.host, port: o.port, installed: before.version ?? null, want: o.version, filesChanged: changed, running: running ? { pid: running.pid, version: running.version ?? null } : null, startMode: mode },
      "ssh: install plan",
    );

    if (needInstall || changed.length) {
      const stage = await r.mktemp();
      try {
        if (needInstall) {
          progress(`uploading the bundle (${(bundle.size / 2 ** 20).toFixed(1)} MiB)`);
          await r.s.putFile(o.bundlePath, `${stage}/bundle.tar.gz`, 0o600);
        }
        const triples: string[] = [];
        for (const [i, n] of names.entries()) {
          if (!changed.includes(n)) continue;
          await r.s.writeFile(`${stage}/f${i}`, contents.get(n)!, 0o600);
          triples.push(String(i), o.files[n]!.mode.toString(8).padStart(4, "0"), n);
        }
        progress(needInstall ? `installing understudy ${o.version}${before.version ? ` (was ${before.version})` : ""}` : `writing ${changed.join(", ")}`);
        const res = await r.rootOk(needInstall ? "install.sh" : "writing the config files", "Install", INSTALL, [stage, o.version, l.prefixRoot, l.etcRoot, mode === "systemd" ? "yes" : "no", ...triples]);
        o.log.debug({ host: o.host, out: tail(res.stdout, 30) }, "ssh: install output");
      } finally {
        await r.root("removing the temporary directory", 'rm -rf -- "$1"', [stage], 60_000).catch(() => undefined);
      }
    }

    const restart = needInstall || changed.length > 0 || (running !== undefined && running.version !== o.version);
    progress(restart && running ? `restarting the agent (${mode})` : running ? "checking the agent runs" : `starting the agent (${mode})`);
    const st = parseKv((await r.rootOk("starting the agent", "Agent", START, [mode, l.link, l.conf, l.run, restart ? "yes" : "no", String(START_WAIT_S)], (START_WAIT_S + 60) * 1000)).stdout).one;
    const pid = Number(st.get("pid"));
    const result: InstallResult = {
      installedVersion: o.version,
      ...(before.version ? { previousVersion: before.version } : {}),
      installed: needInstall,
      filesWritten: changed,
      ...(kept.length ? { filesKept: kept } : {}),
      started: st.get("started") === "yes",
      ...(pid > 0 ? { pid } : {}),
      startMode: mode,
    };
    o.log.info({ host: o.host, port: o.port, ...result }, "ssh: agent installed");
    return result;
  });
}

/** The version installed on the host (<prefix>/VERSION), or undefined when none is. Needs no root. */
export async function agentVersionOverSsh(o: SshCommon): Promise<string | undefined> {
  const l = layout(o);
  return withRemote(o, async (r) => {
    const res = await r.s.exec(`cat ${shq(`${l.link}/VERSION`)} 2>/dev/null || true`, { what: "reading VERSION", timeoutMs: 30_000 });
    const v = res.stdout.trim();
    return v || undefined;
  });
}

/** Stop the agent (the systemd unit, or the process in <runDir>/agent.pid); whether one was running. */
export async function stopAgent(o: SshCommon & { start: StartMode }): Promise<{ stopped: boolean; startMode: "systemd" | "process" }> {
  const l = layout(o);
  return withRemote(o, async (r, progress) => {
    const p = await probe(r, l, []);
    const mode = resolveMode(o.start, p, l);
    progress(`stopping the agent (${mode})`);
    const out = parseKv((await r.rootOk("stopping the agent", "Agent", STOP, [mode, l.run], 60_000)).stdout).one;
    return { stopped: out.get("stopped") === "yes", startMode: mode };
  });
}
