// Shared settings of the property-based fuzz tests (fast-check). `npm test`
// runs a short version; `npm run fuzz` sets FUZZ_RUNS for the full one (at
// least 10,000 generated cases over all properties). FUZZ_SEED replays a run:
// a failure prints the seed and the shrunk counterexample.
import fc from "fast-check";

/** Cases per property: FUZZ_RUNS, else `short`. */
export function runs(short: number): number {
  const n = Number(process.env.FUZZ_RUNS);
  return Number.isFinite(n) && n > 0 ? Math.floor(n) : short;
}

export function params(short: number): fc.Parameters<unknown> {
  const seed = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined;
  return { numRuns: runs(short), ...(seed !== undefined ? { seed } : {}), endOnFailure: true };
}

/** Path components a hostile peer would try, mixed with ordinary ones. */
export const hostileComponent = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom("a", "b", "d", "f", "l", "abs", "x y", "ü") },
  { weight: 3, arbitrary: fc.constantFrom("..", ".", "", "...", "a\u0000b", "/", "\\..", "x".repeat(256), "-") },
  { weight: 1, arbitrary: fc.string({ maxLength: 8 }) },
);

/** A relative (or not) path made of hostile components. */
export const hostilePath = fc.oneof(
  { weight: 8, arbitrary: fc.array(hostileComponent, { minLength: 1, maxLength: 4 }).map((c) => c.join("/")) },
  { weight: 1, arbitrary: fc.constantFrom("/etc/passwd", "/", "", "a/", "/tmp/x", "../../../outside/secret") },
  { weight: 1, arbitrary: fc.string({ maxLength: 40 }) },
);
