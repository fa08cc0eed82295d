//! Test images built offline: `umoci` makes an OCI layout with one layer of random
//! (incompressible) bytes per requested size, `skopeo` pushes it to a [`Registry`].

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use swarm_proto::Digest;

use super::process::{require_tool, run};
use super::registry::Registry;

/// What was pushed.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    /// `127.0.0.1:PORT/NAME:TAG`.
    pub reference: String,
    pub name: String,
    pub tag: String,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config_digest: Digest,
    /// Layer blob digests, bottom layer first.
    pub layer_digests: Vec<Digest>,
    /// Layer blob sizes (gzip-compressed tar), same order.
    pub layer_sizes: Vec<u64>,
    /// Bytes a pull fetches through the blob endpoint: layers plus config.
    pub total_bytes: u64,
    /// The OCI layout the image was built in (kept until the caller's dir goes).
    pub layout: PathBuf,
}

impl ImageInfo {
    /// Every blob a pull fetches: the config, then the layers.
    pub fn blob_digests(&self) -> Vec<Digest> {
        std::iter::once(self.config_digest).chain(self.layer_digests.iter().copied()).collect()
    }

    /// The bytes of a blob (or the manifest) from the OCI layout.
    pub fn read_blob(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        let path = self.layout.join("blobs/sha256").join(digest.hex());
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// Builds an image with one layer per entry of `layers` (each a file of that many
/// random bytes, so the gzip layer is about as large) and pushes it as `NAME:TAG` to
/// `registry`. The OCI layout stays under the registry's dir (`images/`).
pub fn build_image(registry: &Registry, name: &str, tag: &str, layers: &[usize]) -> anyhow::Result<ImageInfo> {
    let work_dir = &registry.dir().join("images");
    require_tool("umoci", "umoci");
    require_tool("skopeo", "skopeo");
    let layout = work_dir.join(format!("oci-{}-{tag}", name.replace('/', "_")));
    if layout.exists() {
        std::fs::remove_dir_all(&layout)?;
    }
    std::fs::create_dir_all(work_dir)?;
    let image = format!("{}:{tag}", layout.display());
    let timeout = Duration::from_secs(300);
    run(cmd("umoci", &["init", "--layout", &layout.to_string_lossy()]), timeout)?;
    run(cmd("umoci", &["new", "--image", &image]), timeout)?;
    for (i, &size) in layers.iter().enumerate() {
        let file = work_dir.join(format!("layer-{i}.bin"));
        write_random(&file, size)?;
        run(
            cmd("umoci", &["insert", "--image", &image, &file.to_string_lossy(), &format!("/layer-{i}.bin")]),
            timeout,
        )?;
        std::fs::remove_file(&file)?;
    }
    let dest = format!("docker://{}/{name}:{tag}", registry.host());
    let source = format!("oci:{image}");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    let creds = registry.credentials().map(|(u, p)| format!("{u}:{p}"));
    if let Some(creds) = &creds {
        args.extend(["--dest-creds", creds.as_str()]);
    }
    args.extend([source.as_str(), dest.as_str()]);
    run(cmd("skopeo", &args), timeout)?;

    // Read back what the layout holds for the tag.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| m.iter().find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag))
        .with_context(|| format!("tag {tag} missing from {}/index.json", layout.display()))?;
    let manifest_digest: Digest = parse_digest(&entry["digest"])?;
    let manifest_media_type = entry["mediaType"].as_str().unwrap_or_default().to_string();
    let manifest_bytes = std::fs::read(layout.join("blobs/sha256").join(manifest_digest.hex()))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)?;
    let config_digest = parse_digest(&manifest["config"]["digest"])?;
    let config_size = manifest["config"]["size"].as_u64().context("config size")?;
    let mut layer_digests = Vec::new();
    let mut layer_sizes = Vec::new();
    for layer in manifest["layers"].as_array().context("layers")? {
        layer_digests.push(parse_digest(&layer["digest"])?);
        layer_sizes.push(layer["size"].as_u64().context("layer size")?);
    }
    if layer_digests.len() != layers.len() {
        bail!("asked for {} layers, the manifest has {}", layers.len(), layer_digests.len());
    }
    let total_bytes = config_size + layer_sizes.iter().sum::<u64>();
    Ok(ImageInfo {
        reference: format!("{}/{name}:{tag}", registry.host()),
        name: name.to_string(),
        tag: tag.to_string(),
        manifest_digest,
        manifest_media_type,
        config_digest,
        layer_digests,
        layer_sizes,
        total_bytes,
        layout,
    })
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn parse_digest(v: &serde_json::Value) -> anyhow::Result<Digest> {
    let text = v.as_str().with_context(|| format!("expected a digest string, got {v}"))?;
    text.parse::<Digest>().map_err(|e| anyhow::anyhow!("{e}"))
}

/// Writes `size` bytes from /dev/urandom to `path`.
fn write_random(path: &Path, size: usize) -> anyhow::Result<()> {
    let mut src = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    let mut dst = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        src.read_exact(&mut buf[..n])?;
        dst.write_all(&buf[..n])?;
        left -= n;
    }
    dst.flush()?;
    Ok(())
}
