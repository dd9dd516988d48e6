// Webhook channel: POSTs the event as JSON (understudy's event object, or the
// {text, blocks} shape Slack's incoming webhooks take). node:http(s) rather
// than fetch so a private CA can be given per channel.
import http from "node:http";
import https from "node:https";
import type { NotificationEvent } from "../api/v1alpha1/index.ts";
import { DeliveryError, stateWord, textOf, type Sender } from "./channel.ts";

export interface WebhookConfig {
  url: string;
  format: "json" | "slack";
  headers: Record<string, string>;
  ca?: string;
}

/** Parses and checks the URL: a clear error instead of a failure at send time. */
export function parseWebhookUrl(raw: string): URL {
  let u: URL;
  try {
    u = new URL(raw.trim());
  } catch {
    throw new DeliveryError("InvalidWebhookURL", `not a URL: ${JSON.stringify(redactUrl(raw))} (expected http(s)://host[:port]/path)`);
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") throw new DeliveryError("InvalidWebhookURL", `URL scheme must be http or https, not ${u.protocol}`);
  if (!u.hostname) throw new DeliveryError("InvalidWebhookURL", "URL has no host");
  return u;
}

/** Webhook URLs are secrets (Slack's carry a token in the path): only scheme, host and port are ever shown. */
export function redactUrl(raw: string): string {
  try {
    const u = new URL(raw);
    return `${u.protocol}//${u.host}/…`;
  } catch {
    return raw.length > 12 ? `${raw.slice(0, 12)}…` : raw;
  }
}

export function slackBody(e: NotificationEvent): object {
  const icon = e.state === "resolved" ? ":white_check_mark:" : e.severity === "critical" ? ":rotating_light:" : e.severity === "warning" ? ":warning:" : ":information_source:";
  return {
    text: `${icon} [${stateWord(e)}] ${e.summary}`,
    blocks: [
      { type: "section", text: { type: "mrkdwn", text: `${icon} *[${stateWord(e)}] ${e.summary}*\n${e.detail ?? ""}` } },
      { type: "context", elements: [{ type: "mrkdwn", text: `pair \`${e.namespace}/${e.pair}\`${e.subject ? ` target \`${e.subject}\`` : ""} · ${e.kind} · ${e.at} · id ${e.id}` }] },
    ],
  };
}

export class WebhookSender implements Sender {
  private readonly url: URL;
  private readonly c: WebhookConfig;
  constructor(c: WebhookConfig) {
    this.c = c;
    this.url = parseWebhookUrl(c.url);
  }

  send(e: NotificationEvent, timeoutMs: number): Promise<void> {
    const body = JSON.stringify(this.c.format === "slack" ? slackBody(e) : { ...e, text: textOf(e) });
    const where = redactUrl(this.url.href);
    return new Promise<void>((resolve, reject) => {
      const mod = this.url.protocol === "https:" ? https : http;
      const req = mod.request(this.url, {
        method: "POST",
        headers: { "content-type": "application/json", "user-agent": "understudy-operator", "content-length": Buffer.byteLength(body), ...this.c.headers },
        timeout: timeoutMs,
        ...(this.c.ca ? { ca: this.c.ca } : {}),
      }, (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (d: Buffer) => chunks.length < 8 && chunks.push(d));
        res.on("end", () => {
          const code = res.statusCode ?? 0;
          if (code >= 200 && code < 300) return resolve();
          const text = Buffer.concat(chunks).toString("utf8").slice(0, 200).replace(/\s+/g, " ");
          reject(new DeliveryError(code === 401 || code === 403 ? "WebhookUnauthorized" : "WebhookRejected", `POST ${where} answered HTTP ${code}${text ? `: ${text}` : ""}`));
        });
      });
      const deadline = setTimeout(() => req.destroy(new DeliveryError("Timeout", `POST ${where}: no answer within ${timeoutMs} ms`)), timeoutMs);
      req.on("close", () => clearTimeout(deadline));
      req.on("timeout", () => req.destroy(new DeliveryError("Timeout", `POST ${where}: no answer within ${timeoutMs} ms`)));
      req.on("error", (err) => reject(err instanceof DeliveryError ? err : new DeliveryError("WebhookUnreachable", `POST ${where}: ${(err as NodeJS.ErrnoException).code ?? ""} ${err.message}`.trim())));
      req.end(body);
    });
  }

  close(): void {}
}
