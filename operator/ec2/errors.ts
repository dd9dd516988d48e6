// AWS failures as a condition can show them: the AWS error code (InvalidAMIID.NotFound,
// UnauthorizedOperation, InsufficientInstanceCapacity, ...), a message that
// names it, and whether trying again later may succeed (capacity, throttling,
// AWS-side faults, the network) or a person must change something first.

export interface AwsErrorInfo {
  /** the AWS error code as AWS spells it, or NetworkError / Timeout / NoCredentials / Error */
  code: string;
  /** "AWS <code>: <what AWS said>" */
  message: string;
  /** a later attempt (with backoff) may succeed without anyone changing anything */
  retryable: boolean;
  /** the code as a Kubernetes condition reason ([A-Za-z0-9_,:], starting with a letter) */
  reason: string;
  httpStatus?: number;
  requestId?: string;
}

/**
 * An error of this package's own making (wait deadlines, bad input), shaped like an AWS
 * one; its message is the bare text (awsError adds "AWS <code>: ").
 */
export class Ec2Error extends Error {
  readonly code: string;
  readonly retryable: boolean;
  constructor(code: string, message: string, retryable: boolean) {
    super(message);
    this.name = code;
    this.code = code;
    this.retryable = retryable;
  }
}

/** capacity: AWS may have it a little later or in another attempt */
const CAPACITY = [
  "InsufficientInstanceCapacity",
  "InsufficientHostCapacity",
  "InsufficientCapacity",
  "InsufficientReservedInstanceCapacity",
  "InsufficientAddressCapacity",
  "InsufficientFreeAddressesInSubnet",
  "InsufficientCapacityOnHost",
];
const THROTTLING = [
  "RequestLimitExceeded",
  "Throttling",
  "ThrottlingException",
  "ThrottledException",
  "TooManyRequestsException",
  "RequestThrottled",
  "RequestThrottledException",
  "SlowDown",
  "BandwidthLimitExceeded",
  "EC2ThrottledException",
  "PriorRequestNotComplete",
  "TransactionInProgressException",
];
const TRANSIENT = [
  "InternalError",
  "InternalFailure",
  "InternalServerError",
  "ServiceUnavailable",
  "ServiceUnavailableException",
  "Unavailable",
  "RequestTimeout",
  "RequestTimeoutException",
  "RequestTimeTooSkewed",
  "IDPCommunicationError",
  // the instance is between states (stopping, pending): the same call works once it settles
  "IncorrectInstanceState",
  "IncorrectState",
  "ConcurrentTagAccess",
  "OperationAborted",
  // ours: a wait ran out of time, the operation goes on at AWS
  "Timeout",
  "NetworkError",
];
const RETRYABLE = new Set([...CAPACITY, ...THROTTLING, ...TRANSIENT]);

/** Node's socket-level error codes: the request may never have reached AWS */
const NETWORK_CODES = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "ENETUNREACH", "ECONNABORTED", "UND_ERR_SOCKET"]);

interface ErrorLike {
  name?: unknown;
  code?: unknown;
  Code?: unknown;
  message?: unknown;
  retryable?: unknown;
  $fault?: unknown;
  $retryable?: unknown;
  $metadata?: { httpStatusCode?: number; requestId?: string };
  cause?: unknown;
}

/** Strip EC2's "Client."/"Server." prefixes (state reasons carry them: Server.InsufficientInstanceCapacity). */
function bare(code: string): string {
  return code.replace(/^(Client|Server)\./, "");
}

function str(v: unknown): string | undefined {
  return typeof v === "string" && v !== "" ? v : undefined;
}

export function conditionReason(code: string): string {
  const r = code.replace(/[^A-Za-z0-9_,:]+/g, "_").replace(/^[^A-Za-z]+/, "").replace(/_+$/, "");
  return r || "AWSError";
}

export function awsError(e: unknown): AwsErrorInfo {
  const x = (typeof e === "object" && e !== null ? e : { message: String(e) }) as ErrorLike;
  const status = x.$metadata?.httpStatusCode;
  const requestId = x.$metadata?.requestId;
  const rawMessage = str(x.message) ?? "";
  const nodeCode = str(x.code);
  const isService = x.$fault === "client" || x.$fault === "server" || status !== undefined;

  let code: string;
  let retryable: boolean;
  if (e instanceof Ec2Error) {
    code = e.code;
    retryable = e.retryable;
  } else if (isService) {
    // the SDK names a service error after its AWS code; some protocols also keep Code
    code = bare(str(x.Code) ?? str(x.name) ?? "Unknown");
    if (code === "Unknown" || code === "UnknownError" || code === "Error") code = status ? `HTTP${status}` : "Unknown";
    retryable = RETRYABLE.has(code) || x.$fault === "server" || x.$retryable !== undefined || (status !== undefined && (status >= 500 || status === 429));
  } else if (x.name === "CredentialsProviderError" || /credential/i.test(String(x.name ?? ""))) {
    code = "NoCredentials";
    retryable = false;
  } else if (x.name === "TimeoutError" || nodeCode === "ETIMEDOUT" || x.name === "AbortError") {
    code = x.name === "AbortError" ? "Aborted" : "Timeout";
    retryable = x.name !== "AbortError";
  } else if ((nodeCode && NETWORK_CODES.has(nodeCode)) || x.name === "NetworkingError") {
    code = "NetworkError";
    retryable = true;
  } else {
    code = str(x.name) && x.name !== "Error" ? (x.name as string) : (nodeCode ?? "Error");
    retryable = RETRYABLE.has(code);
  }

  let text = (rawMessage.startsWith(`AWS ${code}: `) ? rawMessage.slice(`AWS ${code}: `.length) : rawMessage) || (status ? `HTTP ${status}` : "no message");
  if (code === "NetworkError" && nodeCode && !text.includes(nodeCode)) text = `${nodeCode}: ${text}`;
  // S3's bodiless errors (HEAD) come back as "UnknownError"
  if (text === "UnknownError" && status) text = `HTTP ${status}`;
  return {
    code,
    message: `AWS ${code}: ${text}`,
    retryable,
    reason: conditionReason(code),
    ...(status !== undefined ? { httpStatus: status } : {}),
    ...(requestId ? { requestId } : {}),
  };
}

/** Is `e` an AWS error with one of these codes (EC2's Client./Server. prefixes ignored)? */
export function isAwsCode(e: unknown, ...codes: string[]): boolean {
  return codes.includes(awsError(e).code);
}

/**
 * Delay before attempt `attempt` (1-based) of an operation that failed retryably:
 * exponential from `baseMs`, capped at `maxMs`, with equal jitter (half fixed, half random); throttling and
 * capacity start higher (AWS asks callers to slow down for those).
 */
export function backoffMs(attempt: number, info?: Pick<AwsErrorInfo, "code">, baseMs = 1000, maxMs = 5 * 60_000): number {
  const base = info && (CAPACITY.includes(info.code) || THROTTLING.includes(info.code)) ? Math.max(baseMs, 5000) : baseMs;
  const ceiling = Math.min(maxMs, base * 2 ** Math.max(0, Math.min(attempt - 1, 20)));
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
}
