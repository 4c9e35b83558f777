//! Prometheus `/metrics`: control-plane metrics (HTTP request latency,
//! store operation latency, controller work durations and queue depths) and
//! the object-derived `kubevirt_*` metrics (KubeVirt's virt-controller:
//! `kubevirt_vmi_phase_count`, `kubevirt_vmi_info`, `kubevirt_vm_info`),
//! plus whatever other [`MetricsSource`]s (the host agent) the process has.
//!
//! Output is the OpenMetrics text format (prometheus-client's encoder),
//! served as `application/openmetrics-text`, which Prometheus negotiates
//! and parses natively.
//!
//! Object-derived and per-VM figures are gathered at scrape time into a
//! per-scrape registry of custom collectors; the long-lived instruments
//! (histograms) live in one process-wide registry, [`control_plane`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use krvirt_store::{KeyValue, LeaseId, Revision, Store, WatchStream};
pub use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::registry::Registry;
use crate::selector::Selector;

/// Content type of the exposition (OpenMetrics text 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

type DepthFn = Box<dyn Fn() -> usize + Send + Sync>;

/// The process-wide control-plane instruments.
pub struct ControlPlaneMetrics {
    registry: PromRegistry,
    http: HistogramFamily,
    store: HistogramFamily,
    work: HistogramFamily,
    queues: Mutex<BTreeMap<String, DepthFn>>,
}

impl std::fmt::Debug for ControlPlaneMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneMetrics")
            .finish_non_exhaustive()
    }
}

static CONTROL_PLANE: LazyLock<ControlPlaneMetrics> = LazyLock::new(ControlPlaneMetrics::new);

/// The process-wide control-plane metrics (one API server, one set of
/// controllers per process, as Go's default registry).
pub fn control_plane() -> &'static ControlPlaneMetrics {
    &CONTROL_PLANE
}

impl ControlPlaneMetrics {
    fn new() -> Self {
        let mut registry = PromRegistry::default();
        let http = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let store = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let work = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "krvirt_apiserver_request_duration_seconds",
            "API request latency by Kubernetes verb, resource, subresource and HTTP code (for WATCH and streams: until the response starts).",
            http.clone(),
        );
        registry.register(
            "krvirt_store_request_duration_seconds",
            "Latency of store operations by operation and result.",
            store.clone(),
        );
        registry.register(
            "kubevirt_workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes.",
            work.clone(),
        );
        ControlPlaneMetrics {
            registry,
            http,
            store,
            work,
            queues: Mutex::new(BTreeMap::new()),
        }
    }

    /// Record one API request.
    pub fn observe_http(
        &self,
        verb: &str,
        resource: &str,
        subresource: &str,
        code: u16,
        secs: f64,
    ) {
        self.http
            .get_or_create(&vec![
                ("verb", verb.to_string()),
                ("resource", resource.to_string()),
                ("subresource", subresource.to_string()),
                ("code", code.to_string()),
            ])
            .observe(secs);
    }

    /// Record one store operation.
    pub fn observe_store(&self, operation: &str, ok: bool, secs: f64) {
        self.store
            .get_or_create(&vec![
                ("operation", operation.to_string()),
                ("result", if ok { "ok" } else { "error" }.to_string()),
            ])
            .observe(secs);
    }

    /// Record how long one work item (a reconcile) of queue `name` took.
    pub fn observe_work(&self, name: &str, secs: f64) {
        self.work
            .get_or_create(&vec![("name", name.to_string())])
            .observe(secs);
    }

    /// Report the depth of work queue `name` at scrape time through `depth`
    /// (a later registration under the same name replaces the earlier one).
    pub fn register_queue(&self, name: &str, depth: impl Fn() -> usize + Send + Sync + 'static) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), Box::new(depth));
    }

    fn queue_depths(&self) -> Vec<(String, usize)> {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, f)| (n.clone(), f()))
            .collect()
    }
}

/// Queue depths read at scrape time.
#[derive(Debug)]
struct QueueDepths(Vec<(String, usize)>);

impl Collector for QueueDepths {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut m = enc.encode_descriptor(
            "kubevirt_workqueue_depth",
            "Current depth of workqueue.",
            None,
            MetricType::Gauge,
        )?;
        for (name, depth) in &self.0 {
            let labels: Labels = vec![("name", name.clone())];
            ConstGauge::new(*depth as i64).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Something that contributes metrics gathered at scrape time (the host
/// agent's per-VM figures, for example).
#[async_trait]
pub trait MetricsSource: Send + Sync {
    async fn collect(&self) -> Box<dyn Collector>;
}

/// Render one scrape: the control-plane instruments (when `control_plane`),
/// the object-derived metrics of `registry` (when given) and every source.
pub async fn render(
    registry: Option<&Registry>,
    sources: &[Arc<dyn MetricsSource>],
    control_plane: bool,
) -> String {
    let mut scrape = PromRegistry::default();
    if let Some(r) = registry {
        scrape.register_collector(Box::new(ObjectStats::gather(r).await));
    }
    let collected = futures::future::join_all(sources.iter().map(|s| s.collect())).await;
    for c in collected {
        scrape.register_collector(c);
    }
    let mut out = String::new();
    let cp = self::control_plane();
    if control_plane {
        scrape.register_collector(Box::new(QueueDepths(cp.queue_depths())));
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &cp.registry);
    }
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &scrape);
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

fn exposition(body: String) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// The API server's `/metrics` handler.
pub(crate) async fn handler(State(st): State<crate::AppState>) -> Response {
    exposition(render(Some(&st.registry), &st.metrics_sources, true).await)
}

/// A router serving only `GET /metrics` from `sources` (a standalone agent's
/// `--metrics-listen`).
pub fn metrics_router(sources: Vec<Arc<dyn MetricsSource>>) -> axum::Router {
    let sources = Arc::new(sources);
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let sources = sources.clone();
            async move { exposition(render(None, &sources, false).await) }
        }),
    )
}

/// Serve [`metrics_router`] on `listener` until `shutdown` completes.
pub async fn serve_metrics<F>(
    listener: TcpListener,
    sources: Vec<Arc<dyn MetricsSource>>,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, metrics_router(sources))
        .with_graceful_shutdown(shutdown)
        .await
}

// ----- HTTP request metrics ---------------------------------------------------

/// Kubernetes verb, resource and subresource of a request, from its method,
/// the route template it matched (`None`: no route) and its query string.
/// Templates are finite, so the label values are bounded.
pub fn classify(method: &str, template: Option<&str>, query: &str) -> (String, String, String) {
    let Some(t) = template else {
        return (method.to_string(), "<unmatched>".into(), String::new());
    };
    let segs: Vec<&str> = t.split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", _v, rest @ ..] => rest,
        ["apis", _g, _v, rest @ ..] => rest,
        _ => return (method.to_string(), t.to_string(), String::new()),
    };
    let rest = match rest {
        ["namespaces", "{namespace}", tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named, sub) = match rest {
        [] => (String::new(), false, String::new()),
        [plural] => (plural.to_string(), false, String::new()),
        [plural, _name] => (plural.to_string(), true, String::new()),
        [plural, _name, sub, ..] => (plural.to_string(), true, sub.to_string()),
    };
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match method {
        "GET" if watch => "WATCH",
        "GET" if named || resource.is_empty() => "GET",
        "GET" => "LIST",
        "POST" => "CREATE",
        "PUT" => "UPDATE",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        other => other,
    };
    (verb.to_string(), resource, sub)
}

/// axum middleware recording every request in
/// `krvirt_apiserver_request_duration_seconds`.
pub async fn track_http(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let query = req.uri().query().unwrap_or_default().to_string();
    let resp = next.run(req).await;
    let (verb, resource, sub) = classify(&method, template.as_deref(), &query);
    control_plane().observe_http(
        &verb,
        &resource,
        &sub,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

// ----- store metrics ----------------------------------------------------------

/// A [`Store`] that records the latency of every operation of the store it
/// wraps in `krvirt_store_request_duration_seconds`.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
}

impl InstrumentedStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        InstrumentedStore { inner }
    }
}

async fn timed<T, E>(op: &str, f: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let started = Instant::now();
    let r = f.await;
    control_plane().observe_store(op, r.is_ok(), started.elapsed().as_secs_f64());
    r
}

#[async_trait]
impl Store for InstrumentedStore {
    async fn get(&self, key: &str) -> krvirt_store::Result<Option<KeyValue>> {
        timed("get", self.inner.get(key)).await
    }
    async fn list(&self, prefix: &str) -> krvirt_store::Result<(Vec<KeyValue>, Revision)> {
        timed("list", self.inner.list(prefix)).await
    }
    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> krvirt_store::Result<KeyValue> {
        timed("create", self.inner.create(key, value, lease)).await
    }
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
        lease: Option<LeaseId>,
    ) -> krvirt_store::Result<KeyValue> {
        timed("update", self.inner.update(key, value, expected, lease)).await
    }
    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> krvirt_store::Result<KeyValue> {
        timed("delete", self.inner.delete(key, expected)).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> krvirt_store::Result<WatchStream> {
        timed("watch", self.inner.watch(prefix, from)).await
    }
    async fn revision(&self) -> krvirt_store::Result<Revision> {
        timed("revision", self.inner.revision()).await
    }
    async fn lease_grant(&self, ttl_secs: i64) -> krvirt_store::Result<LeaseId> {
        timed("lease_grant", self.inner.lease_grant(ttl_secs)).await
    }
    async fn lease_keepalive(&self, lease: LeaseId) -> krvirt_store::Result<i64> {
        timed("lease_keepalive", self.inner.lease_keepalive(lease)).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> krvirt_store::Result<()> {
        timed("lease_revoke", self.inner.lease_revoke(lease)).await
    }
    async fn compact(&self, revision: Revision) -> krvirt_store::Result<()> {
        timed("compact", self.inner.compact(revision)).await
    }
}

// ----- object-derived metrics (KubeVirt's virt-controller) --------------------

/// VMIs and VMs as read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct ObjectStats {
    pub vmis: Vec<Value>,
    pub vms: Vec<Value>,
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or_default()
}

fn annotation<'a>(meta: &'a Value, key: &str) -> &'a str {
    meta.get("annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `os`, `workload`, `flavor` from the `vm.kubevirt.io/*` annotations.
fn system_info(meta: &Value) -> [(&'static str, String); 3] {
    [
        ("os", annotation(meta, "vm.kubevirt.io/os").to_string()),
        (
            "workload",
            annotation(meta, "vm.kubevirt.io/workload").to_string(),
        ),
        (
            "flavor",
            annotation(meta, "vm.kubevirt.io/flavor").to_string(),
        ),
    ]
}

fn first_nonempty<'a>(a: &'a str, b: &'a str) -> &'a str {
    if a.is_empty() { b } else { a }
}

/// VM printableStatus -> KubeVirt's `status_group`.
fn status_group(status: &str) -> &'static str {
    match status {
        "Provisioning" | "Starting" | "WaitingForVolumeBinding" => "starting",
        "Running" => "running",
        "Migrating" => "migrating",
        "Stopped" | "Paused" | "Stopping" | "Terminating" => "non_running",
        "CrashLoopBackOff" | "Unknown" | "ErrorUnschedulable" | "ErrImagePull"
        | "ImagePullBackOff" | "ErrorPvcNotFound" | "DataVolumeError" => "error",
        _ => "<unknown>",
    }
}

impl ObjectStats {
    /// List VMIs and VMs now. A failed list leaves its metrics out.
    pub async fn gather(registry: &Registry) -> ObjectStats {
        let list = |plural: &'static str| async move {
            let Some(kind) = krvirt_api::find_kind(plural) else {
                return Vec::new();
            };
            registry
                .list(kind, None, &Selector::everything())
                .await
                .map(|(items, _)| items)
                .unwrap_or_default()
        };
        let (vmis, vms) = tokio::join!(list("virtualmachineinstances"), list("virtualmachines"));
        ObjectStats { vmis, vms }
    }

    fn vmi_info(&self) -> Vec<Labels> {
        self.vmis
            .iter()
            .map(|vmi| {
                let meta = vmi.get("metadata").unwrap_or(&Value::Null);
                let mut l: Labels = vec![
                    ("node", s(vmi, "/status/nodeName").to_string()),
                    ("namespace", s(vmi, "/metadata/namespace").to_string()),
                    ("name", s(vmi, "/metadata/name").to_string()),
                    ("phase", s(vmi, "/status/phase").to_ascii_lowercase()),
                ];
                l.extend(system_info(meta));
                l.push((
                    "instance_type",
                    first_nonempty(
                        annotation(meta, "kubevirt.io/instancetype-name"),
                        annotation(meta, "kubevirt.io/cluster-instancetype-name"),
                    )
                    .to_string(),
                ));
                l.push((
                    "preference",
                    first_nonempty(
                        annotation(meta, "kubevirt.io/preference-name"),
                        annotation(meta, "kubevirt.io/cluster-preference-name"),
                    )
                    .to_string(),
                ));
                l
            })
            .collect()
    }

    fn vm_info(&self) -> Vec<Labels> {
        self.vms
            .iter()
            .map(|vm| {
                let tmeta = vm
                    .pointer("/spec/template/metadata")
                    .unwrap_or(&Value::Null);
                let status = s(vm, "/status/printableStatus");
                let mut l: Labels = vec![
                    ("name", s(vm, "/metadata/name").to_string()),
                    ("namespace", s(vm, "/metadata/namespace").to_string()),
                ];
                l.extend(system_info(tmeta));
                l.push((
                    "instance_type",
                    s(vm, "/spec/instancetype/name").to_string(),
                ));
                l.push(("preference", s(vm, "/spec/preference/name").to_string()));
                l.push(("status", status.to_string()));
                l.push(("status_group", status_group(status).to_string()));
                l
            })
            .collect()
    }
}

const PHASE_COUNT_LABELS: [&str; 7] = [
    "node",
    "phase",
    "os",
    "workload",
    "flavor",
    "instance_type",
    "preference",
];

fn info_gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ObjectStats {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vmi_info = self.vmi_info();
        // kubevirt_vmi_phase_count = KubeVirt's recording rule
        // `sum by (node, phase, os, workload, flavor, instance_type, preference) (kubevirt_vmi_info)`,
        // computed here so no rule has to be installed.
        let mut counts: BTreeMap<Vec<String>, i64> = BTreeMap::new();
        for l in &vmi_info {
            let key = PHASE_COUNT_LABELS
                .iter()
                .map(|k| {
                    l.iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect();
            *counts.entry(key).or_default() += 1;
        }
        let phase_rows: Vec<(Labels, i64)> = counts
            .into_iter()
            .map(|(vals, n)| (PHASE_COUNT_LABELS.iter().copied().zip(vals).collect(), n))
            .collect();
        info_gauges(
            &mut enc,
            "kubevirt_vmi_phase_count",
            "Sum of VMIs per phase and node. `phase` can be one of the following: [`Pending`, `Scheduling`, `Scheduled`, `Running`, `Succeeded`, `Failed`, `Unknown`].",
            &phase_rows,
        )?;
        let rows: Vec<(Labels, i64)> = vmi_info.into_iter().map(|l| (l, 1)).collect();
        info_gauges(
            &mut enc,
            "kubevirt_vmi_info",
            "Information about VirtualMachineInstances.",
            &rows,
        )?;
        let rows: Vec<(Labels, i64)> = self.vm_info().into_iter().map(|l| (l, 1)).collect();
        info_gauges(
            &mut enc,
            "kubevirt_vm_info",
            "Information about Virtual Machines.",
            &rows,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encode(c: impl Collector) -> String {
        let mut reg = PromRegistry::default();
        reg.register_collector(Box::new(c));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    #[test]
    fn verbs_and_resources() {
        let ns = "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines";
        let c = |m: &str, t: Option<&str>, q: &str| classify(m, t, q);
        let t = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
        assert_eq!(c("GET", Some(ns), ""), t("LIST", "virtualmachines", ""));
        assert_eq!(
            c("GET", Some(ns), "labelSelector=a&watch=true"),
            t("WATCH", "virtualmachines", "")
        );
        assert_eq!(c("POST", Some(ns), ""), t("CREATE", "virtualmachines", ""));
        let obj = format!("{ns}/{{name}}");
        assert_eq!(c("GET", Some(&obj), ""), t("GET", "virtualmachines", ""));
        assert_eq!(
            c("PATCH", Some(&obj), ""),
            t("PATCH", "virtualmachines", "")
        );
        assert_eq!(
            c("PUT", Some(&format!("{obj}/status")), ""),
            t("UPDATE", "virtualmachines", "status")
        );
        assert_eq!(
            c(
                "PUT",
                Some(
                    "/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}/start"
                ),
                ""
            ),
            t("UPDATE", "virtualmachines", "start")
        );
        // cluster-scoped kinds and the namespaces kind itself
        assert_eq!(
            c("GET", Some("/apis/krvirt.io/v1/hosts/{name}"), ""),
            t("GET", "hosts", "")
        );
        assert_eq!(
            c("GET", Some("/api/v1/namespaces/{name}"), ""),
            t("GET", "namespaces", "")
        );
        assert_eq!(
            c("GET", Some("/api/v1/namespaces"), ""),
            t("LIST", "namespaces", "")
        );
        assert_eq!(c("GET", Some("/apis"), ""), t("GET", "/apis", ""));
        assert_eq!(c("GET", Some("/apis/kubevirt.io/v1"), ""), t("GET", "", ""));
        assert_eq!(c("GET", Some("/healthz"), ""), t("GET", "/healthz", ""));
        // unmatched paths do not leak arbitrary URLs into labels
        assert_eq!(c("GET", None, ""), t("GET", "<unmatched>", ""));
    }

    fn vmi(name: &str, node: &str, phase: &str, os: Option<&str>) -> Value {
        let mut v = json!({
            "metadata": {"name": name, "namespace": "default", "annotations": {}},
            "status": {"nodeName": node, "phase": phase}
        });
        if let Some(os) = os {
            v["metadata"]["annotations"]["vm.kubevirt.io/os"] = json!(os);
        }
        v
    }

    #[test]
    fn phase_count_and_info() {
        let stats = ObjectStats {
            vmis: vec![
                vmi("a", "h1", "Running", Some("fedora")),
                vmi("b", "h1", "Running", Some("fedora")),
                vmi("c", "h1", "Running", None),
                vmi("d", "", "Pending", None),
            ],
            vms: vec![json!({
                "metadata": {"name": "a", "namespace": "default"},
                "spec": {"template": {"metadata": {"annotations": {"vm.kubevirt.io/workload": "server"}}}},
                "status": {"printableStatus": "Running"}
            })],
        };
        let out = encode(stats);
        for line in [
            "# TYPE kubevirt_vmi_phase_count gauge",
            r#"kubevirt_vmi_phase_count{node="h1",phase="running",os="fedora",workload="",flavor="",instance_type="",preference=""} 2"#,
            r#"kubevirt_vmi_phase_count{node="h1",phase="running",os="",workload="",flavor="",instance_type="",preference=""} 1"#,
            r#"kubevirt_vmi_phase_count{node="",phase="pending",os="",workload="",flavor="",instance_type="",preference=""} 1"#,
            r#"kubevirt_vmi_info{node="h1",namespace="default",name="a",phase="running",os="fedora",workload="",flavor="",instance_type="",preference=""} 1"#,
            r#"kubevirt_vm_info{name="a",namespace="default",os="",workload="server",flavor="",instance_type="",preference="",status="Running",status_group="running"} 1"#,
        ] {
            assert!(out.contains(line), "missing {line}\n{out}");
        }
        assert_eq!(out.matches("kubevirt_vmi_info{").count(), 4, "{out}");
        assert_eq!(encode(ObjectStats::default()), "# EOF\n");
    }

    #[test]
    fn instruments_and_queue_depths() {
        let cp = control_plane();
        cp.observe_http("LIST", "unit-test-things", "", 200, 0.003);
        cp.observe_store("unit-test-op", true, 0.0002);
        cp.observe_work("unit-test-queue", 0.02);
        cp.register_queue("unit-test-queue", || 7);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt.block_on(render(None, &[], true));
        for line in [
            "# TYPE krvirt_apiserver_request_duration_seconds histogram",
            r#"krvirt_apiserver_request_duration_seconds_bucket{le="0.005",verb="LIST",resource="unit-test-things",subresource="",code="200"} 1"#,
            r#"krvirt_apiserver_request_duration_seconds_count{verb="LIST",resource="unit-test-things",subresource="",code="200"} 1"#,
            r#"krvirt_store_request_duration_seconds_bucket{le="0.0005",operation="unit-test-op",result="ok"} 1"#,
            r#"kubevirt_workqueue_work_duration_seconds_sum{name="unit-test-queue"} 0.02"#,
            r#"kubevirt_workqueue_depth{name="unit-test-queue"} 7"#,
        ] {
            assert!(out.contains(line), "missing {line}\n{out}");
        }
        assert_eq!(out.matches("# EOF").count(), 1);
        assert!(out.ends_with("# EOF\n"));
    }
}
