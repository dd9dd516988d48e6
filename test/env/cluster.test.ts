// The test control plane is a real one: the server reports the version we built,
// RBAC is enforced, and ServiceAccount tokens from the TokenRequest API authenticate.
import assert from "node:assert/strict";
import path from "node:path";
import { after, before, test } from "node:test";
import { startCluster, type Cluster } from "./cluster.ts";

let cluster: Cluster;

before(async () => {
  const t0 = Date.now();
  cluster = await startCluster({ log: (s) => console.error(`[k8s] ${s}`) });
  console.error(`[k8s] cluster started in ${Date.now() - t0} ms`);
});

after(async () => {
  const t0 = Date.now();
  await cluster?.stop();
  console.error(`[k8s] cluster stopped in ${Date.now() - t0} ms`);
});

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  assert.equal(r.code, 0, `${what} failed (exit ${r.code}):\n${r.stderr}`);
  return r.stdout;
}

test("kubectl version reports the server version that was built", async () => {
  const v = JSON.parse(ok(await cluster.kubectl(["version", "-o", "json"]), "kubectl version")) as { serverVersion?: { gitVersion?: string }; clientVersion?: { gitVersion?: string } };
  assert.equal(v.serverVersion?.gitVersion, "v1.35.4");
  assert.equal(v.clientVersion?.gitVersion, "v1.35.4");
});

test("a ServiceAccount token is held to its Role", async () => {
  const ns = "rbac-demo";
  ok(
    await cluster.kubectl(["apply", "-f", "-"], {
      input: `
apiVersion: v1
kind: Namespace
metadata: {name: ${ns}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: demo, namespace: ${ns}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-configmaps, namespace: ${ns}}
rules:
- {apiGroups: [""], resources: [configmaps], verbs: [get, list]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: demo-reads-configmaps, namespace: ${ns}}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-configmaps}
subjects:
- {kind: ServiceAccount, name: demo, namespace: ${ns}}
`,
    }),
    "kubectl apply",
  );
  ok(await cluster.kubectl(["create", "configmap", "hello", "-n", ns, "--from-literal=a=b"]), "create configmap");

  const token = await cluster.createToken(ns, "demo", 600);
  const kc = await cluster.writeKubeconfigForToken(token, path.join(cluster.dir, "demo.kubeconfig"));

  const who = JSON.parse(ok(await cluster.kubectl(["auth", "whoami", "-o", "json"], { kubeconfig: kc }), "auth whoami")) as { status: { userInfo: { username: string } } };
  assert.equal(who.status.userInfo.username, `system:serviceaccount:${ns}:demo`);

  const cms = ok(await cluster.kubectl(["get", "configmaps", "-n", ns, "-o", "name"], { kubeconfig: kc }), "get configmaps as demo");
  assert.match(cms, /^configmap\/hello$/m);

  const secrets = await cluster.kubectl(["get", "secrets", "-n", ns], { kubeconfig: kc });
  assert.notEqual(secrets.code, 0);
  assert.match(secrets.stderr, /Forbidden/);
  assert.match(secrets.stderr, /system:serviceaccount:rbac-demo:demo/);

  const writes = await cluster.kubectl(["create", "configmap", "nope", "-n", ns], { kubeconfig: kc });
  assert.notEqual(writes.code, 0);
  assert.match(writes.stderr, /forbidden/i);

  // a token that does not verify against the signing key gets no access at all
  const forged = await cluster.writeKubeconfigForToken(token.slice(0, -4) + "AAAA", path.join(cluster.dir, "forged.kubeconfig"));
  const denied = await cluster.kubectl(["get", "configmaps", "-n", ns], { kubeconfig: forged });
  assert.notEqual(denied.code, 0);
  assert.match(denied.stderr, /Unauthorized|must be logged in/);
});

test("helm runs against the cluster", async () => {
  const v = ok(await cluster.helm(["version", "--short"]), "helm version");
  assert.match(v, /^v3\.\d+\.\d+/);
  ok(await cluster.helm(["list", "-A"]), "helm list");
});
