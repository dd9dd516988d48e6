// The user data of an EC2 DR instance: a bash script cloud-init runs once at
// first boot. It fetches the agent bundle by a presigned URL (no AWS
// credentials on the instance), checks its SHA-256, installs it, enrolls the
// agent with its single-use token, and starts it.
//
// The UNDERSTUDY_* variables relocate the install for tests that play the
// instance in a network namespace on a shared file system; on a real instance
// they are unset and the defaults apply.
import { MAX_USER_DATA_BYTES } from "./instances.ts";

export interface UserDataInput {
  /** "<namespace>/<pair>/<target>", for the log line only */
  target: string;
  bundleUrl: string;
  bundleSha256: string;
  enrollUrl: string;
  caPem: string;
  token: string;
  agentPort: number;
  targetRoot: string;
}

/** Single-quote for bash: 'it'\''s'. */
function q(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

export function renderUserData(i: UserDataInput): string {
  if (!/^[0-9a-f]{64}$/.test(i.bundleSha256)) throw new Error(`bundle sha256 ${JSON.stringify(i.bundleSha256)} is not a hex SHA-256`);
  if (!/^-----BEGIN CERTIFICATE-----[\s\S]+-----END CERTIFICATE-----\s*$/.test(i.caPem) || i.caPem.includes("UNDERSTUDY_CA_END")) throw new Error("caPem is not a PEM certificate");
  const script = `#!/bin/bash
# understudy DR instance bootstrap for ${i.target.replace(/[^A-Za-z0-9./_-]/g, "_")}, written by the understudy operator.
set -euo pipefail
umask 077
prefix="\${UNDERSTUDY_PREFIX:-/opt}"
etc="\${UNDERSTUDY_ETC:-/etc}"
state="\${UNDERSTUDY_STATE:-/var/lib/understudy}"
log="\${UNDERSTUDY_BOOT_LOG:-/var/log/understudy-bootstrap.log}"
mkdir -p "$state" "$(dirname "$log")"
exec >>"$log" 2>&1
echo "understudy bootstrap started $(date -u +%FT%TZ)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
curl -fsS --retry 30 --retry-delay 2 --retry-connrefused --connect-timeout 10 --max-time 900 -o "$work/bundle.tar.gz" ${q(i.bundleUrl)}
echo ${q(`${i.bundleSha256}  `)}"$work/bundle.tar.gz" | sha256sum -c -
tar -xzf "$work/bundle.tar.gz" -C "$work"
bundle="$(find "$work" -mindepth 2 -maxdepth 2 -name install.sh -printf '%h\\n' | head -n1)"
if [ -n "\${UNDERSTUDY_NO_SYSTEMD:-}" ] || [ ! -d /run/systemd/system ]; then systemd=no; else systemd=yes; fi
if [ $systemd = yes ]; then "$bundle/install.sh" --prefix "$prefix" --etc "$etc"; else "$bundle/install.sh" --prefix "$prefix" --etc "$etc" --no-systemd; fi
conf="$etc/understudy"
cat >"$conf/enroll-ca.crt" <<'UNDERSTUDY_CA_END'
${i.caPem.trim()}
UNDERSTUDY_CA_END
export UNDERSTUDY_ENROLL_TOKEN=${q(i.token)}
"$prefix/understudy/bin/understudy" enroll --url ${q(i.enrollUrl)} --ca-file "$conf/enroll-ca.crt" --dir "$conf" \\
  --listen ${q(`0.0.0.0:${i.agentPort}`)} --data-dir "$state" --target-root ${q(i.targetRoot)} --force
unset UNDERSTUDY_ENROLL_TOKEN
if [ $systemd = yes ]; then
  systemctl daemon-reload
  systemctl enable --now understudy-agent
else
  MALLOC_MMAP_THRESHOLD_=131072 setsid nohup "$prefix/understudy/bin/understudy" agent --config "$conf/agent.yaml" >>"$state/agent.log" 2>&1 </dev/null &
  echo $! >"$state/agent.pid"
fi
echo "understudy bootstrap done $(date -u +%FT%TZ)"
`;
  const n = Buffer.byteLength(script);
  if (n > MAX_USER_DATA_BYTES) throw new Error(`user data would be ${n} bytes; EC2 takes at most ${MAX_USER_DATA_BYTES}`);
  return script;
}
