// A local try-out of the test control plane: `npx node test/env/up.ts [--dir DIR]`
// starts etcd + kube-apiserver, prints how to point kubectl/helm at it, and runs
// until Ctrl-C. With --dir the directory (certificates, etcd data, logs) is kept.
import path from "node:path";
import { startCluster } from "./cluster.ts";

const i = process.argv.indexOf("--dir");
const dir = i > 0 ? process.argv[i + 1] : undefined;
if (i > 0 && !dir) {
  console.error("usage: npx node test/env/up.ts [--dir DIR]");
  process.exit(2);
}

const t0 = Date.now();
const cluster = await startCluster({ ...(dir !== undefined && { dir }), log: (s) => console.error(`[k8s] ${s}`) });
console.log(`# control plane up in ${((Date.now() - t0) / 1000).toFixed(1)} s; Ctrl-C stops it${dir ? "" : " and removes " + cluster.dir}
export KUBECONFIG=${cluster.kubeconfig}
export PATH=${cluster.binDir}:$PATH
# kubectl: ${path.join(cluster.binDir, "kubectl")}
# helm:    ${path.join(cluster.binDir, "helm")}
# server:  ${cluster.server}  (logs: ${cluster.dir}/kube-apiserver.log, ${cluster.dir}/etcd.log)
# no kubelet or controller-manager: objects are stored, no Pod ever runs, and
# namespaces get no \`default\` ServiceAccount (create your own).`);

let stopping = false;
const shutdown = (sig: string) => {
  if (stopping) return;
  stopping = true;
  console.error(`[k8s] ${sig}: stopping`);
  cluster.stop().then(
    () => process.exit(0),
    (e: unknown) => {
      console.error(e);
      process.exit(1);
    },
  );
};
process.on("SIGINT", () => shutdown("SIGINT"));
process.on("SIGTERM", () => shutdown("SIGTERM"));
// keep the event loop alive until a signal arrives
setInterval(() => {}, 1 << 30);
