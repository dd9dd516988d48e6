// An OCI image layout tar (https://github.com/opencontainers/image-spec/blob/main/image-layout.md)
// of one layer, made from a root file system directory with tar and gzip
// only: no daemon, no registry, no base image. `ctr images import`, `podman
// load`, `skopeo copy oci-archive:…` and `docker load` (25+) read it.
//
// Reproducible: the layer is a sorted tar with every owner 0:0 and every mtime
// SOURCE_DATE_EPOCH, gzip writes no name or time (gzip -n), and the JSON
// (config, manifest, index) is written with fixed key order from the inputs
// alone. The same root file system and options give the same digest.
//
// Written here rather than taken from a library: the whole format is three
// small JSON documents and two tar invocations, and the tools that write it
// (buildah, umoci) are not on every developer's machine.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, mkdtemp, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { PassThrough } from "node:stream";
import { pipeline } from "node:stream/promises";

export interface ImageConfig {
  /** the image's name, e.g. localhost/understudy:0.1.0 (annotations io.containerd.image.name and org.opencontainers.image.ref.name) */
  name: string;
  /** seconds since the epoch: every mtime in the layer and the config's `created` */
  epoch: number;
  /** "65532:65532" */
  user?: string;
  entrypoint?: string[];
  cmd?: string[];
  env?: string[];
  workingDir?: string;
  labels?: Record<string, string>;
  /** a line for the config's history (what made the layer) */
  createdBy: string;
}

export interface BuiltImage {
  /** the OCI layout tar */
  file: string;
  /** the manifest's digest, "sha256:…": what a registry and containerd call the image */
  digest: string;
  /** bytes of the compressed layer */
  layerSize: number;
  /** bytes of the layout tar */
  size: number;
}

const SHELL_SAFE = /^[A-Za-z0-9_./:@=+-]+$/;

function runTar(args: string[], out: NodeJS.WritableStream): Promise<void> {
  const tar = spawn("tar", args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, LC_ALL: "C" } });
  let err = "";
  tar.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((resolve, reject) => {
    tar.once("error", reject);
    tar.once("close", (code) => (code === 0 ? resolve() : reject(new Error(`tar ${args.filter((a) => SHELL_SAFE.test(a)).join(" ")} exited with ${code}: ${err.trim()}`))));
  });
  return Promise.all([pipeline(tar.stdout, out), exited]).then(() => undefined);
}

/** sha256 and byte count of what flows through. */
function hashing(): { stream: PassThrough; result: () => { sha256: string; size: number } } {
  const h = createHash("sha256");
  let size = 0;
  const stream = new PassThrough();
  stream.on("data", (d: Buffer) => {
    h.update(d);
    size += d.length;
  });
  return { stream, result: () => ({ sha256: h.digest("hex"), size }) };
}

/** gzip -n: no file name, no time stamp in the header. */
function gzip(): ReturnType<typeof spawn> {
  return spawn("gzip", ["-n", "-6", "-c"], { stdio: ["pipe", "pipe", "inherit"] });
}

/** The layer of `rootfs`: a sorted, numeric-owner tar, gzipped; returns the diff_id and the blob's digest. */
async function writeLayer(rootfs: string, epoch: number, blobs: string): Promise<{ diffId: string; digest: string; size: number }> {
  const partial = path.join(blobs, "layer.partial");
  const raw = hashing();
  const z = gzip();
  const gz = hashing();
  const zExit = new Promise<void>((resolve, reject) => {
    z.once("error", reject);
    z.once("close", (code) => (code === 0 ? resolve() : reject(new Error(`gzip exited with ${code}`))));
  });
  const written = pipeline(z.stdout!, gz.stream, createWriteStream(partial));
  raw.stream.pipe(z.stdin!);
  // --sort=name and fixed owners/times: the bytes depend on the tree alone
  await runTar(["--sort=name", "--format=gnu", "--owner=0", "--group=0", "--numeric-owner", `--mtime=@${epoch}`, "-C", rootfs, "-cf", "-", "."], raw.stream);
  await Promise.all([written, zExit]);
  const { sha256: diff } = raw.result();
  const { sha256: digest, size } = gz.result();
  await rename(partial, path.join(blobs, digest));
  return { diffId: `sha256:${diff}`, digest: `sha256:${digest}`, size };
}

async function writeBlob(blobs: string, json: unknown): Promise<{ digest: string; size: number }> {
  const bytes = Buffer.from(JSON.stringify(json));
  const sha = createHash("sha256").update(bytes).digest("hex");
  await writeFile(path.join(blobs, sha), bytes);
  return { digest: `sha256:${sha}`, size: bytes.length };
}

/** OCI architecture names by Node's. */
const ARCH: Record<string, string> = { x64: "amd64", arm64: "arm64" };

/**
 * Build an OCI image layout tar at `out` of one layer holding `rootfs`
 * (owners and times are normalized; modes are kept, so set them in rootfs).
 */
export async function buildOciArchive(rootfs: string, out: string, c: ImageConfig): Promise<BuiltImage> {
  const arch = ARCH[process.arch] ?? process.arch;
  const created = new Date(c.epoch * 1000).toISOString().replace(/\.000Z$/, "Z");
  const tmp = await mkdtemp(path.join(os.tmpdir(), "understudy-oci-"));
  try {
    const layout = path.join(tmp, "layout");
    const blobs = path.join(layout, "blobs", "sha256");
    await mkdir(blobs, { recursive: true });
    const layer = await writeLayer(rootfs, c.epoch, blobs);
    const config = await writeBlob(blobs, {
      created,
      architecture: arch,
      os: "linux",
      config: {
        ...(c.user ? { User: c.user } : {}),
        ...(c.env ? { Env: c.env } : {}),
        ...(c.entrypoint ? { Entrypoint: c.entrypoint } : {}),
        ...(c.cmd ? { Cmd: c.cmd } : {}),
        ...(c.workingDir ? { WorkingDir: c.workingDir } : {}),
        ...(c.labels ? { Labels: c.labels } : {}),
      },
      rootfs: { type: "layers", diff_ids: [layer.diffId] },
      history: [{ created, created_by: c.createdBy }],
    });
    const manifest = await writeBlob(blobs, {
      schemaVersion: 2,
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: config.digest, size: config.size },
      layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: layer.digest, size: layer.size }],
      ...(c.labels ? { annotations: c.labels } : {}),
    });
    await writeFile(
      path.join(layout, "index.json"),
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: [
          {
            mediaType: "application/vnd.oci.image.manifest.v1+json",
            digest: manifest.digest,
            size: manifest.size,
            platform: { architecture: arch, os: "linux" },
            annotations: { "io.containerd.image.name": c.name, "org.opencontainers.image.ref.name": c.name },
          },
        ],
      }),
    );
    await writeFile(path.join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
    await mkdir(path.dirname(out), { recursive: true });
    const partial = `${out}.partial`;
    await runTar(["--sort=name", "--format=gnu", "--owner=0", "--group=0", "--numeric-owner", `--mtime=@${c.epoch}`, "--mode=a+r,u+w,go-w", "-C", layout, "-cf", "-", "."], createWriteStream(partial));
    await rename(partial, out);
    return { file: out, digest: manifest.digest, layerSize: layer.size, size: (await stat(out)).size };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/**
 * The same image under another name with more labels: a new config (so a new
 * manifest digest) over the same layer, written as a new OCI layout tar. For
 * "another version" of an image without building it again (an upgrade test).
 */
export async function relabelOciArchive(from: string, out: string, name: string, labels: Record<string, string>): Promise<BuiltImage> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), "understudy-oci-"));
  try {
    await runTar(["-xf", from, "-C", tmp], new PassThrough().resume());
    const blobs = path.join(tmp, "blobs", "sha256");
    const blob = async (digest: string) => JSON.parse(await readFile(path.join(blobs, digest.replace(/^sha256:/, "")), "utf8")) as Record<string, unknown>;
    const index = JSON.parse(await readFile(path.join(tmp, "index.json"), "utf8")) as { manifests: { digest: string; size: number; annotations?: Record<string, string> }[] };
    if (index.manifests.length !== 1) throw new Error(`${from}: expected one image, found ${index.manifests.length}`);
    const desc = index.manifests[0]!;
    const manifest = (await blob(desc.digest)) as { config: { digest: string; size: number }; layers: { size: number }[]; annotations?: Record<string, string> };
    const config = (await blob(manifest.config.digest)) as { config: { Labels?: Record<string, string> } };
    config.config.Labels = { ...config.config.Labels, ...labels };
    const oldConfig = manifest.config.digest;
    const c = await writeBlob(blobs, config);
    manifest.config = { ...manifest.config, digest: c.digest, size: c.size };
    manifest.annotations = { ...manifest.annotations, ...labels };
    const m = await writeBlob(blobs, manifest);
    // the old manifest and config are not part of the new image
    for (const old of [desc.digest, oldConfig]) if (old !== m.digest && old !== c.digest) await rm(path.join(blobs, old.replace(/^sha256:/, "")));
    index.manifests = [{ ...desc, digest: m.digest, size: m.size, annotations: { ...desc.annotations, "io.containerd.image.name": name, "org.opencontainers.image.ref.name": name } }];
    await writeFile(path.join(tmp, "index.json"), JSON.stringify(index));
    const partial = `${out}.partial`;
    await runTar(["--sort=name", "--format=gnu", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "--mode=a+r,u+w,go-w", "-C", tmp, "-cf", "-", "."], createWriteStream(partial));
    await rename(partial, out);
    return { file: out, digest: m.digest, layerSize: manifest.layers.reduce((a, l) => a + l.size, 0), size: (await stat(out)).size };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/**
 * The digests of the image in an OCI layout tar: its manifest's (what
 * registries and `ctr images ls` show) and its config's (the image ID, what
 * the kubelet reports as a container's imageID with containerd).
 */
export async function ociArchiveDigests(file: string): Promise<{ manifest: string; config: string }> {
  const member = async (name: string): Promise<string> => {
    const out = new PassThrough();
    const chunks: Buffer[] = [];
    out.on("data", (d: Buffer) => chunks.push(d));
    await runTar(["-xOf", file, name], out);
    return Buffer.concat(chunks).toString("utf8");
  };
  const index = JSON.parse(await member("./index.json")) as { manifests: { digest: string }[] };
  const manifest = index.manifests[0]?.digest ?? "";
  const m = JSON.parse(await member(`./blobs/sha256/${manifest.replace(/^sha256:/, "")}`)) as { config: { digest: string } };
  return { manifest, config: m.config.digest };
}

/** sha256 of a file, hex. */
export async function sha256File(file: string): Promise<string> {
  const h = createHash("sha256");
  await pipeline(createReadStream(file), h);
  return h.digest("hex");
}
