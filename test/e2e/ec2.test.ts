// The AWS building blocks of EC2 DR targets (operator/ec2) against moto's
// server through the real AWS SDK: launching (type, tags, user data, volumes,
// instance profile, idempotency), resizing, terminating, AWS errors as
// condition material, and the bundle store (bucket, upload-once, presigned
// URL fetched with plain fetch(), removal).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import {
  CreateKeyPairCommand,
  CreateSecurityGroupCommand,
  CreateSubnetCommand,
  CreateVpcCommand,
  DescribeImagesCommand,
  DescribeInstanceAttributeCommand,
  DescribeInstancesCommand,
  DescribeVolumesCommand,
  EC2ServiceException,
} from "@aws-sdk/client-ec2";
import { GetObjectCommand, HeadObjectCommand, ListObjectsV2Command } from "@aws-sdk/client-s3";
import { startMoto, type Moto } from "../env/moto.ts";
import { awsClients, ec2Client, s3Client, type AwsClients } from "../../operator/ec2/clients.ts";
import { awsError, backoffMs, isAwsCode } from "../../operator/ec2/errors.ts";
import { deleteObject, ensureBucket, presignGet, putBundle, SHA256_METADATA, statObject } from "../../operator/ec2/bundle-store.ts";
import {
  clientToken,
  describe as describeInstance,
  findByTarget,
  launch,
  MANAGED_BY_TAG,
  resize,
  start,
  stop,
  TARGET_TAG,
  targetTag,
  terminate,
  waitForState,
  type LaunchSpec,
} from "../../operator/ec2/instances.ts";

const REGION = "eu-west-1";
const CREDS = { accessKeyId: "AKIAUNDERSTUDYTEST01", secretAccessKey: "understudy-test-secret" };
const FAST = { pollMs: 50, timeoutMs: 30_000 };

let moto: Moto;
let aws: AwsClients;
let ami: string;
let rootDevice: string;
let subnetId: string;
let vpcId: string;
let sgId: string;
const keyName = "understudy-dr";
const profileName = "understudy-dr-agent";
let profileArn: string;
let tmp: string;

/**
 * IAM has no client in this project (the operator does not manage IAM); moto takes
 * an unsigned-but-scoped query call like any AWS query API.
 */
async function iamCall(endpoint: string, params: Record<string, string>): Promise<string> {
  const res = await fetch(endpoint, {
    method: "POST",
    headers: {
      "content-type": "application/x-www-form-urlencoded",
      authorization: `AWS4-HMAC-SHA256 Credential=${CREDS.accessKeyId}/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0`,
    },
    body: new URLSearchParams({ Version: "2010-05-08", ...params }).toString(),
  });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return text;
}

function baseSpec(target: string, over: Partial<LaunchSpec> = {}): LaunchSpec {
  return {
    target,
    clientToken: clientToken(target, "1"),
    region: REGION,
    ami,
    instanceType: "t3.small",
    subnetId,
    securityGroupIds: [sgId],
    keyName,
    ...over,
  };
}

before(async () => {
  const t0 = Date.now();
  moto = await startMoto({ log: (s) => console.log(s) });
  console.log(`moto at ${moto.endpoint} after ${Date.now() - t0} ms`);
  aws = awsClients({ region: REGION, endpoint: moto.endpoint, credentials: CREDS });
  tmp = await mkdtemp(path.join(os.tmpdir(), "understudy-ec2-"));

  const images = (await aws.ec2.send(new DescribeImagesCommand({ Owners: ["amazon"] }))).Images ?? [];
  const img = images.find((i) => i.RootDeviceName === "/dev/xvda" && i.State === "available") ?? images[0];
  assert.ok(img?.ImageId, "moto has AMIs");
  ami = img.ImageId;
  rootDevice = img.RootDeviceName ?? "/dev/xvda";

  vpcId = (await aws.ec2.send(new CreateVpcCommand({ CidrBlock: "10.77.0.0/16" }))).Vpc?.VpcId ?? "";
  subnetId = (await aws.ec2.send(new CreateSubnetCommand({ VpcId: vpcId, CidrBlock: "10.77.1.0/24", AvailabilityZone: `${REGION}a` }))).Subnet?.SubnetId ?? "";
  sgId = (await aws.ec2.send(new CreateSecurityGroupCommand({ GroupName: "understudy-dr", Description: "understudy agents", VpcId: vpcId }))).GroupId ?? "";
  await aws.ec2.send(new CreateKeyPairCommand({ KeyName: keyName }));
  const created = await iamCall(moto.endpoint, { Action: "CreateInstanceProfile", InstanceProfileName: profileName });
  profileArn = /<Arn>([^<]+)<\/Arn>/.exec(created)?.[1] ?? "";
  assert.match(profileArn, /^arn:aws:iam::\d+:instance-profile\/understudy-dr-agent$/);
});

after(async () => {
  aws?.destroy();
  await moto?.stop();
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe("instances", () => {
  const target = targetTag("prod", "web", "dr1");
  let id: string;

  test("launch: type, tags, user data, volume sizes, subnet, groups, key, profile", async () => {
    const userData = "#!/bin/sh\ncurl -fsS 'https://example.invalid/bundle?X-Amz-Signature=abc' | tar -xz -C /opt\n/opt/understudy/install.sh --token t0k3n\n";
    const r = await launch(
      aws.ec2,
      baseSpec(target, { iamInstanceProfile: profileName, rootVolumeGiB: 20, dataVolumeGiB: 100, tags: { team: "storage", Name: "dr1" }, userData }),
    );
    assert.equal(r.created, true);
    assert.deepEqual(r.duplicates, []);
    id = r.instance.id;
    assert.match(id, /^i-[0-9a-f]+$/);

    const info = await describeInstance(aws.ec2, id);
    assert.ok(info);
    assert.equal(info.type, "t3.small");
    assert.equal(info.state, "running");
    assert.equal(info.imageId, ami);
    assert.equal(info.subnetId, subnetId);
    assert.equal(info.vpcId, vpcId);
    assert.match(info.privateIp ?? "", /^10\.77\.1\.\d+$/);
    assert.equal(info.tags[TARGET_TAG], "prod/web/dr1");
    assert.equal(info.tags[MANAGED_BY_TAG], "understudy-operator");
    assert.equal(info.tags.team, "storage");
    assert.equal(info.tags.Name, "dr1");
    assert.equal(info.iamInstanceProfileArn, profileArn);

    const raw = (await aws.ec2.send(new DescribeInstancesCommand({ InstanceIds: [id] }))).Reservations?.[0]?.Instances?.[0];
    assert.equal(raw?.KeyName, keyName);
    assert.deepEqual(
      raw?.SecurityGroups?.map((g) => g.GroupId),
      [sgId],
    );

    const attr = await aws.ec2.send(new DescribeInstanceAttributeCommand({ InstanceId: id, Attribute: "userData" }));
    assert.equal(Buffer.from(attr.UserData?.Value ?? "", "base64").toString(), userData);

    const rootVol = info.volumes[rootDevice];
    const dataVol = info.volumes["/dev/sdf"];
    assert.ok(rootVol && dataVol, `volumes ${JSON.stringify(info.volumes)}`);
    const vols = (await aws.ec2.send(new DescribeVolumesCommand({ VolumeIds: [rootVol, dataVol] }))).Volumes ?? [];
    const size = (v: string) => vols.find((x) => x.VolumeId === v)?.Size;
    assert.equal(size(rootVol), 20);
    assert.equal(size(dataVol), 100);
    const dataTags = Object.fromEntries((vols.find((x) => x.VolumeId === dataVol)?.Tags ?? []).map((t) => [t.Key, t.Value]));
    assert.equal(dataTags[TARGET_TAG], "prod/web/dr1", "volumes carry the target tag too");
  });

  test("launch again for the same target (a restarted operator): the same instance, only one exists", async () => {
    const again = await launch(aws.ec2, baseSpec(target, { rootVolumeGiB: 20, dataVolumeGiB: 100 }));
    assert.equal(again.created, false);
    assert.equal(again.instance.id, id);
    // even with a new client token (a new attempt number) the tag finds it
    const third = await launch(aws.ec2, baseSpec(target, { clientToken: clientToken(target, "2") }));
    assert.equal(third.instance.id, id);
    const all = (await aws.ec2.send(new DescribeInstancesCommand({ Filters: [{ Name: `tag:${TARGET_TAG}`, Values: [target] }] }))).Reservations?.flatMap((r) => r.Instances ?? []) ?? [];
    assert.equal(all.length, 1);
    // another target gets its own
    const other = await launch(aws.ec2, baseSpec(targetTag("prod", "web", "dr2")));
    assert.equal(other.created, true);
    assert.notEqual(other.instance.id, id);
    assert.deepEqual(
      (await findByTarget(aws.ec2, target)).map((i) => i.id),
      [id],
    );
    await terminate(aws.ec2, other.instance.id, { ...FAST, wait: true });
  });

  test("resize staging -> failover type ends running; no-op when already so; back to staging", async () => {
    const up = await resize(aws.ec2, id, "m5.xlarge", FAST);
    assert.deepEqual(up.actions, ["stop", "modify", "start"]);
    assert.equal(up.instance.type, "m5.xlarge");
    assert.equal(up.instance.state, "running");
    const d = await describeInstance(aws.ec2, id);
    assert.equal(d?.type, "m5.xlarge");
    assert.equal(d?.state, "running");

    const again = await resize(aws.ec2, id, "m5.xlarge", FAST);
    assert.deepEqual(again.actions, []);

    // a failover interrupted after the stop (say, no capacity at start) carries on from stopped
    await stop(aws.ec2, id, FAST);
    const back = await resize(aws.ec2, id, "t3.small", FAST);
    assert.deepEqual(back.actions, ["modify", "start"]);
    assert.equal(back.instance.type, "t3.small");
    assert.equal(back.instance.state, "running");
    assert.equal((await start(aws.ec2, id, FAST)).state, "running");
  });

  test("waits end at their deadline", async () => {
    const t0 = Date.now();
    // an instance that stays running never becomes stopped: a 300 ms wait fails, retryably, on time
    await assert.rejects(
      waitForState(aws.ec2, id, ["stopped"], { pollMs: 50, timeoutMs: 300 }),
      (e: unknown) => {
        const info = awsError(e);
        assert.equal(info.code, "Timeout");
        assert.equal(info.retryable, true);
        assert.match(info.message, /still running/);
        return true;
      },
    );
    assert.ok(Date.now() - t0 < 30_000, "the 300 ms timeout ended the wait (not the test's deadline)");
  });

  test("terminate, idempotently; a terminated instance is no longer the target's", async () => {
    const r = await terminate(aws.ec2, id, { ...FAST, wait: true });
    assert.equal(r.previousState, "running");
    assert.equal(r.state, "terminated");
    assert.equal((await describeInstance(aws.ec2, id))?.state ?? "terminated", "terminated");
    assert.deepEqual(await findByTarget(aws.ec2, target), []);
    await terminate(aws.ec2, id, FAST); // again: fine
    await terminate(aws.ec2, "i-0123456789abcdef0", FAST); // never existed: fine
    await assert.rejects(resize(aws.ec2, id, "m5.large", FAST), (e: unknown) => awsError(e).code === "InstanceTerminated");
    const unknown = "i-0123456789abcdef0";
    assert.equal(await describeInstance(aws.ec2, unknown), undefined);
    await assert.rejects(resize(aws.ec2, unknown, "m5.large", FAST), (e: unknown) => {
      assert.equal(awsError(e).message, `AWS InvalidInstanceID.NotFound: The instance ID '${unknown}' does not exist`);
      return true;
    });
    // a wait tolerates a not-yet-visible instance until its deadline, then says what it is
    await assert.rejects(waitForState(aws.ec2, unknown, ["running"], { pollMs: 50, timeoutMs: 200 }), (e: unknown) => awsError(e).code === "InvalidInstanceID.NotFound");
    // a new launch for the target (a fresh token) makes a new instance
    const fresh = await launch(aws.ec2, baseSpec(target, { clientToken: clientToken(target, "3") }));
    assert.equal(fresh.created, true);
    assert.notEqual(fresh.instance.id, id);
    await terminate(aws.ec2, fresh.instance.id, { ...FAST, wait: true });
  });
});

describe("AWS errors", () => {
  test("a bad AMI id: the AWS code and message, not retryable", async () => {
    const notFound = await launch(aws.ec2, baseSpec(targetTag("prod", "web", "bad-ami"), { ami: "ami-0000000000deadbee" })).then(
      () => assert.fail("launched with a missing AMI"),
      (e: unknown) => awsError(e),
    );
    assert.equal(notFound.code, "InvalidAMIID.NotFound");
    assert.equal(notFound.retryable, false);
    assert.equal(notFound.reason, "InvalidAMIID_NotFound");
    assert.equal(notFound.httpStatus, 400);
    assert.match(notFound.message, /^AWS InvalidAMIID\.NotFound: .*ami-0000000000deadbee/);

    const malformed = await launch(aws.ec2, baseSpec(targetTag("prod", "web", "bad-ami"), { ami: "not-an-ami" })).then(
      () => assert.fail("launched with a malformed AMI id"),
      (e: unknown) => awsError(e),
    );
    assert.equal(malformed.code, "InvalidAMIID.Malformed");
    assert.match(malformed.message, /^AWS InvalidAMIID\.Malformed: /);
    assert.deepEqual(await findByTarget(aws.ec2, targetTag("prod", "web", "bad-ami")), []);
  });

  test("RunInstances' own refusals: a missing key pair, a bad subnet", async () => {
    const key = await launch(aws.ec2, baseSpec(targetTag("prod", "web", "bad-key"), { keyName: "no-such-key" })).then(
      () => assert.fail("launched with a missing key pair"),
      (e: unknown) => awsError(e),
    );
    assert.equal(key.code, "InvalidKeyPair.NotFound");
    assert.equal(key.retryable, false);
    const subnet = await launch(aws.ec2, baseSpec(targetTag("prod", "web", "bad-subnet"), { subnetId: "subnet-00000000" })).then(
      () => assert.fail("launched in a missing subnet"),
      (e: unknown) => awsError(e),
    );
    assert.equal(subnet.code, "InvalidSubnetID.NotFound");
  });

  test("unknown credentials: AuthFailure from EC2, InvalidAccessKeyId from S3 (moto enforcing auth)", async () => {
    const strict = await startMoto({ env: { INITIAL_NO_AUTH_ACTION_COUNT: "0" } });
    const c = awsClients({ region: REGION, endpoint: strict.endpoint, credentials: { accessKeyId: "AKIANOSUCHKEY0000000", secretAccessKey: "x" }, maxAttempts: 1 });
    try {
      const e1 = await c.ec2.send(new DescribeImagesCommand({ ImageIds: [ami] })).then(
        () => assert.fail("accepted unknown credentials"),
        (e: unknown) => awsError(e),
      );
      assert.equal(e1.code, "AuthFailure");
      assert.equal(e1.retryable, false);
      assert.match(e1.message, /^AWS AuthFailure: /);
      const e2 = await ensureBucket(c.s3, "understudy-auth").then(
        () => assert.fail("accepted unknown credentials"),
        (e: unknown) => awsError(e),
      );
      assert.ok(["InvalidAccessKeyId", "AccessDenied"].includes(e2.code), e2.message);
      assert.equal(e2.retryable, false);
    } finally {
      c.destroy();
      await strict.stop();
    }
  });

  test("capacity and throttling codes are retryable, with a longer backoff; unauthorised is not", () => {
    const svc = (name: string, status = 400) =>
      new EC2ServiceException({ name, $fault: status >= 500 ? "server" : "client", message: `${name} happened`, $metadata: { httpStatusCode: status, requestId: "req-1" } });
    for (const code of ["InsufficientInstanceCapacity", "RequestLimitExceeded", "Throttling", "InternalError", "IncorrectInstanceState"]) {
      const info = awsError(svc(code));
      assert.equal(info.code, code);
      assert.equal(info.retryable, true, code);
      assert.equal(info.message, `AWS ${code}: ${code} happened`);
      assert.equal(info.requestId, "req-1");
    }
    for (const code of ["UnauthorizedOperation", "InvalidAMIID.NotFound", "InvalidParameterValue", "IdempotentParameterMismatch", "VcpuLimitExceeded"]) {
      assert.equal(awsError(svc(code)).retryable, false, code);
    }
    assert.equal(awsError(svc("SomethingNew", 503)).retryable, true, "5xx is retryable");
    assert.equal(awsError(svc("Server.InsufficientInstanceCapacity")).code, "InsufficientInstanceCapacity");
    assert.ok(isAwsCode(svc("UnauthorizedOperation"), "UnauthorizedOperation", "AuthFailure"));
    assert.equal(awsError(new Error("boom")).code, "Error");
    assert.equal(awsError(Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:1"), { code: "ECONNREFUSED" })).retryable, true);
    for (let a = 1; a <= 12; a++) {
      const plain = backoffMs(a);
      const capacity = backoffMs(a, { code: "InsufficientInstanceCapacity" });
      assert.ok(plain >= 500 && plain <= 300_000);
      assert.ok(capacity >= 2500 && capacity <= 300_000);
    }
    assert.ok(backoffMs(1) <= 1000 && backoffMs(30) >= 150_000);
  });

  test("a dead endpoint: NetworkError, retryable, and no hang", async () => {
    const dead = ec2Client({ region: REGION, endpoint: "http://127.0.0.1:9", credentials: CREDS, maxAttempts: 1, connectTimeoutMs: 2000 });
    try {
      const t0 = Date.now();
      const info = await describeInstance(dead, "i-0123456789abcdef0").then(
        () => assert.fail("reached a closed port"),
        (e: unknown) => awsError(e),
      );
      assert.equal(info.code, "NetworkError", info.message);
      assert.equal(info.retryable, true);
      assert.ok(Date.now() - t0 < 60_000, "a dead endpoint fails the call, it does not hang");
    } finally {
      dead.destroy();
    }
  });

  test("no static keys: the SDK's default chain (here, the environment) is used", async () => {
    const saved = { id: process.env.AWS_ACCESS_KEY_ID, secret: process.env.AWS_SECRET_ACCESS_KEY };
    process.env.AWS_ACCESS_KEY_ID = "AKIAFROMTHEENVIRON00";
    process.env.AWS_SECRET_ACCESS_KEY = "env-secret";
    const c = s3Client({ region: REGION, endpoint: moto.endpoint });
    try {
      const creds = await c.config.credentials();
      assert.equal(creds.accessKeyId, "AKIAFROMTHEENVIRON00");
      assert.deepEqual(await ensureBucket(c, "understudy-envcreds"), { bucket: "understudy-envcreds", created: true });
    } finally {
      c.destroy();
      if (saved.id === undefined) delete process.env.AWS_ACCESS_KEY_ID;
      else process.env.AWS_ACCESS_KEY_ID = saved.id;
      if (saved.secret === undefined) delete process.env.AWS_SECRET_ACCESS_KEY;
      else process.env.AWS_SECRET_ACCESS_KEY = saved.secret;
    }
  });

  test("bad configuration is refused before any call", async () => {
    const refused = async (spec: LaunchSpec, re: RegExp) =>
      assert.rejects(launch(aws.ec2, spec), (e: unknown) => {
        const info = awsError(e);
        assert.equal(info.code, "InvalidParameterValue");
        assert.match(info.message, re);
        return true;
      });
    const t = targetTag("prod", "web", "refused");
    await refused(baseSpec(t, { userData: "x".repeat(16 * 1024 + 1) }), /^AWS InvalidParameterValue: user data is 16385 bytes/);
    await refused(baseSpec(t, { region: "us-west-2" }), /spec is for us-west-2 but the client is for eu-west-1/);
    await refused(baseSpec(t, { clientToken: "x".repeat(65) }), /clientToken/);
    await refused(baseSpec(t, { dataVolumeGiB: 0 }), /dataVolumeGiB/);
    assert.deepEqual(await findByTarget(aws.ec2, t), []);
    assert.throws(() => ec2Client({ region: "" }), /region is required/);
    assert.throws(() => s3Client({ region: REGION, endpoint: "ftp://x" }), /must be http/);
    assert.throws(() => s3Client({ region: REGION, credentials: { accessKeyId: "a", secretAccessKey: "" } }), /both/);
  });
});

describe("bundle store", () => {
  const bucket = "understudy-bundles";
  const key = "bundles/understudy-0.1.0-linux-x64.tar.gz";
  let file: string;
  let content: Buffer;

  test("ensureBucket makes the bucket once, then finds it", async () => {
    assert.deepEqual(await ensureBucket(aws.s3, bucket), { bucket, created: true });
    assert.deepEqual(await ensureBucket(aws.s3, bucket), { bucket, created: false });
  });

  test("putBundle uploads once per content, with its sha256 as metadata", async () => {
    content = randomBytes(3 * 1024 * 1024 + 17);
    file = path.join(tmp, "bundle.tar.gz");
    await writeFile(file, content);
    const sha = createHash("sha256").update(content).digest("hex");

    const first = await putBundle(aws.s3, bucket, key, file);
    assert.equal(first.uploaded, true);
    assert.equal(first.sha256, sha);
    assert.equal(first.size, content.length);
    const head1 = await aws.s3.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
    assert.equal(head1.Metadata?.[SHA256_METADATA], sha);
    assert.equal(head1.ContentLength, content.length);

    const second = await putBundle(aws.s3, bucket, key, file);
    assert.equal(second.uploaded, false, "same content: not sent again");
    assert.equal(second.etag, first.etag);
    const head2 = await aws.s3.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
    assert.equal(head2.LastModified?.getTime(), head1.LastModified?.getTime());

    // new content under the same key: uploaded
    const v2 = Buffer.concat([content, Buffer.from("v2")]);
    const file2 = path.join(tmp, "bundle-v2.tar.gz");
    await writeFile(file2, v2);
    const third = await putBundle(aws.s3, bucket, key, file2);
    assert.equal(third.uploaded, true);
    assert.equal((await statObject(aws.s3, bucket, key))?.sha256, createHash("sha256").update(v2).digest("hex"));
    // and the original back again
    assert.equal((await putBundle(aws.s3, bucket, key, file)).uploaded, true);
    const body = await (await aws.s3.send(new GetObjectCommand({ Bucket: bucket, Key: key }))).Body?.transformToByteArray();
    assert.ok(body && Buffer.from(body).equals(content));
  });

  test("a presigned URL fetches the bytes with plain fetch() and no credentials", async () => {
    const url = await presignGet(aws.s3, bucket, key, 900);
    assert.ok(url.startsWith(`${moto.endpoint}/${bucket}/`), `path-style URL on the endpoint: ${url}`);
    assert.match(url, /X-Amz-Signature=/);
    assert.match(url, /X-Amz-Expires=900/);
    const res = await fetch(url);
    assert.equal(res.status, 200);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(content));
    await assert.rejects(presignGet(aws.s3, bucket, key, 8 * 24 * 3600), /ttl/);
  });

  test("deleteObject removes it, idempotently", async () => {
    await deleteObject(aws.s3, bucket, key);
    assert.equal(await statObject(aws.s3, bucket, key), undefined);
    const list = await aws.s3.send(new ListObjectsV2Command({ Bucket: bucket }));
    assert.equal(list.KeyCount ?? 0, 0);
    await deleteObject(aws.s3, bucket, key);
    await deleteObject(aws.s3, "understudy-no-such-bucket", key);
    assert.equal(await statObject(aws.s3, "understudy-no-such-bucket", key), undefined);
  });
});
