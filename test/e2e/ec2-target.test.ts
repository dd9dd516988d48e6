// EC2 DR targets end to end: a ReplicationPair whose target is an ec2 spec.
// moto (the real AWS SDK's EC2 and S3 API) listens on the lab's gateway, so
// the "instance" — a network namespace host — can fetch the bundle by its
// presigned URL, as a real instance would from S3; the operator runs with the
// chart's RBAC (provisioning enabled) and serves enrollment on the gateway.
// The test executes the user data the operator gave the instance, as
// cloud-init would at first boot (relocated into a temp dir with the
// UNDERSTUDY_* variables, since lab hosts share the test's file system).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { CreateSecurityGroupCommand, CreateSubnetCommand, CreateVpcCommand, DescribeImagesCommand, DescribeInstanceAttributeCommand } from "@aws-sdk/client-ec2";
import { HeadObjectCommand } from "@aws-sdk/client-s3";
import { fetchStatus } from "../../agent/control-client.ts";
import { awsClients, type AwsClients } from "../../operator/ec2/clients.ts";
import { describe as describeInstance, findByTarget, terminate } from "../../operator/ec2/instances.ts";
import type { EndpointStatus, ReplicationPair } from "../../operator/api/v1alpha1/index.ts";
import { startMoto, type Moto } from "../env/moto.ts";
import { buildBundle, type BuiltBundle } from "../env/bundle.ts";
import { FailoverWorld } from "./failover-fixture.ts";
import { CLI, freePort, tmpDir, waitFor } from "./harness.ts";
import { condition, kubectlOk } from "./k8s-harness.ts";
import type { Host } from "./netns.ts";

const NS = "dr";
const REGION = "eu-west-1";
const CREDS = { accessKeyId: "AKIAUNDERSTUDYTEST01", secretAccessKey: "understudy-test-secret" };
const BUCKET = "understudy-bundles";

let w: FailoverWorld;
let moto: Moto;
let aws: AwsClients;
let bundle: BuiltBundle;
let enrollUrl = "";
let ami = "";
let subnetId = "";
let sgId = "";
let instance: Host;
let bootDir = "";

function endpoint(p: ReplicationPair | undefined, name: string): EndpointStatus | undefined {
  return p?.status?.endpoints?.find((e) => e.name === name);
}

function ec2Target(name: string, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    name,
    ec2: {
      region: REGION,
      ami,
      subnetId,
      securityGroupIds: [sgId],
      tags: { team: "dr-drill" },
      stagingInstanceType: "t3.small",
      failoverInstanceType: "m5.large",
      bucket: BUCKET,
      credentialsSecret: "aws",
      endpoint: moto.endpoint,
      targetRoot: path.join(w.dir, `root-${name}`),
      ...over,
    },
  };
}

async function applyPair(name: string, src: string, targets: Record<string, unknown>[]): Promise<void> {
  await w.apply({ apiVersion: "understudy.dev/v1alpha1", kind: "ReplicationPair", metadata: { name, namespace: NS }, spec: { source: { agent: { address: w.agents.web!.address } }, targets, replicationSet: { path: src } } });
}

async function userDataOf(id: string): Promise<string> {
  const a = await aws.ec2.send(new DescribeInstanceAttributeCommand({ InstanceId: id, Attribute: "userData" }));
  return Buffer.from(a.UserData?.Value ?? "", "base64").toString("utf8");
}

function run(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => execFile(cmd, args, { env, timeout: 120_000 }, (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, out: stdout + stderr })));
}

before(async () => {
  const tmp = await tmpDir("understudy-ec2t-bundle-");
  bundle = await buildBundle(tmp);
  console.log(`bundle built in ${bundle.ms} ms`);
  w = await FailoverWorld.create(NS, [{ name: "web" }], {
    helmSet: ["provisioning.enabled=true", "provisioning.caSecretName=agent-ca", "provisioning.enrollURL=https://enroll.example.com:7443"],
    beforeOperator: async (world) => {
      moto = await startMoto({ host: world.lab.gateway });
      const port = await freePort();
      enrollUrl = `https://${world.lab.gateway}:${port}`;
      return ["--ca-dir", world.pki.dir, "--agent-bundle", bundle.tarball, "--enroll-url", enrollUrl, "--enroll-listen", `${world.lab.gateway}:${port}`];
    },
  });
  aws = awsClients({ region: REGION, endpoint: moto.endpoint, credentials: CREDS });
  const images = (await aws.ec2.send(new DescribeImagesCommand({ Owners: ["amazon"] }))).Images ?? [];
  ami = images.find((i) => i.State === "available" && /^ami-[0-9a-f]{8,17}$/.test(i.ImageId ?? ""))?.ImageId ?? "";
  assert.ok(ami, "moto has an AMI");
  const vpc = (await aws.ec2.send(new CreateVpcCommand({ CidrBlock: "10.88.0.0/16" }))).Vpc?.VpcId;
  subnetId = (await aws.ec2.send(new CreateSubnetCommand({ VpcId: vpc, CidrBlock: "10.88.1.0/24", AvailabilityZone: `${REGION}a` }))).Subnet?.SubnetId ?? "";
  sgId = (await aws.ec2.send(new CreateSecurityGroupCommand({ GroupName: "understudy-agents", Description: "understudy agents", VpcId: vpc }))).GroupId ?? "";
  await kubectlOk(w.cluster, ["create", "secret", "generic", "aws", "-n", NS, `--from-literal=AWS_ACCESS_KEY_ID=${CREDS.accessKeyId}`, `--from-literal=AWS_SECRET_ACCESS_KEY=${CREDS.secretAccessKey}`]);
  instance = await w.lab.addHost("i-dr");
  bootDir = path.join(w.dir, "instance");
  await mkdir(bootDir, { recursive: true });
});

after(async () => {
  // the agent the user data started (detached, in the instance's namespace)
  const pid = Number(await readFile(path.join(bootDir, "state", "agent.pid"), "utf8").catch(() => ""));
  if (pid > 0) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      /* gone already */
    }
  }
  aws?.destroy();
  await w?.dispose();
  await moto?.stop();
  if (bundle && !process.env.KEEP_TEST_DIRS) await rm(path.dirname(bundle.tarball), { recursive: true, force: true });
});

describe("ec2 DR targets", { timeout: 900_000 }, () => {
  let src = "";
  let userData = "";
  let instanceId = "";

  test("apply: bundle uploaded, instance launched with type, tags and user data; the user data installs and enrolls the agent; replication reaches equality", async () => {
    src = await w.sourceTree("www", 40);
    await applyPair("web", src, [ec2Target("dr")]);
    const p = await w.waitPair("web", "ec2 target launched and waiting for enrollment", (x) => endpoint(x, "dr")?.phase === "Enrolling" && !!endpoint(x, "dr")?.instanceId, 120_000);
    const ep = endpoint(p, "dr")!;
    instanceId = ep.instanceId!;
    assert.equal(condition(p, "Ready").status, "False");
    assert.equal(condition(p, "Provisioned").status, "False");

    const inst = (await describeInstance(aws.ec2, instanceId))!;
    assert.equal(inst.type, "t3.small", "launched as the staging type");
    assert.equal(inst.tags["understudy.dev/target"], `${NS}/web/dr`);
    assert.equal(inst.tags.team, "dr-drill");
    assert.equal(inst.tags["understudy.dev/managed-by"], "understudy-operator");
    assert.equal((await findByTarget(aws.ec2, `${NS}/web/dr`)).length, 1, "exactly one instance for the target");

    const head = await aws.s3.send(new HeadObjectCommand({ Bucket: ep.bundle!.bucket!, Key: ep.bundle!.key! }));
    assert.equal(head.ContentLength, (await readFile(bundle.tarball)).length, "the bundle is in S3");
    assert.equal(ep.bundle?.sha256?.length, 64);

    userData = await userDataOf(instanceId);
    assert.match(userData, /^#!\/bin\/bash/);
    assert.ok(userData.includes("X-Amz-Signature="), "the bundle is fetched by a presigned URL");
    assert.ok(userData.includes(ep.bundle!.sha256!), "and checked against its sha256");
    assert.ok(userData.includes(enrollUrl), "the agent enrolls at the operator's endpoint");
    // (a presigned URL names the access key id, which is not secret; the secret key must never appear)
    assert.ok(!userData.includes(CREDS.secretAccessKey), "no AWS secret in the user data");

    // first boot: what cloud-init does with the user data
    const env = [`UNDERSTUDY_PREFIX=${bootDir}/opt`, `UNDERSTUDY_ETC=${bootDir}/etc`, `UNDERSTUDY_STATE=${bootDir}/state`, `UNDERSTUDY_BOOT_LOG=${bootDir}/bootstrap.log`, "UNDERSTUDY_NO_SYSTEMD=1", `PATH=${process.env.PATH}`];
    const boot = await instance.run("env", ["-i", ...env, "bash", "-s"], { input: userData, timeoutMs: 240_000 });
    const bootLog = await readFile(path.join(bootDir, "bootstrap.log"), "utf8").catch(() => "(no log)");
    assert.equal(boot.code, 0, `user data failed (${boot.code}):\n${boot.stderr}\n${bootLog}`);
    assert.match(bootLog, /bootstrap done/);

    const ready = await w.waitPair("web", "enrolled, Ready", (x) => endpoint(x, "dr")?.phase === "Ready" && condition(x, "Ready").status === "True", 120_000);
    const enrolled = endpoint(ready, "dr")!;
    assert.equal(enrolled.agentAddress, `${instance.ip}:7702`, "reached where it enrolled from");
    assert.equal(enrolled.agentName, `ec2-${instanceId}`);
    assert.equal(condition(ready, "Provisioned").status, "True");
    const st = await fetchStatus(enrolled.agentAddress!, w.tls, 5000);
    assert.equal(st.name, `ec2-${instanceId}`, "the certificate the operator signed names the agent");

    await writeFile(path.join(src, "after-enroll.txt"), "a change made after the instance joined\n");
    await w.waitTreesEqual(src, path.join(w.dir, "root-dr", "web", `${NS}.web`), "the EC2 replica equals the source", 120_000);
  });

  test("a replayed enrollment token is refused", async () => {
    const token = /UNDERSTUDY_ENROLL_TOKEN='([^']+)'/.exec(userData)?.[1];
    assert.ok(token, "the user data carries a token");
    const d = await tmpDir("understudy-replay-");
    await writeFile(path.join(d, "ca.crt"), await readFile(path.join(w.pki.dir, "ca.crt")));
    const r = await run(process.execPath, [CLI, "enroll", "--url", enrollUrl, "--ca-file", path.join(d, "ca.crt"), "--dir", path.join(d, "etc"), "--listen", "0.0.0.0:7702", "--data-dir", path.join(d, "state"), "--target-root", path.join(d, "root")], { ...process.env, UNDERSTUDY_ENROLL_TOKEN: token });
    assert.equal(r.code, 2, r.out);
    assert.match(r.out, /already used/);
    assert.doesNotMatch(r.out, new RegExp(token.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")), "the token is not echoed");
    await rm(d, { recursive: true, force: true });
  });

  test("operator killed mid-provisioning: the restarted operator adopts the instance, never launches a second; deleting terminates it", async () => {
    const src2 = await w.sourceTree("db", 3);
    await applyPair("db", src2, [ec2Target("dr2")]);
    const p = await w.waitPair("db", "launched", (x) => !!endpoint(x, "dr2")?.instanceId, 120_000);
    const first = endpoint(p, "dr2")!.instanceId!;
    await w.op.kill9();
    // the status write after RunInstances is lost: nothing in the cluster names the instance any more
    await kubectlOk(w.cluster, ["patch", "replicationpair", "db", "-n", NS, "--subresource=status", "--type=json", "-p", JSON.stringify([{ op: "remove", path: "/status/endpoints/0/instanceId" }])]);
    await w.op.start();
    const again = await w.waitPair("db", "instance adopted", (x) => !!endpoint(x, "dr2")?.instanceId, 120_000);
    assert.equal(endpoint(again, "dr2")!.instanceId, first, "the same instance");
    assert.equal((await findByTarget(aws.ec2, `${NS}/db/dr2`)).length, 1, "and only one");

    const key = endpoint(again, "dr2")!.bundle!.key!;
    await kubectlOk(w.cluster, ["delete", "replicationpair", "db", "-n", NS, "--wait=false"]);
    await waitFor("pair db gone", async () => !(await w.get("db")), 120_000, 500);
    assert.equal((await describeInstance(aws.ec2, first))?.state, "terminated");
    await assert.rejects(aws.s3.send(new HeadObjectCommand({ Bucket: BUCKET, Key: key })), "its bundle object is removed");
  });

  test("onDelete Retain: deletion keeps the instances, also one the status lost the id of, names them in events and untags them; the bundle objects are removed", async () => {
    await applyPair("keep", await w.sourceTree("keep", 1), [ec2Target("kept", { onDelete: "Retain" }), ec2Target("lost", { onDelete: "Retain" })]);
    const p = await w.waitPair("keep", "both launched", (x) => !!endpoint(x, "kept")?.instanceId && !!endpoint(x, "lost")?.instanceId, 120_000);
    const ids = { kept: endpoint(p, "kept")!.instanceId!, lost: endpoint(p, "lost")!.instanceId! };
    const keys = [endpoint(p, "kept")!.bundle!.key!, endpoint(p, "lost")!.bundle!.key!];
    for (const key of keys) await aws.s3.send(new HeadObjectCommand({ Bucket: BUCKET, Key: key }));
    // "lost": the status write after RunInstances never happened (the operator stopped), and the pair is deleted meanwhile
    await w.op.stop();
    const at = (await w.get("keep"))!.status!.endpoints!.findIndex((e) => e.name === "lost");
    await kubectlOk(w.cluster, ["patch", "replicationpair", "keep", "-n", NS, "--subresource=status", "--type=json", "-p", JSON.stringify([{ op: "test", path: `/status/endpoints/${at}/name`, value: "lost" }, { op: "remove", path: `/status/endpoints/${at}/instanceId` }])]);
    await kubectlOk(w.cluster, ["delete", "replicationpair", "keep", "-n", NS, "--wait=false"]);
    await w.op.start();
    await waitFor("pair keep gone (finalizer done)", async () => !(await w.get("keep")), 60_000, 500);

    for (const [target, id] of Object.entries(ids)) {
      const inst = await describeInstance(aws.ec2, id);
      assert.ok(inst?.state === "running" || inst?.state === "pending", `${target}: ${id} is kept, not ${inst?.state}`);
      assert.equal(inst.tags["understudy.dev/retained-from"], `${NS}/keep/${target}`, `${target}: says where it came from`);
      assert.equal(inst.tags["understudy.dev/target"], undefined, `${target}: a later pair of the same name neither adopts nor terminates it`);
      assert.equal((await findByTarget(aws.ec2, `${NS}/keep/${target}`)).length, 0);
    }
    const events = () => kubectlOk(w.cluster, ["get", "events", "-n", NS, "--field-selector", "involvedObject.name=keep", "-o", "jsonpath={range .items[*]}{.reason} {.message}{\"\\n\"}{end}"]);
    await waitFor("an InstanceRetained event for each instance", async () => {
      const ev = await events();
      return Object.entries(ids).every(([t, id]) => ev.split("\n").some((l) => l.startsWith(`InstanceRetained ${t}: instance ${id} kept`)));
    }, 60_000, 500);
    assert.doesNotMatch(await events(), /InstanceTerminated/);
    for (const key of keys) await assert.rejects(aws.s3.send(new HeadObjectCommand({ Bucket: BUCKET, Key: key })), `${key} is removed`);
    for (const id of Object.values(ids)) await terminate(aws.ec2, id);
  });

  test("AWS errors become conditions with the AWS code and message", async () => {
    await applyPair("bad", await w.sourceTree("bad", 1), [ec2Target("dr3", { ami: "ami-0000000000deadbee" })]);
    const p = await w.waitPair("bad", "Provisioned=False with the AWS code", (x) => condition(x, "Provisioned").reason === "InvalidAMIID_NotFound", 120_000);
    assert.match(condition(p, "Provisioned").message ?? "", /AWS InvalidAMIID\.NotFound: .*ami-0000000000deadbee/);
    assert.equal(endpoint(p, "dr3")?.phase, "Failed");
    assert.match(await w.events("bad"), /InvalidAMIID_NotFound/);
    await kubectlOk(w.cluster, ["delete", "replicationpair", "bad", "-n", NS, "--wait=false"]);
    await waitFor("pair bad gone", async () => !(await w.get("bad")), 60_000, 500);
  });

  test("a host the operator cannot reach enrolls itself with the command `kubectl understudy enroll-command` prints; the token works once", async () => {
    const src3 = await w.sourceTree("onprem", 5);
    await w.apply({ apiVersion: "understudy.dev/v1alpha1", kind: "ReplicationPair", metadata: { name: "onprem", namespace: NS }, spec: { source: { agent: { address: w.agents.web!.address } }, targets: [{ name: "vault", enroll: { targetRoot: path.join(w.dir, "root-vault") } }], replicationSet: { path: src3 } } });
    await w.waitPair("onprem", "token handed out", (x) => endpoint(x, "vault")?.phase === "Enrolling", 60_000);
    const bin = path.join(bootDir, "opt", "understudy", "bin", "understudy"); // the bundle the first test installed
    const conf = path.join(w.dir, "vault-etc");
    const printed = await w.plugin(["enroll-command", "onprem", "--bin", bin, "--config-dir", conf, "--data-dir", path.join(w.dir, "vault-state")]);
    assert.equal(printed.code, 0, printed.out);
    const line = printed.out.split("\n").find((l) => l.startsWith("UNDERSTUDY_ENROLL_TOKEN="));
    assert.ok(line, printed.out);
    const enrollCmd = line.replace(/ && \\$/, "");
    const host = await w.lab.addHost("vault");
    const r = await host.run("bash", ["-c", enrollCmd], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, `${r.stdout}\n${r.stderr}`);
    host.exec(bin, ["agent", "--config", path.join(conf, "agent.yaml")], { stdio: "ignore", env: { ...process.env, MALLOC_MMAP_THRESHOLD_: "131072" } });

    const ready = await w.waitPair("onprem", "enrolled, Ready", (x) => endpoint(x, "vault")?.phase === "Ready" && condition(x, "Ready").status === "True", 120_000);
    assert.equal(endpoint(ready, "vault")?.agentAddress, `${host.ip}:7702`);
    await w.waitTreesEqual(src3, path.join(w.dir, "root-vault", "web", `${NS}.onprem`), "the enrolled host holds the replica", 60_000);
    const gone = await w.cluster.kubectl(["get", "secret", "understudy-enroll-onprem-vault", "-n", NS]);
    assert.notEqual(gone.code, 0, "the spent token's Secret is removed");

    const again = await host.run("bash", ["-c", enrollCmd.replace(conf, `${conf}-2`)], { timeoutMs: 120_000 });
    assert.equal(again.code, 2, again.stdout + again.stderr);
    assert.match(again.stdout + again.stderr, /already used/);
    await kubectlOk(w.cluster, ["delete", "replicationpair", "onprem", "-n", NS]);
  });

  test("failover resizes the instance to the failover type and starts it; failback returns the staging type; deletion terminates and cleans up", async () => {
    await kubectlOk(w.cluster, ["annotate", "replicationpair", "web", "-n", NS, "understudy.dev/verify=1", "--overwrite"]);
    await w.waitPair("web", "verify passed", (x) => x.status?.targets?.find((t) => t.name === "dr")?.lastVerify?.result === "Passed", 120_000);
    await kubectlOk(w.cluster, ["patch", "replicationpair", "web", "-n", NS, "--type=merge", "-p", JSON.stringify({ spec: { activeSide: "dr" } })]);
    const fo = await w.waitPair("web", "serving from the EC2 instance", (x) => x.status?.activeSide === "dr" && x.status?.phase === "FailedOver", 180_000);
    const big = (await describeInstance(aws.ec2, instanceId))!;
    assert.equal(big.type, "m5.large", "resized to the failover type");
    assert.equal(big.state, "running", "and started");
    assert.equal(endpoint(fo, "dr")?.instanceType, "m5.large");
    const reasons = await w.events("web");
    for (const r of ["InstanceStopping", "InstanceResized", "InstanceStarting"]) assert.match(reasons, new RegExp(r));

    await kubectlOk(w.cluster, ["patch", "replicationpair", "web", "-n", NS, "--type=merge", "-p", JSON.stringify({ spec: { activeSide: "source" } })]);
    await w.waitPair("web", "failed back, staging type again", (x) => x.status?.activeSide === "source" && endpoint(x, "dr")?.instanceType === "t3.small" && endpoint(x, "dr")?.phase === "Ready", 180_000);
    assert.equal((await describeInstance(aws.ec2, instanceId))?.type, "t3.small");

    const key = endpoint(await w.get("web"), "dr")!.bundle!.key!;
    await kubectlOk(w.cluster, ["delete", "replicationpair", "web", "-n", NS, "--wait=false"]);
    await waitFor("pair web gone", async () => !(await w.get("web")), 120_000, 500);
    assert.equal((await describeInstance(aws.ec2, instanceId))?.state, "terminated");
    await assert.rejects(aws.s3.send(new HeadObjectCommand({ Bucket: BUCKET, Key: key })));
  });
});
