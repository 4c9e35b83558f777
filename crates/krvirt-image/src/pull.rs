//! Imports over the network: a plain HTTP(S) URL, and a container registry
//! holding a KubeVirt containerDisk (the disk file under `/disk/` in a
//! layer).
//!
//! The registry client speaks the OCI distribution API directly with
//! reqwest (already used by the workspace): manifest (or index, picking
//! linux/amd64) then layers, newest first, each streamed through a sha256
//! check of the layer digest, gunzip and a small tar reader; the first
//! regular file under `disk/` streams into a new blob. Nothing is buffered
//! whole. Anonymous bearer tokens (`WWW-Authenticate: Bearer realm=…`) are
//! fetched as public registries require. Loopback registries use plain
//! HTTP, everything else HTTPS.

use std::io::Write;

use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::alias::{ImageError, ImageStore, Reference};
use crate::blobs::{BlobWriter, ImportOptions, Imported, NameTag};

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

fn pull_err(source_ref: &str, reason: impl std::fmt::Display) -> ImageError {
    ImageError::Pull {
        source_ref: source_ref.to_string(),
        reason: reason.to_string(),
    }
}

fn http_client() -> Result<reqwest::Client, ImageError> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| pull_err("client", e))
}

impl ImageStore {
    /// Import the body of an HTTP(S) URL, streamed and hashed.
    pub async fn import_url(
        &self,
        url: &str,
        opts: &ImportOptions,
    ) -> Result<Imported, ImageError> {
        let client = http_client()?;
        let resp = client.get(url).send().await.map_err(|e| pull_err(url, e))?;
        if !resp.status().is_success() {
            return Err(pull_err(url, format!("HTTP {}", resp.status())));
        }
        let mut w = self.blob_writer()?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| pull_err(url, e))?;
            w.write_all(&chunk)
                .map_err(|e| pull_err(url, format!("writing: {e}")))?;
        }
        self.commit(w, opts)
    }

    /// Pull a containerDisk image from its registry into `target` (default:
    /// the repository's last path component and the reference's tag) and
    /// remember the reference, so VMs naming it resolve to the pulled image.
    pub async fn pull(
        &self,
        reference: &str,
        target: Option<NameTag>,
    ) -> Result<Imported, ImageError> {
        let r = Reference::parse(reference).map_err(|reason| ImageError::InvalidReference {
            reference: reference.into(),
            reason,
        })?;
        let (host, path) = r
            .repository
            .split_once('/')
            .ok_or_else(|| pull_err(reference, "no registry host"))?;
        let registry_host = if host == "docker.io" {
            "registry-1.docker.io"
        } else {
            host
        };
        let hostname = registry_host
            .rsplit_once(':')
            .map_or(registry_host, |(h, _)| h);
        let scheme =
            if hostname == "localhost" || hostname.starts_with("127.") || hostname == "[::1]" {
                "http"
            } else {
                "https"
            };
        let base = format!("{scheme}://{registry_host}/v2/{path}");
        let target = match target {
            Some(t) => t,
            None => {
                let last = path.rsplit('/').next().unwrap_or(path);
                NameTag::parse(&format!(
                    "{last}:{}",
                    r.tag.clone().unwrap_or_else(|| "latest".into())
                ))?
            }
        };
        let mut reg = Registry {
            client: http_client()?,
            token: None,
            reference: reference.to_string(),
        };
        let wanted = r
            .digest
            .clone()
            .or(r.tag.clone())
            .unwrap_or("latest".into());
        let (mut manifest, mut mdigest) = reg.manifest(&base, &wanted).await?;
        if let Some(d) = &r.digest
            && *d != mdigest
        {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {reference}"),
                expected: d.clone(),
                actual: mdigest,
            });
        }
        if manifest.get("manifests").is_some() {
            let pick = manifest["manifests"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| {
                    m.pointer("/platform/architecture").and_then(Value::as_str) == Some("amd64")
                        && m.pointer("/platform/os").and_then(Value::as_str) == Some("linux")
                })
                .or_else(|| manifest["manifests"].get(0))
                .and_then(|m| m.get("digest"))
                .and_then(Value::as_str)
                .ok_or_else(|| pull_err(reference, "image index without a usable manifest"))?
                .to_string();
            let (m, d) = reg.manifest(&base, &pick).await?;
            if d != pick {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest of {reference}"),
                    expected: pick,
                    actual: d,
                });
            }
            (manifest, mdigest) = (m, d);
        }
        let layers = manifest["layers"]
            .as_array()
            .ok_or_else(|| pull_err(reference, "manifest has no layers"))?
            .clone();
        // The disk is usually in the last layer: look there first.
        for layer in layers.iter().rev() {
            let digest = layer["digest"]
                .as_str()
                .ok_or_else(|| pull_err(reference, "layer without digest"))?;
            let media = layer["mediaType"].as_str().unwrap_or_default();
            if let Some(w) = reg.layer_disk(self, &base, digest, media).await? {
                let opts = ImportOptions {
                    source: format!("{reference} ({mdigest})"),
                    ..ImportOptions::new(target.clone(), "")
                };
                let imp = self.commit(w, &opts)?;
                self.record_reference(reference, &target)?;
                return Ok(imp);
            }
        }
        Err(pull_err(
            reference,
            "no layer holds a file under /disk/: not a KubeVirt containerDisk",
        ))
    }
}

struct Registry {
    client: reqwest::Client,
    token: Option<String>,
    reference: String,
}

impl Registry {
    async fn get(&mut self, url: &str, accept: &str) -> Result<reqwest::Response, ImageError> {
        for attempt in 0..2 {
            let mut req = self.client.get(url).header("Accept", accept);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.map_err(|e| pull_err(&self.reference, e))?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                let chal = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.token = Some(self.fetch_token(&chal).await?);
                continue;
            }
            if !resp.status().is_success() {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                return Err(pull_err(
                    &self.reference,
                    format!("GET {url}: HTTP {status}: {}", text.trim()),
                ));
            }
            return Ok(resp);
        }
        Err(pull_err(&self.reference, "unauthorized"))
    }

    async fn fetch_token(&self, challenge: &str) -> Result<String, ImageError> {
        let params = challenge
            .strip_prefix("Bearer ")
            .ok_or_else(|| pull_err(&self.reference, format!("unsupported auth {challenge:?}")))?;
        let mut realm = None;
        let mut query = Vec::new();
        for part in params.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                let v = v.trim_matches('"').to_string();
                if k == "realm" {
                    realm = Some(v);
                } else {
                    query.push((k.to_string(), v));
                }
            }
        }
        let realm =
            realm.ok_or_else(|| pull_err(&self.reference, "auth challenge without realm"))?;
        let url = reqwest::Url::parse_with_params(&realm, &query)
            .map_err(|e| pull_err(&self.reference, format!("token realm {realm:?}: {e}")))?;
        let v: Value = self
            .client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| pull_err(&self.reference, format!("token: {e}")))?
            .json()
            .await
            .map_err(|e| pull_err(&self.reference, format!("token: {e}")))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| pull_err(&self.reference, "token response without token"))
    }

    async fn manifest(&mut self, base: &str, wanted: &str) -> Result<(Value, String), ImageError> {
        let resp = self
            .get(&format!("{base}/manifests/{wanted}"), MANIFEST_TYPES)
            .await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| pull_err(&self.reference, e))?;
        if bytes.len() > 4 << 20 {
            return Err(pull_err(&self.reference, "manifest larger than 4 MiB"));
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| pull_err(&self.reference, format!("manifest: {e}")))?;
        Ok((v, digest))
    }

    /// Stream one layer; the disk file if it has one.
    async fn layer_disk(
        &mut self,
        store: &ImageStore,
        base: &str,
        digest: &str,
        media: &str,
    ) -> Result<Option<BlobWriter>, ImageError> {
        let resp = self.get(&format!("{base}/blobs/{digest}"), "*/*").await?;
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        let mut first = bytes::Bytes::new();
        while first.is_empty() {
            match body.next().await {
                Some(c) => first = c.map_err(|e| pull_err(&self.reference, e))?,
                None => break,
            }
        }
        // Registries often say "tar" for gzip data (Docker v2 media types): sniff.
        let gz = media.ends_with("gzip") || first.starts_with(&[0x1f, 0x8b]);
        let sink = TarDisk::new(store.blob_writer()?);
        let mut out = if gz {
            Sink::Gz(flate2::write::GzDecoder::new(sink))
        } else {
            Sink::Tar(sink)
        };
        let mut chunk = first;
        loop {
            hasher.update(&chunk);
            out.write_all(&chunk)
                .map_err(|e| pull_err(&self.reference, format!("layer {digest}: {e}")))?;
            match body.next().await {
                Some(c) => chunk = c.map_err(|e| pull_err(&self.reference, e))?,
                None => break,
            }
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("layer of {}", self.reference),
                expected: digest.to_string(),
                actual,
            });
        }
        let tar = match out {
            Sink::Tar(t) => t,
            Sink::Gz(g) => g
                .finish()
                .map_err(|e| pull_err(&self.reference, format!("layer {digest}: gzip: {e}")))?,
        };
        Ok(tar.finish())
    }
}

enum Sink {
    Tar(TarDisk),
    Gz(flate2::write::GzDecoder<TarDisk>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Tar(t) => t.write(buf),
            Sink::Gz(g) => g.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Tar(t) => t.flush(),
            Sink::Gz(g) => g.flush(),
        }
    }
}

/// A streaming tar reader that copies the first regular file under
/// `disk/` into a blob writer.
struct TarDisk {
    writer: Option<BlobWriter>,
    header: Vec<u8>,
    /// Bytes of entry data (plus padding) still to come.
    remaining: u64,
    /// Bytes of the current entry's data (not padding) still to come.
    data_left: u64,
    mode: Mode,
    long_name: Option<Vec<u8>>,
    found: bool,
    ended: bool,
}

#[derive(PartialEq)]
enum Mode {
    Skip,
    Disk,
    LongName,
}

impl TarDisk {
    fn new(w: BlobWriter) -> Self {
        TarDisk {
            writer: Some(w),
            header: Vec::with_capacity(512),
            remaining: 0,
            data_left: 0,
            mode: Mode::Skip,
            long_name: None,
            found: false,
            ended: false,
        }
    }

    fn finish(self) -> Option<BlobWriter> {
        if self.found && self.data_left == 0 {
            self.writer
        } else {
            None
        }
    }

    fn on_header(&mut self) -> std::io::Result<()> {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|&b| b == 0) {
            self.ended = true;
            return Ok(());
        }
        let field = |a: usize, b: usize| {
            let f = &h[a..b];
            let end = f.iter().position(|&c| c == 0).unwrap_or(f.len());
            f[..end].to_vec()
        };
        let size_field = field(124, 136);
        let size = if size_field.first().is_some_and(|b| b & 0x80 != 0) {
            // base-256 (GNU) for sizes >= 8 GiB
            h[125..136].iter().fold(0u64, |a, &b| (a << 8) | b as u64)
        } else {
            let s = String::from_utf8_lossy(&size_field);
            u64::from_str_radix(s.trim(), 8).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad tar size field")
            })?
        };
        let typeflag = h[156];
        let mut name = field(0, 100);
        if &h[257..262] == b"ustar" {
            let prefix = field(345, 500);
            if !prefix.is_empty() {
                name = [prefix, b"/".to_vec(), name].concat();
            }
        }
        if let Some(l) = self.long_name.take() {
            name = l;
        }
        self.remaining = size.div_ceil(512) * 512;
        self.data_left = size;
        let name = String::from_utf8_lossy(&name).into_owned();
        let path = name.trim_start_matches("./").trim_start_matches('/');
        self.mode = match typeflag {
            b'L' => {
                self.long_name = Some(Vec::new());
                Mode::LongName
            }
            b'0' | 0 if !self.found && path.starts_with("disk/") && path.len() > 5 => {
                self.found = true;
                Mode::Disk
            }
            _ => Mode::Skip,
        };
        Ok(())
    }
}

impl Write for TarDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() && !self.ended {
            if self.remaining == 0 {
                let need = 512 - self.header.len();
                let take = need.min(rest.len());
                self.header.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if self.header.len() == 512 {
                    self.on_header()?;
                }
                continue;
            }
            let take = (self.remaining.min(rest.len() as u64)) as usize;
            let data = (self.data_left.min(take as u64)) as usize;
            match self.mode {
                Mode::Disk => {
                    if let Some(w) = self.writer.as_mut() {
                        w.write_all(&rest[..data])?;
                    }
                }
                Mode::LongName => {
                    if let Some(l) = self.long_name.as_mut() {
                        l.extend(rest[..data].iter().take_while(|&&b| b != 0));
                    }
                }
                Mode::Skip => {}
            }
            self.data_left -= data as u64;
            self.remaining -= take as u64;
            rest = &rest[take..];
            if self.remaining == 0 && self.mode == Mode::Disk {
                // Only the first disk file counts; ignore the rest of the layer.
                self.mode = Mode::Skip;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
