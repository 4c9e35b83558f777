//! Shared test fixtures: kinds shaped like KubeVirt's, a small admission
//! function, a real HTTP server on 127.0.0.1:0.
#![allow(dead_code)]

use std::sync::Arc;

use krvirt_api::{FieldCause, KindInfo, ValidationError};
use krvirt_server::{AppState, HostConnector, NoHostConnector, Registry};
use krvirt_store::Store;
use krvirt_store::embedded::EmbeddedStore;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub static KINDS: &[KindInfo] = &[
    KindInfo {
        group: "kubevirt.io",
        version: "v1",
        kind: "VirtualMachine",
        plural: "virtualmachines",
        singular: "virtualmachine",
        short_names: &["vm", "vms"],
        namespaced: true,
        subresources: &["start", "stop", "restart"],
        schema_name: "io.kubevirt.v1.VirtualMachine",
    },
    KindInfo {
        group: "kubevirt.io",
        version: "v1",
        kind: "VirtualMachineInstance",
        plural: "virtualmachineinstances",
        singular: "virtualmachineinstance",
        short_names: &["vmi", "vmis"],
        namespaced: true,
        subresources: &["pause", "unpause", "console", "consolelog"],
        schema_name: "io.kubevirt.v1.VirtualMachineInstance",
    },
    KindInfo {
        group: "krvirt.io",
        version: "v1",
        kind: "Host",
        plural: "hosts",
        singular: "host",
        short_names: &[],
        namespaced: false,
        subresources: &[],
        schema_name: "io.krvirt.v1.Host",
    },
];

pub fn vm_kind() -> &'static KindInfo {
    &KINDS[0]
}
pub fn vmi_kind() -> &'static KindInfo {
    &KINDS[1]
}
pub fn host_kind() -> &'static KindInfo {
    &KINDS[2]
}

fn cause(reason: &str, field: &str, message: &str) -> FieldCause {
    FieldCause {
        reason: reason.into(),
        message: message.into(),
        field: field.into(),
    }
}

/// Test admission: refuses unknown top-level fields and a few VM field
/// errors by path, defaults `spec.unschedulable` on Hosts, forbids
/// changing a VMI's `spec.domain`.
pub fn admit(kind: &KindInfo, obj: Value, old: Option<&Value>) -> Result<Value, ValidationError> {
    let mut causes = Vec::new();
    let Some(o) = obj.as_object() else {
        return Err(ValidationError::new(
            "FieldValueInvalid",
            "",
            "not an object",
        ));
    };
    for k in o.keys() {
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()) {
            causes.push(cause(
                "FieldValueNotSupported",
                k,
                &format!("unknown field \"{k}\""),
            ));
        }
    }
    let mut obj = obj;
    match kind.kind {
        "VirtualMachine" => match obj.get("spec") {
            Some(Value::Object(spec)) => {
                if !spec.get("template").is_some_and(Value::is_object) {
                    causes.push(cause(
                        "FieldValueRequired",
                        "spec.template",
                        "Required value",
                    ));
                }
                if let Some(rs) = spec.get("runStrategy") {
                    let ok = rs.as_str().is_some_and(|s| {
                        ["Always", "RerunOnFailure", "Manual", "Halted", "Once"].contains(&s)
                    });
                    if !ok {
                        causes.push(cause(
                            "FieldValueNotSupported",
                            "spec.runStrategy",
                            &format!("Unsupported value: {rs}"),
                        ));
                    }
                }
                if spec.get("running").is_some_and(|r| !r.is_boolean()) {
                    causes.push(cause(
                        "FieldValueInvalid",
                        "spec.running",
                        "must be a boolean",
                    ));
                }
            }
            _ => causes.push(cause("FieldValueRequired", "spec", "Required value")),
        },
        "VirtualMachineInstance" => {
            if let Some(old) = old
                && old.pointer("/spec/domain") != obj.pointer("/spec/domain")
            {
                causes.push(cause(
                    "FieldValueForbidden",
                    "spec.domain",
                    "field is immutable",
                ));
            }
        }
        "Host" => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("unschedulable").or_insert(json!(false));
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(obj)
    } else {
        Err(ValidationError { causes })
    }
}

/// Which kinds and admission a test server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// [`KINDS`] with the test [`admit`].
    Test,
    /// `krvirt_api::kinds()` with `krvirt_api::admit`.
    Real,
}

pub struct TestServer {
    pub base: String,
    pub registry: Registry,
    pub store: Arc<EmbeddedStore>,
    _dir: tempfile::TempDir,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with(Kinds::Test, Arc::new(NoHostConnector)).await
    }

    pub async fn real() -> Self {
        Self::with(Kinds::Real, Arc::new(NoHostConnector)).await
    }

    pub async fn with(kinds: Kinds, connector: Arc<dyn HostConnector>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(
            EmbeddedStore::open(&dir.path().join("state.db")).expect("open embedded store"),
        );
        let dyn_store = store.clone() as Arc<dyn Store>;
        let registry = match kinds {
            Kinds::Test => Registry::with_kinds(dyn_store, KINDS, admit),
            Kinds::Real => Registry::new(dyn_store),
        };
        let state = AppState::new(registry.clone(), connector);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(krvirt_server::serve(listener, state, async move {
            let _ = rx.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            registry,
            store,
            _dir: dir,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn vms(&self, ns: &str) -> String {
        self.url(&format!(
            "/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachines"
        ))
    }

    pub fn vm(&self, ns: &str, name: &str) -> String {
        format!("{}/{name}", self.vms(ns))
    }

    pub fn vmis(&self, ns: &str) -> String {
        self.url(&format!(
            "/apis/kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances"
        ))
    }

    pub fn vmi(&self, ns: &str, name: &str) -> String {
        format!("{}/{name}", self.vmis(ns))
    }

    pub fn sub(&self, plural: &str, ns: &str, name: &str, verb: &str) -> String {
        self.url(&format!(
            "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/{plural}/{name}/{verb}"
        ))
    }

    pub async fn post(&self, url: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(url).json(body).send().await.expect("POST");
        status_json(r).await
    }

    pub async fn put(&self, url: &str, body: &Value) -> (u16, Value) {
        let r = self.client.put(url).json(body).send().await.expect("PUT");
        status_json(r).await
    }

    pub async fn get(&self, url: &str) -> (u16, Value) {
        let r = self.client.get(url).send().await.expect("GET");
        status_json(r).await
    }

    pub async fn delete(&self, url: &str) -> (u16, Value) {
        let r = self.client.delete(url).send().await.expect("DELETE");
        status_json(r).await
    }

    pub async fn merge_patch(&self, url: &str, patch: &Value) -> (u16, Value) {
        let r = self
            .client
            .patch(url)
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .expect("PATCH");
        status_json(r).await
    }

    /// Create an object and return it, asserting 201.
    pub async fn create(&self, url: &str, body: &Value) -> Value {
        let (code, v) = self.post(url, body).await;
        assert_eq!(code, 201, "create failed: {v}");
        v
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

pub async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let code = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (code, v)
}

pub fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .expect("resourceVersion")
        .to_string()
}

pub fn vm_manifest(name: &str, run: Value) -> Value {
    let mut spec = json!({
        "template": {
            "metadata": {"labels": {"kubevirt.io/domain": name}},
            "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}
        }
    });
    if let (Some(o), Some(m)) = (spec.as_object_mut(), run.as_object()) {
        for (k, v) in m {
            o.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "labels": {"app": "test"}},
        "spec": spec,
    })
}

pub fn vmi_manifest(name: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name},
        "spec": {"domain": {"devices": {}}}
    })
}

/// Reads newline-delimited JSON watch events from a streaming response.
pub struct WatchReader {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
    pub ended: bool,
}

impl WatchReader {
    pub async fn open(client: &reqwest::Client, url: &str) -> Self {
        let r = client.get(url).send().await.expect("watch request");
        assert_eq!(r.status().as_u16(), 200, "watch {url}");
        assert_eq!(r.headers()["content-type"], "application/json");
        WatchReader {
            stream: Box::pin(r.bytes_stream()),
            buf: Vec::new(),
            ended: false,
        }
    }

    /// Next event, or `None` if the stream ended or nothing came within `wait`.
    pub async fn next_within(&mut self, wait: std::time::Duration) -> Option<Value> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(serde_json::from_slice(&line[..line.len() - 1]).expect("event JSON"));
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return None,
                Ok(None) => {
                    self.ended = true;
                }
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                Ok(Some(Err(e))) => panic!("watch stream error: {e}"),
            }
        }
    }

    /// Next event; panics after 5 s.
    pub async fn next(&mut self) -> Value {
        self.next_within(std::time::Duration::from_secs(5))
            .await
            .expect("expected a watch event within 5s")
    }

    /// Whether the server ends the stream within `wait` (after draining events).
    pub async fn ends_within(&mut self, wait: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if self
                .next_within(deadline - tokio::time::Instant::now())
                .await
                .is_none()
            {
                return self.ended;
            }
        }
        self.ended
    }
}

/// `(type, name)` of an event.
pub fn ev(e: &Value) -> (String, String) {
    (
        e["type"].as_str().unwrap_or_default().to_string(),
        e["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}
