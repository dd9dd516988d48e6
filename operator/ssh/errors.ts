// Failures of SSH provisioning as a person (or a condition message) can act on:
// each names the host, port and user, says what went wrong and, where there is
// one, what to do about it. Private keys and file contents never appear here.

/** What kind of failure; stable, for conditions and metrics. */
export type SshErrorCode =
  | "HostKey" // the host's key is not in known_hosts (or known_hosts is empty, or the key is revoked)
  | "Auth" // the server refused the client key
  | "Connect" // refused, unreachable, DNS, reset, handshake failure
  | "Timeout" // no answer in time (connect, handshake, or the whole operation)
  | "Sudo" // the user is not root and sudo -n cannot make it so
  | "Install" // install.sh (or another remote step) failed
  | "Agent" // the agent did not start, or did not stop
  | "Invalid"; // bad options (nothing was attempted)

export class SshError extends Error {
  readonly code: SshErrorCode;
  /** a later attempt may succeed without anyone changing anything (network trouble) */
  readonly retryable: boolean;
  constructor(code: SshErrorCode, message: string, retryable = false, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "SshError";
    this.code = code;
    this.retryable = retryable;
  }
}

/** The host's key did not match known_hosts: nothing was sent to the host (not even the user's key). */
export class HostKeyError extends SshError {
  readonly host: string;
  readonly port: number;
  /** what the host offered, when it got that far */
  readonly keyType?: string;
  /** SHA256:<base64 without padding>, as `ssh-keygen -lf` prints it */
  readonly fingerprint?: string;
  constructor(message: string, o: { host: string; port: number; keyType?: string; fingerprint?: string }) {
    super("HostKey", message);
    this.name = "HostKeyError";
    this.host = o.host;
    this.port = o.port;
    if (o.keyType !== undefined) this.keyType = o.keyType;
    if (o.fingerprint !== undefined) this.fingerprint = o.fingerprint;
  }
}

export class SshAuthError extends SshError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("Auth", message, false, options);
    this.name = "SshAuthError";
  }
}

export class SudoError extends SshError {
  constructor(message: string) {
    super("Sudo", message);
    this.name = "SudoError";
  }
}

/** A remote step exited non-zero; stderrTail is the end of what it wrote to stderr. */
export class RemoteCommandError extends SshError {
  readonly step: string;
  readonly exitCode: number | null;
  readonly stderrTail: string;
  constructor(code: SshErrorCode, step: string, exitCode: number | null, stderrTail: string, message: string) {
    super(code, message);
    this.name = "RemoteCommandError";
    this.step = step;
    this.exitCode = exitCode;
    this.stderrTail = stderrTail;
  }
}

/** The last `lines` lines (and at most `chars` characters) of a command's output, for error messages. */
export function tail(text: string, lines = 15, chars = 2000): string {
  const t = text.trimEnd().split("\n").slice(-lines).join("\n");
  return t.length > chars ? `…${t.slice(-chars)}` : t;
}
