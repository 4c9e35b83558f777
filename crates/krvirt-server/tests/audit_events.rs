//! The audit log over real HTTP (request ids, what is logged, tamper
//! detection) and server-side event recording with aggregation and expiry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use krvirt_server::audit::{AuditLog, read_records, verify_file};
use krvirt_server::events::{EventRecorder, expire_events, write_event};
use krvirt_server::{AppState, NoHostConnector, Registry, Selector};
use krvirt_store::embedded::EmbeddedStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    registry: Registry,
    audit: AuditLog,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("state.db")).unwrap();
    let registry = Registry::new(Arc::new(store));
    let audit = AuditLog::open(&dir.path().join("audit.log")).unwrap();
    let state =
        AppState::new(registry.clone(), Arc::new(NoHostConnector)).with_audit(audit.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        krvirt_server::serve(listener, state, async move { s.cancelled().await }).await
    });
    Server {
        base,
        registry,
        audit,
        stop,
        _dir: dir,
    }
}

fn vm(name: &str) -> Value {
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
           "metadata": {"name": name},
           "spec": {"runStrategy": "Halted", "template": {"spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}}}}})
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-request-id")
        .expect("every response carries X-Request-Id")
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn mutating_requests_are_audited_with_request_ids_and_gets_are_not() {
    let s = start().await;
    let http = reqwest::Client::new();
    let vms = format!(
        "{}/apis/kubevirt.io/v1/namespaces/default/virtualmachines",
        s.base
    );
    let r = http.post(&vms).json(&vm("a")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let create_id = request_id(&r);
    let r = http.get(format!("{vms}/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let get_id = request_id(&r);
    let r = http.post(&vms).json(&vm("a")).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let conflict_id = request_id(&r);
    let r = http
        .patch(format!("{vms}/a"))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"metadata":{"labels":{"x":"y"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .put(format!(
            "{}/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines/a/start",
            s.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = http.delete(format!("{vms}/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(&vms).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(create_id, get_id);

    s.audit.sync().await.unwrap();
    let recs = read_records(s.audit.path()).unwrap();
    let verbs: Vec<(&str, u16)> = recs
        .iter()
        .map(|r| (r.entry.verb.as_str(), r.entry.code))
        .collect();
    assert_eq!(
        verbs,
        [
            ("create", 201),
            ("create", 409),
            ("patch", 200),
            ("start", 202),
            ("delete", 200)
        ]
    );
    assert_eq!(recs[0].entry.request_id, create_id);
    assert_eq!(recs[1].entry.request_id, conflict_id);
    assert!(recs.iter().all(|r| r.entry.request_id != get_id));
    let first = &recs[0].entry;
    assert_eq!(first.user, "anonymous");
    assert!(first.source.starts_with("127.0.0.1:"), "{}", first.source);
    assert_eq!(
        (
            first.group.as_str(),
            first.resource.as_str(),
            first.namespace.as_str()
        ),
        ("kubevirt.io", "virtualmachines", "default")
    );
    assert_eq!(recs[2].entry.name, "a");
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let v = verify_file(s.audit.path()).unwrap();
    assert_eq!((v.valid, v.first_bad), (5, None));
}

fn write_log(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("audit.log");
    let log = AuditLog::open(&path).unwrap();
    for i in 0..n {
        log.append(krvirt_server::audit::AuditEntry {
            request_id: format!("req-{i}"),
            verb: "create".into(),
            method: "POST".into(),
            path: format!("/api/v1/namespaces/default/events/e{i}"),
            code: 201,
            ..Default::default()
        })
        .unwrap();
    }
    futures::executor::block_on(log.sync()).unwrap();
    path
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn save(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn tampering_is_detected_and_the_first_bad_record_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5);
    let good = lines(&path);
    assert_eq!(verify_file(&path).unwrap().first_bad, None);

    // One byte edited in record 3 (201 -> 200).
    let mut edited = good.clone();
    edited[2] = edited[2].replace("\"code\":201", "\"code\":200");
    assert_ne!(edited[2], good[2]);
    save(&path, &edited);
    let v = verify_file(&path).unwrap();
    let bad = v.first_bad.expect("edit detected");
    assert_eq!((bad.line, bad.seq, v.valid), (3, Some(3), 2), "{bad:?}");
    assert!(bad.problem.contains("edited"), "{bad:?}");

    // Record 2 removed: the record now on line 2 (seq 3) does not fit.
    let mut removed = good.clone();
    removed.remove(1);
    save(&path, &removed);
    let bad = verify_file(&path)
        .unwrap()
        .first_bad
        .expect("removal detected");
    assert_eq!((bad.line, bad.seq), (2, Some(3)), "{bad:?}");

    // Records 4 and 5 swapped.
    let mut swapped = good.clone();
    swapped.swap(3, 4);
    save(&path, &swapped);
    let bad = verify_file(&path)
        .unwrap()
        .first_bad
        .expect("swap detected");
    assert_eq!((bad.line, bad.seq), (4, Some(5)), "{bad:?}");

    // A record rewritten with a recomputed hash still breaks the chain.
    let mut forged = good.clone();
    let body = forged[1]
        .split_once(",\"record\":")
        .unwrap()
        .1
        .strip_suffix('}')
        .unwrap()
        .replace("req-1", "req-X");
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    forged[1] = format!("{{\"hash\":\"{hash}\",\"record\":{body}}}");
    save(&path, &forged);
    let bad = verify_file(&path)
        .unwrap()
        .first_bad
        .expect("forgery detected");
    assert_eq!((bad.line, bad.seq), (3, Some(3)), "{bad:?}");

    // Restored: valid, and reopening continues the chain.
    save(&path, &good);
    let log = AuditLog::open(&path).unwrap();
    log.append(Default::default()).unwrap();
    futures::executor::block_on(log.sync()).unwrap();
    let v = verify_file(&path).unwrap();
    assert_eq!((v.valid, v.first_bad), (6, None));
}

#[tokio::test]
async fn repeated_events_aggregate_and_old_ones_expire() {
    let s = start().await;
    let vm_kind = krvirt_api::find_kind("vm").unwrap();
    let ev_kind = krvirt_api::find_kind("events").unwrap();
    let obj = s
        .registry
        .create(vm_kind, "default", vm("web"))
        .await
        .unwrap();
    let rec = EventRecorder::new(s.registry.clone(), "test", Some("h1"));
    for _ in 0..3 {
        rec.record(&obj, "Warning", "Failed", "it broke");
    }
    rec.record(&obj, "Normal", "Started", "it runs");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let items = loop {
        let (items, _) = s
            .registry
            .list(
                ev_kind,
                Some("default"),
                &Selector::fields("involvedObject.name=web").unwrap(),
            )
            .await
            .unwrap();
        let total: i64 = items.iter().filter_map(|e| e["count"].as_i64()).sum();
        if total == 4 || tokio::time::Instant::now() > deadline {
            break items;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(items.len(), 2, "{items:#?}");
    let failed = items.iter().find(|e| e["reason"] == "Failed").unwrap();
    assert_eq!(failed["count"], 3);
    assert_eq!(failed["type"], "Warning");
    assert_eq!(failed["involvedObject"]["uid"], obj["metadata"]["uid"]);
    assert_eq!(failed["involvedObject"]["kind"], "VirtualMachine");
    assert_eq!(failed["source"]["component"], "test");
    assert_eq!(failed["source"]["host"], "h1");
    assert_eq!(rec.dropped(), 0);

    // Over HTTP, per object, like `kubectl get events --field-selector`.
    let r: Value = reqwest::get(format!(
        "{}/api/v1/namespaces/default/events?fieldSelector=involvedObject.name=web,reason=Started",
        s.base
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(r["items"].as_array().unwrap().len(), 1, "{r}");

    // An hour-old event expires; the per-object cap keeps the newest.
    let mut old: krvirt_api::event::Event = serde_json::from_value(failed.clone()).unwrap();
    old.metadata = krvirt_api::meta::ObjectMeta::named(Some("default"), "web.old");
    old.first_timestamp = Some("2000-01-01T00:00:00Z".into());
    old.last_timestamp = old.first_timestamp.clone();
    write_event(&s.registry, &old).await.unwrap();
    let n = expire_events(&s.registry, Duration::from_secs(3600), 100)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let n = expire_events(&s.registry, Duration::from_secs(3600), 1)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let (left, _) = s
        .registry
        .list(ev_kind, None, &Selector::everything())
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
}
