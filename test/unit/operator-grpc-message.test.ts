// tidyGrpcMessage: gRPC's connection-failure text reduced to the error a person
// can act on; anything else passes through unchanged.
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { tidyGrpcMessage } from "../../agent/control-client.ts";

test("pick_first's UNAVAILABLE text becomes the underlying error", () => {
  assert.equal(tidyGrpcMessage("No connection established. Last error: Error: connect ECONNREFUSED 1.2.3.4:7702. Resolution note: "), "connect ECONNREFUSED 1.2.3.4:7702");
  assert.equal(tidyGrpcMessage("No connection established. Last error: Error: getaddrinfo ENOTFOUND agent.example.com. Resolution note: DNS resolution failed for agent.example.com:7702"), "getaddrinfo ENOTFOUND agent.example.com");
  assert.equal(tidyGrpcMessage("No connection established. Last error: Error: connect ECONNREFUSED [::1]:7702. Resolution note: "), "connect ECONNREFUSED [::1]:7702");
  // A multi-line resolution note is dropped too.
  assert.equal(tidyGrpcMessage("No connection established. Last error: Error: read ECONNRESET. Resolution note: line one\nline two"), "read ECONNRESET");
});

test("without a resolution note (round_robin) and without the 'Error: ' prefix", () => {
  assert.equal(tidyGrpcMessage("round_robin: No connection established. Last error: Error: connect ETIMEDOUT 10.0.0.9:7702"), "connect ETIMEDOUT 10.0.0.9:7702");
  assert.equal(tidyGrpcMessage("No connection established. Last error: self-signed certificate in certificate chain. Resolution note: "), "self-signed certificate in certificate chain");
});

test("other messages pass through (trimmed)", () => {
  for (const m of ["Deadline exceeded after 5.001s", "set prod.www: path must be absolute", "14 UNAVAILABLE: Connection dropped", "agent 1.2.3.4:7702: permission denied. Ask an admin."]) assert.equal(tidyGrpcMessage(m), m);
  assert.equal(tidyGrpcMessage("  padded  "), "padded");
  assert.equal(tidyGrpcMessage(""), "");
});

test("property: any error text is recovered from the UNAVAILABLE wrapper", () => {
  // Error texts as Node prints them: no trailing dot or space, no "Resolution note:" inside.
  const text = fc.string({ minLength: 1, maxLength: 60 }).map((s) => s.trim().replace(/[.\s]+$/, "")).filter((s) => s.length > 0 && !s.includes("Resolution note:") && !s.startsWith("Error: "));
  fc.assert(
    fc.property(text, fc.string({ maxLength: 40 }), fc.boolean(), (err, note, prefixed) => {
      assert.equal(tidyGrpcMessage(`No connection established. Last error: ${prefixed ? "Error: " : ""}${err}. Resolution note: ${note}`), err);
      assert.equal(tidyGrpcMessage(`round_robin: No connection established. Last error: ${prefixed ? "Error: " : ""}${err}`), err);
    }),
    { numRuns: 500 },
  );
});
