// The EC2 instance of one DR target: launched once (a tag names the target, and
// RunInstances carries a client token, so neither an operator restart nor a lost
// reply makes a second one), described for status, resized between the small
// staging type and the failover type (stop, change type, start), terminated.
// Every wait polls DescribeInstances against a deadline and can be aborted.
import {
  DescribeImagesCommand,
  DescribeInstancesCommand,
  ModifyInstanceAttributeCommand,
  RunInstancesCommand,
  StartInstancesCommand,
  StopInstancesCommand,
  TerminateInstancesCommand,
  type BlockDeviceMapping,
  type EC2Client,
  type Filter,
  type Instance,
  type _InstanceType,
  type VolumeType,
} from "@aws-sdk/client-ec2";
import { createHash } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { awsError, Ec2Error } from "./errors.ts";

/** names the target an instance serves: <namespace>/<pair>/<target> */
export const TARGET_TAG = "understudy.dev/target";
export const MANAGED_BY_TAG = "understudy.dev/managed-by";
export const MANAGED_BY = "understudy-operator";
/** AWS's limit on raw (pre-base64) user data */
export const MAX_USER_DATA_BYTES = 16 * 1024;
const LIVE_STATES = ["pending", "running", "stopping", "stopped"];

export type InstanceState = "pending" | "running" | "stopping" | "stopped" | "shutting-down" | "terminated";

export interface LaunchSpec {
  /** the TARGET_TAG value, targetTag(namespace, pair, target) */
  target: string;
  /** idempotency token for RunInstances (<= 64 ASCII chars), e.g. clientToken(uid, attempt) */
  clientToken: string;
  /** must match the client's region (kept here for messages and checks) */
  region?: string;
  ami: string;
  instanceType: string;
  subnetId?: string;
  securityGroupIds?: string[];
  keyName?: string;
  /** instance profile name, or its ARN (arn:aws:iam::...) */
  iamInstanceProfile?: string;
  /** size of the root volume (default: the AMI's) */
  rootVolumeGiB?: number;
  /** an extra volume for the replicas (none if absent) */
  dataVolumeGiB?: number;
  /** device name of the data volume (default /dev/sdf; appears as nvme1n1 on Nitro) */
  dataDeviceName?: string;
  /** EBS type of both volumes (default gp3) */
  volumeType?: string;
  /** encrypt both volumes (default: the account's EBS default) */
  encryptVolumes?: boolean;
  /** put on the instance and its volumes; Name defaults to understudy-<target with / as -> */
  tags?: Record<string, string>;
  /** plain text (a cloud-init script); base64-encoded here; at most 16 KiB */
  userData?: string;
}

export interface InstanceInfo {
  id: string;
  state: InstanceState | string;
  type: string;
  imageId?: string;
  subnetId?: string;
  vpcId?: string;
  privateIp?: string;
  publicIp?: string;
  privateDns?: string;
  publicDns?: string;
  launchTime?: Date;
  tags: Record<string, string>;
  /** why it is in its state (e.g. Server.InsufficientInstanceCapacity after a failed start) */
  stateReason?: { code: string; message: string };
  iamInstanceProfileArn?: string;
  /** device name -> EBS volume id */
  volumes: Record<string, string>;
}

export interface LaunchResult {
  instance: InstanceInfo;
  /** false: an instance for this target existed (found by its tag), nothing was launched */
  created: boolean;
  /** other live instances carrying the same target tag (should never happen; the caller may terminate them) */
  duplicates: string[];
}

export interface WaitOptions {
  /** deadline for the whole operation, ms (default 15 min: a real stop or start can take minutes) */
  timeoutMs?: number;
  /** DescribeInstances interval while waiting, ms (default 5 s) */
  pollMs?: number;
  signal?: AbortSignal;
}

export function targetTag(namespace: string, pair: string, target: string): string {
  return `${namespace}/${pair}/${target}`;
}

/** A RunInstances client token (64 hex chars) from stable parts, e.g. the target's uid and a launch attempt number. */
export function clientToken(...parts: string[]): string {
  return createHash("sha256").update(parts.join("\0")).digest("hex");
}

function toInfo(i: Instance): InstanceInfo {
  const tags: Record<string, string> = {};
  for (const t of i.Tags ?? []) if (t.Key !== undefined) tags[t.Key] = t.Value ?? "";
  const volumes: Record<string, string> = {};
  for (const b of i.BlockDeviceMappings ?? []) if (b.DeviceName && b.Ebs?.VolumeId) volumes[b.DeviceName] = b.Ebs.VolumeId;
  return {
    id: i.InstanceId ?? "",
    state: i.State?.Name ?? "unknown",
    type: i.InstanceType ?? "",
    ...(i.ImageId ? { imageId: i.ImageId } : {}),
    ...(i.SubnetId ? { subnetId: i.SubnetId } : {}),
    ...(i.VpcId ? { vpcId: i.VpcId } : {}),
    ...(i.PrivateIpAddress ? { privateIp: i.PrivateIpAddress } : {}),
    ...(i.PublicIpAddress ? { publicIp: i.PublicIpAddress } : {}),
    ...(i.PrivateDnsName ? { privateDns: i.PrivateDnsName } : {}),
    ...(i.PublicDnsName ? { publicDns: i.PublicDnsName } : {}),
    ...(i.LaunchTime ? { launchTime: i.LaunchTime } : {}),
    tags,
    ...(i.StateReason?.Code ? { stateReason: { code: i.StateReason.Code, message: i.StateReason.Message ?? "" } } : {}),
    ...(i.IamInstanceProfile?.Arn ? { iamInstanceProfileArn: i.IamInstanceProfile.Arn } : {}),
    volumes,
  };
}

async function describeAll(ec2: EC2Client, input: { InstanceIds?: string[]; Filters?: Filter[] }): Promise<Instance[]> {
  const out: Instance[] = [];
  let NextToken: string | undefined;
  do {
    const r = await ec2.send(new DescribeInstancesCommand({ ...input, ...(NextToken ? { NextToken } : {}) }));
    for (const res of r.Reservations ?? []) out.push(...(res.Instances ?? []));
    NextToken = r.NextToken;
  } while (NextToken);
  return out;
}

/** The instance, or undefined when EC2 does not know it (never launched, long terminated, or not yet visible). */
export async function describe(ec2: EC2Client, id: string): Promise<InstanceInfo | undefined> {
  try {
    const found = await describeAll(ec2, { InstanceIds: [id] });
    const i = found.find((x) => x.InstanceId === id);
    return i ? toInfo(i) : undefined;
  } catch (e) {
    if (awsError(e).code === "InvalidInstanceID.NotFound") return undefined;
    throw e;
  }
}

/** Live (not shutting-down or terminated) instances tagged for `target`, oldest first. */
export async function findByTarget(ec2: EC2Client, target: string): Promise<InstanceInfo[]> {
  const found = await describeAll(ec2, {
    Filters: [
      { Name: `tag:${TARGET_TAG}`, Values: [target] },
      { Name: "instance-state-name", Values: LIVE_STATES },
    ],
  });
  return found
    .map(toInfo)
    .filter((i) => LIVE_STATES.includes(i.state))
    .sort((a, b) => (a.launchTime?.getTime() ?? 0) - (b.launchTime?.getTime() ?? 0) || a.id.localeCompare(b.id));
}

function checkSpec(spec: LaunchSpec): void {
  const bad = (m: string) => new Ec2Error("InvalidParameterValue", m, false);
  if (!spec.target) throw bad("target is required");
  if (!spec.ami) throw bad("ami is required");
  if (!spec.instanceType) throw bad("instanceType is required");
  if (!/^[\x20-\x7e]{1,64}$/.test(spec.clientToken ?? "")) throw bad("clientToken must be 1-64 printable ASCII characters");
  for (const [k, v] of [
    ["rootVolumeGiB", spec.rootVolumeGiB],
    ["dataVolumeGiB", spec.dataVolumeGiB],
  ] as const) {
    if (v !== undefined && (!Number.isInteger(v) || v < 1 || v > 65536)) throw bad(`${k} must be a whole number of GiB, 1-65536, not ${v}`);
  }
  const ud = Buffer.byteLength(spec.userData ?? "");
  if (ud > MAX_USER_DATA_BYTES) throw bad(`user data is ${ud} bytes; EC2 takes at most ${MAX_USER_DATA_BYTES}`);
  if (spec.tags?.[TARGET_TAG] !== undefined && spec.tags[TARGET_TAG] !== spec.target) throw bad(`tag ${TARGET_TAG} is set from target`);
}

/** The AMI's root device name (needed to size the root volume); a missing AMI fails as EC2 would. */
async function rootDeviceOf(ec2: EC2Client, ami: string): Promise<string> {
  const r = await ec2.send(new DescribeImagesCommand({ ImageIds: [ami] }));
  const img = (r.Images ?? []).find((i) => i.ImageId === ami);
  if (!img) throw new Ec2Error("InvalidAMIID.NotFound", `The image id '[${ami}]' does not exist`, false);
  if (img.State && img.State !== "available") throw new Ec2Error("InvalidAMIID.Unavailable", `image ${ami} is ${img.State}`, false);
  return img.RootDeviceName ?? "/dev/xvda";
}

/**
 * The instance for spec.target: the one that exists (found by TARGET_TAG; the oldest
 * if, against all precautions, there are several), or a new one. RunInstances gets
 * spec.clientToken, so a retry after a lost reply returns the first launch's instance
 * at AWS even before the tag is visible to DescribeInstances.
 */
export async function launch(ec2: EC2Client, spec: LaunchSpec): Promise<LaunchResult> {
  checkSpec(spec);
  if (spec.region) {
    const region = await ec2.config.region();
    if (region !== spec.region) throw new Ec2Error("InvalidParameterValue", `spec is for ${spec.region} but the client is for ${region}`, false);
  }
  const existing = await findByTarget(ec2, spec.target);
  if (existing.length > 0) {
    const [first, ...rest] = existing as [InstanceInfo, ...InstanceInfo[]];
    return { instance: first, created: false, duplicates: rest.map((i) => i.id) };
  }

  const rootDevice = await rootDeviceOf(ec2, spec.ami);
  const volumeType = (spec.volumeType ?? "gp3") as VolumeType;
  const ebs = (size: number) => ({
    VolumeSize: size,
    VolumeType: volumeType,
    DeleteOnTermination: true,
    ...(spec.encryptVolumes !== undefined ? { Encrypted: spec.encryptVolumes } : {}),
  });
  const mappings: BlockDeviceMapping[] = [];
  if (spec.rootVolumeGiB !== undefined) mappings.push({ DeviceName: rootDevice, Ebs: ebs(spec.rootVolumeGiB) });
  if (spec.dataVolumeGiB !== undefined) mappings.push({ DeviceName: spec.dataDeviceName ?? "/dev/sdf", Ebs: ebs(spec.dataVolumeGiB) });

  const tags: Record<string, string> = {
    Name: `understudy-${spec.target.replaceAll("/", "-")}`,
    ...spec.tags,
    [TARGET_TAG]: spec.target,
    [MANAGED_BY_TAG]: MANAGED_BY,
  };
  const Tags = Object.entries(tags).map(([Key, Value]) => ({ Key, Value }));
  const profile = spec.iamInstanceProfile;

  const r = await ec2.send(
    new RunInstancesCommand({
      ImageId: spec.ami,
      InstanceType: spec.instanceType as _InstanceType,
      MinCount: 1,
      MaxCount: 1,
      ClientToken: spec.clientToken,
      ...(spec.subnetId ? { SubnetId: spec.subnetId } : {}),
      ...(spec.securityGroupIds?.length ? { SecurityGroupIds: spec.securityGroupIds } : {}),
      ...(spec.keyName ? { KeyName: spec.keyName } : {}),
      ...(profile ? { IamInstanceProfile: profile.startsWith("arn:") ? { Arn: profile } : { Name: profile } } : {}),
      ...(spec.userData ? { UserData: Buffer.from(spec.userData).toString("base64") } : {}),
      ...(mappings.length ? { BlockDeviceMappings: mappings } : {}),
      // IMDSv2 only: the instance's metadata (and role credentials) need a session token
      MetadataOptions: { HttpTokens: "required", HttpEndpoint: "enabled" },
      // a shutdown from inside keeps the replicas (the operator decides about termination)
      InstanceInitiatedShutdownBehavior: "stop",
      TagSpecifications: [
        { ResourceType: "instance", Tags },
        { ResourceType: "volume", Tags },
      ],
    }),
  );
  const inst = r.Instances?.[0];
  if (!inst?.InstanceId) throw new Ec2Error("InternalError", "RunInstances returned no instance", true);
  const info = toInfo(inst);
  // AWS answers a reused token with the instance it launched for it, even a terminated one
  if (info.state === "terminated" || info.state === "shutting-down") {
    throw new Ec2Error("ClientTokenUsed", `client token ${spec.clientToken} belongs to instance ${info.id}, which is ${info.state}: launch with a new token (a new attempt number)`, false);
  }
  // created is also true when AWS recognised the token of an earlier, lost-reply launch (it is the same instance)
  return { instance: info, created: true, duplicates: [] };
}

function deadlineOf(o: WaitOptions): number {
  return Date.now() + (o.timeoutMs ?? 15 * 60_000);
}

/**
 * Poll until the instance is in one of `states`; fails on the deadline (retryable:
 * the transition goes on at AWS), when it is terminated instead, or on abort. An
 * instance EC2 does not know yet (just launched: DescribeInstances is eventually
 * consistent) is polled for until the deadline.
 */
export async function waitForState(ec2: EC2Client, id: string, states: InstanceState[], o: WaitOptions & { deadline?: number } = {}): Promise<InstanceInfo> {
  const deadline = o.deadline ?? deadlineOf(o);
  const pollMs = o.pollMs ?? 5000;
  for (;;) {
    o.signal?.throwIfAborted();
    const info = await describe(ec2, id);
    if (info && states.includes(info.state as InstanceState)) return info;
    if (info && (info.state === "terminated" || info.state === "shutting-down")) {
      throw new Ec2Error("InstanceTerminated", `instance ${id} is ${info.state} (waited for ${states.join("/")})`, false);
    }
    const left = deadline - Date.now();
    if (left <= 0) {
      // unknown until the end: not eventual consistency after a launch, but a wrong or long-purged id
      if (!info) throw new Ec2Error("InvalidInstanceID.NotFound", `The instance ID '${id}' does not exist`, false);
      const why = info.stateReason ? ` (${info.stateReason.code}: ${info.stateReason.message})` : "";
      throw new Ec2Error("Timeout", `instance ${id} still ${info.state}${why}, waited for ${states.join("/")}`, true);
    }
    await sleep(Math.min(pollMs, left), undefined, o.signal ? { signal: o.signal } : {});
  }
}

async function settle(ec2: EC2Client, id: string, o: WaitOptions & { deadline: number }): Promise<InstanceInfo> {
  const info = await describe(ec2, id);
  if (!info) throw new Ec2Error("InvalidInstanceID.NotFound", `The instance ID '${id}' does not exist`, false);
  if (info.state === "terminated" || info.state === "shutting-down") throw new Ec2Error("InstanceTerminated", `instance ${id} is ${info.state}`, false);
  if (info.state === "pending") return waitForState(ec2, id, ["running", "stopped"], o);
  if (info.state === "stopping") return waitForState(ec2, id, ["stopped"], o);
  return info;
}

/** Stop it and wait until stopped (no-op when stopped). */
export async function stop(ec2: EC2Client, id: string, o: WaitOptions = {}): Promise<InstanceInfo> {
  const w = { ...o, deadline: deadlineOf(o) };
  const info = await settle(ec2, id, w);
  if (info.state === "stopped") return info;
  await ec2.send(new StopInstancesCommand({ InstanceIds: [id] }));
  return waitForState(ec2, id, ["stopped"], w);
}

/** Start it and wait until running (no-op when running). */
export async function start(ec2: EC2Client, id: string, o: WaitOptions = {}): Promise<InstanceInfo> {
  const w = { ...o, deadline: deadlineOf(o) };
  const info = await settle(ec2, id, w);
  if (info.state === "running") return info;
  await ec2.send(new StartInstancesCommand({ InstanceIds: [id] }));
  return waitForState(ec2, id, ["running"], w);
}

export interface ResizeResult {
  instance: InstanceInfo;
  /** what was done, in order: "stop", "modify", "start"; empty for a no-op */
  actions: ("stop" | "modify" | "start")[];
}

/**
 * Make the instance `type` and running: stop (waiting until stopped), change
 * the type, start (waiting until running). No-op when it already is that type
 * and running. Safe to call again after any failure (capacity at start, a
 * deadline, a restart): it carries on from the state it finds.
 */
export async function resize(ec2: EC2Client, id: string, type: string, o: WaitOptions = {}): Promise<ResizeResult> {
  const w = { ...o, deadline: deadlineOf(o) };
  const actions: ResizeResult["actions"] = [];
  let info = await settle(ec2, id, w);
  if (info.type === type && info.state === "running") return { instance: info, actions };
  if (info.type !== type) {
    if (info.state === "running") {
      await ec2.send(new StopInstancesCommand({ InstanceIds: [id] }));
      actions.push("stop");
      info = await waitForState(ec2, id, ["stopped"], w);
    }
    await ec2.send(new ModifyInstanceAttributeCommand({ InstanceId: id, InstanceType: { Value: type } }));
    actions.push("modify");
  }
  await ec2.send(new StartInstancesCommand({ InstanceIds: [id] }));
  actions.push("start");
  info = await waitForState(ec2, id, ["running"], w);
  if (info.type !== type) throw new Ec2Error("IncorrectInstanceState", `instance ${id} started as ${info.type}, not ${type}`, true);
  return { instance: info, actions };
}

export interface TerminateResult {
  /** the state before, or undefined when EC2 did not know the instance */
  previousState?: string;
  /** the state at return ("terminated" when waited for) */
  state?: string;
}

/** Terminate it (its DeleteOnTermination volumes go too); idempotent; with wait, until terminated or gone. */
export async function terminate(ec2: EC2Client, id: string, o: WaitOptions & { wait?: boolean } = {}): Promise<TerminateResult> {
  let previousState: string | undefined;
  let state: string | undefined;
  try {
    const r = await ec2.send(new TerminateInstancesCommand({ InstanceIds: [id] }));
    const c = r.TerminatingInstances?.find((t) => t.InstanceId === id);
    previousState = c?.PreviousState?.Name;
    state = c?.CurrentState?.Name;
  } catch (e) {
    if (awsError(e).code === "InvalidInstanceID.NotFound") return {};
    throw e;
  }
  if (!o.wait) return { ...(previousState ? { previousState } : {}), ...(state ? { state } : {}) };
  const deadline = deadlineOf(o);
  for (;;) {
    o.signal?.throwIfAborted();
    const info = await describe(ec2, id);
    if (!info || info.state === "terminated") return { ...(previousState ? { previousState } : {}), state: "terminated" };
    const left = deadline - Date.now();
    if (left <= 0) throw new Ec2Error("Timeout", `instance ${id} still ${info.state}, waited for terminated`, true);
    await sleep(Math.min(o.pollMs ?? 5000, left), undefined, o.signal ? { signal: o.signal } : {});
  }
}
