// Human-readable rendering of an agent's status (the JSON form is the raw message).
import type { MirrorProgress, StatusResponse, VerifyReport } from "./wire.ts";

export function bytes(n: number): string {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

export function progressLine(m: MirrorProgress | undefined): string {
  if (!m || !m.startedAt) return "no mirror";
  const pct = m.bytesTotal ? Math.min(100, (100 * m.bytesDone) / m.bytesTotal) : m.filesTotal ? (100 * m.filesDone) / m.filesTotal : 100;
  const state = m.active ? `${m.mode} mirror ${pct.toFixed(0)}%` : `${m.mode} mirror ${m.result || "stopped"}`;
  return `${state}  files ${m.filesDone}/${m.filesTotal}  ${bytes(m.bytesDone)}/${bytes(m.bytesTotal)}  sent ${bytes(m.bytesSent)}  ${bytes(m.rateBytesPerSecond)}/s${m.active ? `  eta ${Math.ceil(m.etaSeconds)}s` : ""}${m.resumed ? "  (resumed)" : ""}`;
}

function verifyLine(v: VerifyReport | undefined): string {
  if (!v) return "";
  const when = new Date(v.finishedAt * 1000).toISOString();
  return `  last verify ${when}: ${v.error ? `failed: ${v.error}` : v.ok ? (v.differences.length ? `${v.differences.length} difference(s), repaired` : "identical") : `${v.differences.length} difference(s)`}`;
}

export function formatStatus(s: StatusResponse): string {
  const out = [`agent ${s.name}  version ${s.agentVersion} (protocol v${s.protocolVersion})  up ${Math.round(s.uptimeSeconds)}s`];
  for (const set of s.sets) {
    out.push(`  set ${set.name}  ${set.path}  ${set.state}  files ${set.files}  ${bytes(set.bytes)}  seq ${set.lastSeq}  queue ${bytes(set.queuedBytes?.memory ?? 0)} mem / ${bytes(set.queuedBytes?.disk ?? 0)} disk`);
    if (set.pathError) out.push(`    error: ${set.pathError}`);
    for (const t of set.targets) {
      out.push(`    → ${t.address.padEnd(22)} ${t.state.padEnd(12)} sent ${t.lastSentSeq}  acked ${t.lastAckedSeq}  lag ${t.lagSeconds.toFixed(2)}s  queued ${bytes((t.queuedBytes?.memory ?? 0) + (t.queuedBytes?.disk ?? 0))}${t.lastError ? `  error: ${t.lastError}` : ""}`);
      if (t.mirror?.startedAt) out.push(`      ${progressLine(t.mirror)}`);
      if (t.lastVerify) out.push(`    ${verifyLine(t.lastVerify)}`);
    }
  }
  for (const i of s.images) out.push(`  image ${i.source}/${i.set}  ${i.path}  applied ${i.appliedSeq}  ${i.connected ? "connected" : "disconnected"}${i.lastError ? `  error: ${i.lastError}` : ""}`);
  if (!s.sets.length && !s.images.length) out.push("  (no replication sets, no images yet)");
  return out.join("\n");
}
