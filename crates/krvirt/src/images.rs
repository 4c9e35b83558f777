//! The image service of `krvirt up`: HTTP endpoints over the host's
//! content-addressed image store (krvirt-image), and the `krvirt.io/v1`
//! Image objects that mirror it.
//!
//! Endpoints, under `/apis/images.krvirt.io/v1`:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /images` | every `name:tag` (JSON array) |
//! | `GET /images/{name:tag}` | digest, layer chain, tag history |
//! | `POST /upload?image=N:T[&base=N:T][&digest=sha256:…]` | streamed body → blob (hashed on the fly, never buffered whole) |
//! | `POST /import` `{"image","source","base"?,"digest"?}` | source: `http(s)://…`, `docker://REF` (containerDisk), or a path on the server |
//! | `POST /tag` `{"source","target"}` | another tag for a `name:tag` or digest |
//! | `DELETE /images/{name:tag}` (`?all=true`: every tag of `name`) | untag |
//! | `POST /gc` | remove blobs no tag, layer or VM disk uses |
//! | `POST /verify/{name:tag}` | full re-hash of the chain |
//!
//! and `PUT` (or `POST`) `/apis/volumes.krvirt.io/v1/namespaces/{ns}/volumes/{name}/upload`
//! (`?digest=sha256:…` optional): the content of an `upload` Volume,
//! streamed into a blob the host agent then copies into the Volume's pool.
//!
//! Every change is mirrored into the Image objects; a background loop
//! mirrors changes the host agent makes (a failed verification before a
//! launch turns the Image's `Verified` condition False).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use krvirt_api::image::{
    CONDITION_VERIFIED, Image, ImageStatus, ImageTag, ImageTagEvent, REASON_DIGEST_MISMATCH,
};
use krvirt_api::meta::{Condition, ConditionStatus, set_condition};
use krvirt_image::{ImageError, ImageStore, ImportOptions, NameTag};
use krvirt_server::{ApiError, Preconditions, Registry};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// URL prefix of the image service.
pub const PREFIX: &str = "/apis/images.krvirt.io/v1";

/// The image service's shared state.
pub struct ImageService {
    pub store: Arc<ImageStore>,
    pub registry: Registry,
    pub node_name: String,
    /// VM run directories (GC keeps blobs their disks use).
    pub run_root: PathBuf,
    mirror_lock: tokio::sync::Mutex<()>,
}

type Svc = Arc<ImageService>;

struct Failure(StatusCode, String, &'static str);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": self.1, "reason": self.2, "code": self.0.as_u16(),
        });
        (self.0, Json(body)).into_response()
    }
}

impl From<ImageError> for Failure {
    fn from(e: ImageError) -> Self {
        let (code, reason) = match &e {
            ImageError::UnknownImage { .. } | ImageError::NotFound { .. } => {
                (StatusCode::NOT_FOUND, "NotFound")
            }
            ImageError::Invalid { .. } | ImageError::InvalidReference { .. } => {
                (StatusCode::BAD_REQUEST, "BadRequest")
            }
            ImageError::DigestMismatch { .. } | ImageError::Corrupt { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "Invalid")
            }
            ImageError::Pull { .. } => (StatusCode::BAD_GATEWAY, "ServiceUnavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        };
        Failure(code, e.to_string(), reason)
    }
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, msg.into(), "BadRequest")
}

fn internal(msg: impl std::fmt::Display) -> Failure {
    Failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        msg.to_string(),
        "InternalError",
    )
}

impl ImageService {
    pub fn new(
        store: Arc<ImageStore>,
        registry: Registry,
        node_name: String,
        run_root: PathBuf,
    ) -> Arc<Self> {
        Arc::new(ImageService {
            store,
            registry,
            node_name,
            run_root,
            mirror_lock: tokio::sync::Mutex::new(()),
        })
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ImageStore) -> Result<T, ImageError> + Send + 'static,
    ) -> Result<T, Failure> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(internal)?
            .map_err(Failure::from)
    }

    /// Make the Image objects match the catalog.
    pub async fn mirror(&self) -> Result<(), ApiError> {
        let _g = self.mirror_lock.lock().await;
        let kind = krvirt_api::find_kind("images")
            .ok_or_else(|| ApiError::Internal("Image kind not registered".into()))?;
        let cat = self
            .store
            .catalog()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let sel = krvirt_server::Selector::default();
        let (existing, _) = self.registry.list(kind, None, &sel).await?;
        for (name, rec) in &cat.images {
            let mut failures = Vec::new();
            let tags: Vec<ImageTag> = rec
                .tags
                .iter()
                .map(|(tag, d)| {
                    let b = cat.blobs.get(d);
                    // A tag is only as good as every blob of its chain.
                    let mut cur = Some(d.clone());
                    let mut guard = 0;
                    while let Some(x) = cur.take() {
                        guard += 1;
                        if guard > 64 {
                            break;
                        }
                        if let Some(bx) = cat.blobs.get(&x) {
                            if let Some(f) = &bx.failure {
                                failures.push(format!("{name}:{tag}: blob {x}: {f}"));
                            }
                            cur = bx.parent.clone();
                        }
                    }
                    ImageTag {
                        tag: tag.clone(),
                        digest: d.clone(),
                        size: b.map_or(0, |b| b.size),
                        format: b.map_or("raw", |b| b.format.as_str()).to_string(),
                        parent: b.and_then(|b| b.parent.clone()),
                        source: b.map(|b| b.source.clone()),
                    }
                })
                .collect();
            let current = existing
                .iter()
                .find(|o| o.pointer("/metadata/name").and_then(Value::as_str) == Some(name));
            let old_status: Option<ImageStatus> = current
                .and_then(|o| o.get("status"))
                .and_then(|s| serde_json::from_value(s.clone()).ok());
            let mut conditions = old_status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let cond = if failures.is_empty() {
                Condition {
                    reason: Some("DigestsMatch".into()),
                    message: Some("every blob matched its sha256 digest when last checked".into()),
                    ..Condition::new(CONDITION_VERIFIED, ConditionStatus::True)
                }
            } else {
                Condition {
                    reason: Some(REASON_DIGEST_MISMATCH.into()),
                    message: Some(format!(
                        "refused: no VM starts on it until it is re-imported: {}",
                        failures.join("; ")
                    )),
                    ..Condition::new(CONDITION_VERIFIED, ConditionStatus::False)
                }
            };
            set_condition(&mut conditions, cond);
            let status = ImageStatus {
                tags,
                history: rec
                    .history
                    .iter()
                    .map(|e| ImageTagEvent {
                        time: e.time.clone(),
                        tag: e.tag.clone(),
                        digest: e.digest.clone(),
                        previous: e.previous.clone(),
                    })
                    .collect(),
                node_name: Some(self.node_name.clone()),
                conditions,
            };
            if old_status.as_ref() == Some(&status) {
                continue;
            }
            let mut obj = match current {
                Some(o) => o.clone(),
                None => {
                    let mut img = Image::default();
                    img.metadata.name = Some(name.clone());
                    let v = serde_json::to_value(&img)
                        .map_err(|e| ApiError::Internal(e.to_string()))?;
                    match self.registry.create(kind, "", v).await {
                        Ok(o) => o,
                        Err(e) => {
                            warn!(image = %name, error = %e, "cannot mirror image");
                            continue;
                        }
                    }
                }
            };
            obj["status"] =
                serde_json::to_value(&status).map_err(|e| ApiError::Internal(e.to_string()))?;
            if let Err(e) = self.registry.replace_status(kind, "", name, obj).await {
                debug!(image = %name, error = %e, "image status not written; next pass");
            }
        }
        for o in &existing {
            let name = o
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let mine = o.pointer("/status/nodeName").and_then(Value::as_str)
                == Some(self.node_name.as_str());
            if mine && !cat.images.contains_key(name) {
                let _ = self
                    .registry
                    .delete(kind, "", name, &Preconditions::default())
                    .await;
            }
        }
        Ok(())
    }

    /// Mirror whenever the catalog file changes (the agent records failed
    /// verifications there).
    pub async fn mirror_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let path = self.store.dir().join(krvirt_image::blobs::CATALOG_FILE);
        let mut last = None;
        loop {
            let stamp = std::fs::metadata(&path)
                .ok()
                .map(|m| (m.modified().ok(), m.len()));
            if stamp != last {
                match self.mirror().await {
                    Ok(()) => last = stamp,
                    Err(e) => debug!(error = %e, "image mirror failed; retrying"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn changed(&self) {
        if let Err(e) = self.mirror().await {
            warn!(error = %e, "mirroring images failed");
        }
    }
}

fn parse_nt(s: &str) -> Result<NameTag, Failure> {
    NameTag::parse(s).map_err(Failure::from)
}

async fn list(State(svc): State<Svc>) -> Result<Json<Value>, Failure> {
    let rows = svc.blocking(|s| s.list()).await?;
    Ok(Json(json!(rows)))
}

async fn inspect(State(svc): State<Svc>, Path(r): Path<String>) -> Result<Json<Value>, Failure> {
    let nt = parse_nt(&r)?;
    let ins = svc.blocking(move |s| s.inspect(&nt)).await?;
    Ok(Json(json!(ins)))
}

#[derive(Deserialize)]
struct UploadQuery {
    image: String,
    base: Option<String>,
    digest: Option<String>,
    source: Option<String>,
}

/// Stream the request body into a blob: chunks go over a bounded channel to
/// a blocking task that writes and hashes them.
async fn upload(
    State(svc): State<Svc>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Response, Failure> {
    let mut opts = ImportOptions::new(
        parse_nt(&q.image)?,
        q.source.unwrap_or_else(|| "upload".into()),
    );
    opts.base = q.base.as_deref().map(parse_nt).transpose()?;
    opts.expected_digest = q.digest;
    let w = stream_to_blob(&svc, body).await?;
    let imp = svc.blocking(move |s| s.commit(w, &opts)).await?;
    svc.changed().await;
    Ok((StatusCode::CREATED, Json(json!(imp))).into_response())
}

/// Stream a request body into a new blob (not yet committed).
async fn stream_to_blob(svc: &Svc, body: Body) -> Result<krvirt_image::BlobWriter, Failure> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(16);
    let store = svc.store.clone();
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut w = store.blob_writer()?;
        while let Some(chunk) = rx.blocking_recv() {
            w.write_all(&chunk).map_err(|e| ImageError::Io {
                context: "writing the upload".into(),
                source: e,
            })?;
        }
        Ok::<_, ImageError>(w)
    });
    let mut stream = body.into_data_stream();
    let mut failed = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if tx.send(c).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    drop(tx);
    let w = writer.await.map_err(internal)??;
    if let Some(e) = failed {
        return Err(bad(format!("upload interrupted: {e}")));
    }
    Ok(w)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeUploadQuery {
    digest: Option<String>,
}

fn api_failure(e: ApiError) -> Failure {
    let code = StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = match e.code() {
        404 => "NotFound",
        409 => "Conflict",
        400 => "BadRequest",
        _ => "InternalError",
    };
    Failure(code, e.to_string(), reason)
}

/// `PUT|POST /apis/volumes.krvirt.io/v1/namespaces/{ns}/volumes/{name}/upload`
/// (`?digest=sha256:…` optional): the content of an `upload` Volume,
/// streamed into this host's image store (hashed on the fly) under a
/// transfer tag; the Volume is annotated with the digest and the host
/// agent copies it into the pool (then drops the tag).
async fn volume_upload(
    State(svc): State<Svc>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<VolumeUploadQuery>,
    body: Body,
) -> Result<Response, Failure> {
    use krvirt_api::storage::{StorageVolume, VOLUME_UPLOAD_ANNOTATION};
    let kind = krvirt_api::find_kind("volumes")
        .ok_or_else(|| internal("the Volume kind is not registered"))?;
    let raw = svc
        .registry
        .get(kind, &ns, &name)
        .await
        .map_err(api_failure)?;
    let v: StorageVolume = serde_json::from_value(raw).map_err(internal)?;
    if v.spec.source.upload.is_none() {
        return Err(bad(format!(
            "Volume {ns}/{name} has no upload source (spec.source.upload)"
        )));
    }
    if v.metadata
        .annotations
        .contains_key(VOLUME_UPLOAD_ANNOTATION)
    {
        return Err(Failure(
            StatusCode::CONFLICT,
            format!("Volume {ns}/{name} was uploaded already"),
            "Conflict",
        ));
    }
    if let Some(d) = &q.digest
        && !krvirt_api::storage::valid_digest(d)
    {
        return Err(bad(format!(
            "digest {d:?} is not sha256: followed by 64 lowercase hex digits"
        )));
    }
    let uid = v.metadata.uid.clone().unwrap_or_default();
    let mut opts = ImportOptions::new(
        parse_nt(&krvirt_agent::storage::transfer_tag("upload", &uid))?,
        format!("upload into Volume {ns}/{name}"),
    );
    opts.expected_digest = q.digest;
    let w = stream_to_blob(&svc, body).await?;
    let imp = svc.blocking(move |s| s.commit(w, &opts)).await?;
    svc.registry
        .merge_patch(
            kind,
            &ns,
            &name,
            &json!({"metadata": {"annotations": {VOLUME_UPLOAD_ANNOTATION: imp.digest}}}),
            krvirt_server::Subresource::Main,
        )
        .await
        .map_err(api_failure)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"volume": name, "digest": imp.digest, "size": imp.size})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    /// `name:tag` (for `docker://` sources: default from the reference)
    image: Option<String>,
    source: String,
    base: Option<String>,
    digest: Option<String>,
}

async fn import(
    State(svc): State<Svc>,
    Json(req): Json<ImportRequest>,
) -> Result<Response, Failure> {
    let target = req.image.as_deref().map(parse_nt).transpose()?;
    let base = req.base.as_deref().map(parse_nt).transpose()?;
    let imp = if let Some(r) = req
        .source
        .strip_prefix("docker://")
        .or_else(|| req.source.strip_prefix("oci://"))
    {
        if base.is_some() {
            return Err(bad("a containerDisk pull cannot be layered with base"));
        }
        svc.store.pull(r, target).await?
    } else {
        let target =
            target.ok_or_else(|| bad("\"image\" (name:tag) is required for this source"))?;
        let mut opts = ImportOptions::new(target, req.source.clone());
        opts.base = base;
        opts.expected_digest = req.digest;
        if req.source.starts_with("http://") || req.source.starts_with("https://") {
            svc.store.import_url(&req.source, &opts).await?
        } else {
            let path = PathBuf::from(req.source.strip_prefix("file://").unwrap_or(&req.source));
            if !path.is_absolute() {
                return Err(bad(format!(
                    "source {:?}: give an http(s):// URL, docker://REFERENCE or an absolute path on the server (krvirt image upload sends a local file)",
                    req.source
                )));
            }
            svc.blocking(move |s| s.import_file(&path, &opts)).await?
        }
    };
    svc.changed().await;
    Ok((StatusCode::CREATED, Json(json!(imp))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagRequest {
    source: String,
    target: String,
}

async fn tag(State(svc): State<Svc>, Json(req): Json<TagRequest>) -> Result<Json<Value>, Failure> {
    let target = parse_nt(&req.target)?;
    let t2 = target.clone();
    let digest = svc.blocking(move |s| s.tag(&req.source, &t2)).await?;
    svc.changed().await;
    Ok(Json(json!({"image": target.to_string(), "digest": digest})))
}

#[derive(Deserialize)]
struct RmQuery {
    all: Option<bool>,
}

async fn remove(
    State(svc): State<Svc>,
    Path(r): Path<String>,
    Query(q): Query<RmQuery>,
) -> Result<Json<Value>, Failure> {
    let nt = parse_nt(&r)?;
    let all = q.all.unwrap_or(false);
    let removed = svc.blocking(move |s| s.untag(&nt, all)).await?;
    svc.changed().await;
    Ok(Json(json!({"untagged": removed})))
}

async fn gc(State(svc): State<Svc>) -> Result<Json<Value>, Failure> {
    let roots = vec![svc.run_root.clone()];
    let report = svc.blocking(move |s| s.gc(&roots)).await?;
    svc.changed().await;
    Ok(Json(json!(report)))
}

async fn verify(State(svc): State<Svc>, Path(r): Path<String>) -> Result<Json<Value>, Failure> {
    let nt = parse_nt(&r)?;
    let res = svc
        .blocking(move |s| {
            let d = s.digest_of(&nt)?;
            s.verify(&d, true)?;
            Ok(d)
        })
        .await;
    svc.changed().await;
    let d = res?;
    Ok(Json(json!({"digest": d, "verified": true})))
}

/// The image service routes (merge into the API server's router).
pub fn routes(svc: Svc) -> Router {
    Router::new()
        .route(&format!("{PREFIX}/images"), get(list))
        .route(
            &format!("{PREFIX}/images/{{reference}}"),
            get(inspect).delete(remove),
        )
        .route(&format!("{PREFIX}/upload"), post(upload))
        .route(&format!("{PREFIX}/import"), post(import))
        .route(&format!("{PREFIX}/tag"), post(tag))
        .route(&format!("{PREFIX}/gc"), post(gc))
        .route(&format!("{PREFIX}/verify/{{reference}}"), post(verify))
        .route(
            "/apis/volumes.krvirt.io/v1/namespaces/{ns}/volumes/{name}/upload",
            post(volume_upload).put(volume_upload),
        )
        .layer(DefaultBodyLimit::disable())
        .with_state(svc)
}
