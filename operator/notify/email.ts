// Email channel: SMTP through nodemailer, with STARTTLS (required, not
// opportunistic) or implicit TLS, AUTH from a Secret, and recipients per pair
// or per server.
import nodemailer from "nodemailer";
import type { NotificationEvent } from "../api/v1alpha1/index.ts";
import { DeliveryError, stateWord, textOf, within, type Sender } from "./channel.ts";
import { recipientsFor } from "./derive.ts";

export interface EmailConfig {
  host: string;
  port?: number;
  security: "starttls" | "tls" | "none";
  ca?: string;
  auth?: { user: string; pass: string };
  from: string;
  to?: string[];
  recipients?: { to: string[]; pairs?: string[]; servers?: string[] }[];
}

/** nodemailer's error codes → condition reasons a person can act on. */
export function smtpError(e: unknown, where: string): DeliveryError {
  if (e instanceof DeliveryError) return e;
  const err = e as { code?: string; responseCode?: number; response?: string; message?: string };
  const msg = (err.response ?? err.message ?? String(e)).replace(/\s+/g, " ").slice(0, 300);
  const code = err.code ?? "";
  if (code === "EAUTH") return new DeliveryError("SMTPAuthFailed", `SMTP server ${where} refused the login (wrong username or password?): ${msg}`);
  if (code === "ENOAUTH") return new DeliveryError("SMTPAuthFailed", `SMTP server ${where} wants AUTH but the channel has no authSecretRef: ${msg}`);
  if (code === "ETLS" || /certificate|SSL|TLS/i.test(msg)) return new DeliveryError("SMTPTLSFailed", `TLS with SMTP server ${where} failed: ${msg}`);
  if (["ECONNECTION", "ETIMEDOUT", "ESOCKET", "EDNS", "ECONNREFUSED", "EHOSTUNREACH", "ENOTFOUND"].includes(code) || /ECONNREFUSED|ENOTFOUND|EHOSTUNREACH|timeout/i.test(msg)) return new DeliveryError("SMTPUnreachable", `cannot reach SMTP server ${where}: ${msg}`);
  if (code === "EENVELOPE") return new DeliveryError("SMTPRecipientsRefused", `SMTP server ${where} refused the sender or recipients: ${msg}`);
  return new DeliveryError("SMTPFailed", `SMTP server ${where}: ${msg}`);
}

export class EmailSender implements Sender {
  private readonly c: EmailConfig;
  private readonly where: string;
  constructor(c: EmailConfig) {
    this.c = c;
    this.where = `${c.host}:${this.port}`;
  }

  private get port(): number {
    return this.c.port ?? (this.c.security === "tls" ? 465 : 587);
  }

  private transport(timeoutMs: number) {
    return nodemailer.createTransport({
      host: this.c.host,
      port: this.port,
      secure: this.c.security === "tls",
      requireTLS: this.c.security === "starttls",
      ignoreTLS: this.c.security === "none",
      ...(this.c.auth ? { auth: this.c.auth } : {}),
      tls: { ...(this.c.ca ? { ca: this.c.ca } : {}), minVersion: "TLSv1.2" },
      connectionTimeout: timeoutMs,
      greetingTimeout: timeoutMs,
      socketTimeout: timeoutMs,
      dnsTimeout: timeoutMs,
    });
  }

  async verify(timeoutMs: number): Promise<void> {
    const t = this.transport(timeoutMs);
    try {
      await within(t.verify(), timeoutMs + 1000, `SMTP server ${this.where}`, () => t.close());
    } catch (e) {
      throw smtpError(e, this.where);
    } finally {
      t.close();
    }
  }

  async send(e: NotificationEvent, timeoutMs: number): Promise<void> {
    const to = recipientsFor(this.c, e);
    if (to.length === 0) return; // nobody asked for this pair's mail
    const t = this.transport(timeoutMs);
    try {
      await within(t.sendMail({
        from: this.c.from,
        to,
        subject: `[understudy] [${stateWord(e)}] ${e.summary}`.slice(0, 250),
        text: textOf(e),
        headers: { "X-Understudy-Event-Id": e.id, "X-Understudy-Event-Kind": e.kind, "X-Understudy-Event-State": e.state, "X-Understudy-Pair": `${e.namespace}/${e.pair}` },
      }), timeoutMs * 3, `SMTP server ${this.where}`, () => t.close());
    } catch (err) {
      throw smtpError(err, this.where);
    } finally {
      t.close();
    }
  }

  close(): void {}
}
