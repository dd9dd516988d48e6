// Starting the dashboard inside the operator (--dashboard-address): its data
// source is the operator's caches, its users are authenticated and authorised
// by the API server, and it serves HTTPS: with the certificate given
// (--dashboard-tls-dir: tls.crt, tls.key, e.g. a cert-manager Secret), or else
// a self-signed one made at start whose fingerprint is logged. Plain HTTP only
// on a loopback address.
import { readFile } from "node:fs/promises";
import { X509Certificate } from "node:crypto";
import { hostname } from "node:os";
import path from "node:path";
import type { Informer, KubeConfig, ObjectCache } from "@kubernetes/client-node";
import type { Logger } from "../../common/log.ts";
import { isLoopback, splitHostPort } from "../../common/config.ts";
import { newCA, signLeaf } from "../../common/tls.ts";
import type { FailoverPolicy, ReplicationPair } from "../api/v1alpha1/index.ts";
import { KubeAuthorizer } from "./kube-auth.ts";
import { KubeSource } from "./kube-source.ts";
import { DashboardServer } from "./server.ts";

export interface KubeDashboardOptions {
  address: string;
  tlsDir?: string;
  kc: KubeConfig;
  pairs: Informer<ReplicationPair> & ObjectCache<ReplicationPair>;
  policyFor: (p: ReplicationPair) => FailoverPolicy | undefined;
  namespace?: string;
  log: Logger;
}

/** A self-signed serving certificate for this process (browsers warn; give --dashboard-tls-dir for a trusted one). */
export async function selfSignedTls(hosts: string[]): Promise<{ cert: string; key: string; fingerprint: string }> {
  const ca = await newCA(`understudy dashboard ${hostname()}`, 365);
  const sans = hosts.map((h) => ({ type: /^[\d.]+$|:/.test(h) ? ("ip" as const) : ("dns" as const), value: h }));
  const leaf = await signLeaf(ca, { commonName: "understudy-dashboard", usage: "server", sans, days: 365 });
  return { cert: leaf.certPem + ca.certPem, key: leaf.keyPem, fingerprint: new X509Certificate(leaf.certPem).fingerprint256 };
}

export async function startKubeDashboard(o: KubeDashboardOptions): Promise<{ server: DashboardServer; source: KubeSource; stop: () => Promise<void> }> {
  const hp = splitHostPort(o.address);
  if (!hp) throw new Error(`--dashboard-address must be host:port, not ${o.address}`);
  let tls: { cert: string; key: string } | undefined;
  if (o.tlsDir) tls = { cert: await readFile(path.join(o.tlsDir, "tls.crt"), "utf8"), key: await readFile(path.join(o.tlsDir, "tls.key"), "utf8") };
  else if (!isLoopback(hp.host)) {
    const s = await selfSignedTls(["localhost", "127.0.0.1", hostname(), ...(process.env.POD_IP ? [process.env.POD_IP] : [])]);
    tls = s;
    o.log.warn({ fingerprint: s.fingerprint }, "dashboard: no --dashboard-tls-dir; serving HTTPS with a self-signed certificate (check this SHA-256 fingerprint in the browser)");
  }
  const source = new KubeSource({ kc: o.kc, pairs: o.pairs, policyFor: o.policyFor, namespace: o.namespace, log: o.log });
  const server = new DashboardServer({ address: o.address, source, auth: new KubeAuthorizer(o.kc), log: o.log, ...(tls ? { tls } : {}) });
  await server.start();
  return { server, source, stop: async () => { await server.stop(); await source.close(); } };
}
