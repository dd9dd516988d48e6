// AWS SDK clients for an ec2 target endpoint: a region, optionally an endpoint
// override (an S3/EC2-compatible service, or moto in tests) and optionally an
// access key pair (from a Secret); without one the SDK's default credential
// chain is used (environment, shared config/SSO, web identity/IRSA, ECS, IMDS).
//
// Every call has connection and idle timeouts, so nothing waits forever on a
// dead peer, and the SDK's standard retry mode retries throttling, 5xx and
// transient network errors with exponential backoff and jitter.
import { EC2Client } from "@aws-sdk/client-ec2";
import { S3Client } from "@aws-sdk/client-s3";

export interface AwsCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  /** for temporary credentials (STS) */
  sessionToken?: string;
}

export interface AwsConfig {
  region: string;
  /** override for both services, e.g. http://10.0.0.1:5000 (an S3/EC2-compatible service) */
  endpoint?: string;
  /** override for EC2 alone (default: endpoint) */
  ec2Endpoint?: string;
  /** override for S3 alone (default: endpoint); an overridden S3 is addressed path-style */
  s3Endpoint?: string;
  /** a static key pair; absent: the SDK's default credential chain */
  credentials?: AwsCredentials;
  /** attempts per call, the first included (default 4) */
  maxAttempts?: number;
  /** TCP/TLS connect timeout, ms (default 10 s) */
  connectTimeoutMs?: number;
  /** a socket idle this long fails the call, ms (default 60 s) */
  idleTimeoutMs?: number;
  /** EC2 calls (small requests and replies) fail after this long in all, ms (default 60 s) */
  ec2RequestTimeoutMs?: number;
}

export interface AwsClients {
  ec2: EC2Client;
  s3: S3Client;
  /** close both clients' sockets */
  destroy(): void;
}

const DEFAULT_MAX_ATTEMPTS = 4;

function check(cfg: AwsConfig): void {
  if (!cfg.region) throw new Error("aws: region is required");
  for (const [k, v] of [
    ["endpoint", cfg.endpoint],
    ["ec2Endpoint", cfg.ec2Endpoint],
    ["s3Endpoint", cfg.s3Endpoint],
  ] as const) {
    if (v === undefined) continue;
    let u: URL;
    try {
      u = new URL(v);
    } catch {
      throw new Error(`aws: ${k} ${JSON.stringify(v)} is not a URL`);
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") throw new Error(`aws: ${k} ${JSON.stringify(v)} must be http(s)`);
  }
  const c = cfg.credentials;
  if (c && (!c.accessKeyId || !c.secretAccessKey)) throw new Error("aws: credentials need both accessKeyId and secretAccessKey");
}

function common(cfg: AwsConfig) {
  const c = cfg.credentials;
  return {
    region: cfg.region,
    maxAttempts: cfg.maxAttempts ?? DEFAULT_MAX_ATTEMPTS,
    retryMode: "standard",
    // undefined: the client resolves the default provider chain itself
    credentials: c ? { accessKeyId: c.accessKeyId, secretAccessKey: c.secretAccessKey, ...(c.sessionToken ? { sessionToken: c.sessionToken } : {}) } : undefined,
  };
}

export function ec2Client(cfg: AwsConfig): EC2Client {
  check(cfg);
  const endpoint = cfg.ec2Endpoint ?? cfg.endpoint;
  return new EC2Client({
    ...common(cfg),
    ...(endpoint ? { endpoint } : {}),
    requestHandler: {
      connectionTimeout: cfg.connectTimeoutMs ?? 10_000,
      socketTimeout: cfg.idleTimeoutMs ?? 60_000,
      requestTimeout: cfg.ec2RequestTimeoutMs ?? 60_000,
      throwOnRequestTimeout: true,
    },
  });
}

export function s3Client(cfg: AwsConfig): S3Client {
  check(cfg);
  const endpoint = cfg.s3Endpoint ?? cfg.endpoint;
  return new S3Client({
    ...common(cfg),
    ...(endpoint
      ? {
          endpoint,
          // compatible services rarely have virtual-host DNS for buckets
          forcePathStyle: true,
          // nor all of S3's newer default checksums (CRC32 trailers on every upload)
          requestChecksumCalculation: "WHEN_REQUIRED" as const,
          responseChecksumValidation: "WHEN_REQUIRED" as const,
        }
      : {}),
    // no total request timeout: a bundle upload may take long on a slow link; an idle socket fails
    requestHandler: {
      connectionTimeout: cfg.connectTimeoutMs ?? 10_000,
      socketTimeout: cfg.idleTimeoutMs ?? 60_000,
    },
  });
}

export function awsClients(cfg: AwsConfig): AwsClients {
  const ec2 = ec2Client(cfg);
  const s3 = s3Client(cfg);
  return {
    ec2,
    s3,
    destroy() {
      ec2.destroy();
      s3.destroy();
    },
  };
}
