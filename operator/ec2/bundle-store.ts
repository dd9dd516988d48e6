// The agent bundle in S3 for instances to fetch: a bucket made when missing, the
// bundle uploaded once per content (its sha256 is kept as object metadata, so a
// restarted operator does not upload it again), a presigned GET URL for the
// instance's user-data (the instance needs no AWS credentials of its own), and
// removal of what was uploaded.
import {
  CreateBucketCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  PutObjectCommand,
  type BucketLocationConstraint,
  type S3Client,
} from "@aws-sdk/client-s3";
import { getSignedUrl } from "@aws-sdk/s3-request-presigner";
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import { awsError, Ec2Error } from "./errors.ts";

/** object metadata key (x-amz-meta-sha256) holding the hex sha256 of the content */
export const SHA256_METADATA = "sha256";
/** SigV4 presigned URLs live at most 7 days */
export const MAX_PRESIGN_SECONDS = 7 * 24 * 3600;

export interface EnsureBucketResult {
  bucket: string;
  /** false: it was there already (ours) */
  created: boolean;
}

/**
 * Make `bucket` unless it exists and is ours; idempotent. A bucket of that name owned
 * by someone else (or one we may not see) is an error: S3 bucket names are global.
 */
export async function ensureBucket(s3: S3Client, bucket: string): Promise<EnsureBucketResult> {
  try {
    await s3.send(new HeadBucketCommand({ Bucket: bucket }));
    return { bucket, created: false };
  } catch (e) {
    const info = awsError(e);
    if (info.httpStatus === 403) {
      throw new Ec2Error("AccessDenied", `bucket ${bucket} exists but is not accessible with these credentials (owned by another account, or s3:ListBucket is not allowed)`, false);
    }
    if (info.httpStatus !== 404 && info.code !== "NotFound" && info.code !== "NoSuchBucket") throw e;
  }
  const region = await s3.config.region();
  try {
    await s3.send(
      new CreateBucketCommand({
        Bucket: bucket,
        // us-east-1 is the one region that must not be named
        ...(region && region !== "us-east-1" ? { CreateBucketConfiguration: { LocationConstraint: region as BucketLocationConstraint } } : {}),
      }),
    );
    return { bucket, created: true };
  } catch (e) {
    // a concurrent ensureBucket (or an earlier attempt whose reply was lost) made it
    if (awsError(e).code === "BucketAlreadyOwnedByYou") return { bucket, created: false };
    throw e;
  }
}

export interface StoredObject {
  size: number;
  /** hex sha256 from the metadata, if the object has it */
  sha256?: string;
  etag?: string;
  lastModified?: Date;
}

/** The object's size and recorded sha256, or undefined when there is no such object (or bucket). */
export async function statObject(s3: S3Client, bucket: string, key: string): Promise<StoredObject | undefined> {
  try {
    const h = await s3.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
    return {
      size: h.ContentLength ?? 0,
      ...(h.Metadata?.[SHA256_METADATA] ? { sha256: h.Metadata[SHA256_METADATA] } : {}),
      ...(h.ETag ? { etag: h.ETag } : {}),
      ...(h.LastModified ? { lastModified: h.LastModified } : {}),
    };
  } catch (e) {
    const info = awsError(e);
    if (info.httpStatus === 404 || info.code === "NotFound" || info.code === "NoSuchKey" || info.code === "NoSuchBucket") return undefined;
    throw e;
  }
}

export interface PutBundleResult {
  /** false: an object with the same sha256 and size was there, nothing was sent */
  uploaded: boolean;
  sha256: string;
  size: number;
  etag?: string;
}

async function digest(file: string): Promise<{ sha256: string; md5: string; size: number }> {
  const sha = createHash("sha256");
  const md5 = createHash("md5");
  let size = 0;
  for await (const chunk of createReadStream(file)) {
    const b = chunk as Buffer;
    sha.update(b);
    md5.update(b);
    size += b.length;
  }
  return { sha256: sha.digest("hex"), md5: md5.digest("base64"), size };
}

/**
 * Upload `file` as `key` unless the object there already has the same sha256 and
 * size. The upload carries Content-MD5, so S3 rejects bytes damaged on the way.
 * The file must not change while this runs (bundles are immutable build outputs).
 */
export async function putBundle(s3: S3Client, bucket: string, key: string, file: string, opts: { contentType?: string } = {}): Promise<PutBundleResult> {
  const d = await digest(file);
  const existing = await statObject(s3, bucket, key);
  if (existing && existing.sha256 === d.sha256 && existing.size === d.size) {
    return { uploaded: false, sha256: d.sha256, size: d.size, ...(existing.etag ? { etag: existing.etag } : {}) };
  }
  const st = await stat(file);
  if (st.size !== d.size) throw new Ec2Error("BundleChanged", `${file} changed while it was being uploaded`, true);
  const out = await s3.send(
    new PutObjectCommand({
      Bucket: bucket,
      Key: key,
      Body: createReadStream(file),
      ContentLength: d.size,
      ContentMD5: d.md5,
      ContentType: opts.contentType ?? "application/gzip",
      Metadata: { [SHA256_METADATA]: d.sha256 },
    }),
  );
  return { uploaded: true, sha256: d.sha256, size: d.size, ...(out.ETag ? { etag: out.ETag } : {}) };
}

/**
 * A URL that GETs the object with no credentials until it expires (SigV4, at most
 * 7 days; with temporary credentials it dies with them, whichever is first).
 */
export async function presignGet(s3: S3Client, bucket: string, key: string, ttlSeconds: number): Promise<string> {
  if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > MAX_PRESIGN_SECONDS) {
    throw new Ec2Error("InvalidParameterValue", `presign ttl must be 1..${MAX_PRESIGN_SECONDS} seconds, not ${ttlSeconds}`, false);
  }
  return getSignedUrl(s3, new GetObjectCommand({ Bucket: bucket, Key: key }), { expiresIn: ttlSeconds });
}

/** Remove the object; idempotent (a missing object or bucket is fine). */
export async function deleteObject(s3: S3Client, bucket: string, key: string): Promise<void> {
  try {
    await s3.send(new DeleteObjectCommand({ Bucket: bucket, Key: key }));
  } catch (e) {
    if (awsError(e).code === "NoSuchBucket") return;
    throw e;
  }
}
