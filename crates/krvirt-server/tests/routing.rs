//! Router construction for unusual kind sets (core group, a cluster-scoped
//! `namespaces` kind next to namespaced kinds).

use std::sync::Arc;

use krvirt_api::KindInfo;
use krvirt_server::{AppState, NoHostConnector, Registry};
use krvirt_store::embedded::EmbeddedStore;
use serde_json::{Value, json};

static CORE: &[KindInfo] = &[
    KindInfo {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        subresources: &[],
        schema_name: "Namespace",
    },
    KindInfo {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        subresources: &[],
        schema_name: "Event",
    },
];

fn admit_any(
    _: &KindInfo,
    obj: Value,
    _: Option<&Value>,
) -> Result<Value, krvirt_api::ValidationError> {
    Ok(obj)
}

#[tokio::test]
async fn core_group_with_namespaces_kind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.db")).unwrap());
    let registry = Registry::with_kinds(store, CORE, admit_any);
    let state = AppState::new(registry, Arc::new(NoHostConnector));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(krvirt_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    let c = reqwest::Client::new();

    let r = c
        .post(format!("{base}/api/v1/namespaces"))
        .json(&json!({"metadata": {"name": "team-a"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = c
        .get(format!("{base}/api/v1/namespaces/team-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["kind"], "Namespace");
    let r = c
        .put(format!("{base}/api/v1/namespaces/team-a/status"))
        .json(&json!({"metadata": {"name": "team-a"}, "status": {"phase": "Active"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = c
        .post(format!("{base}/api/v1/namespaces/team-a/events"))
        .json(&json!({"metadata": {"name": "e1"}, "reason": "Test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = c
        .get(format!("{base}/api/v1/namespaces/team-a/events/e1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = c.get(format!("{base}/api/v1/events")).send().await.unwrap();
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["kind"], "EventList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let disc: Value = c
        .get(format!("{base}/api/v1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(disc["resources"].as_array().unwrap().len(), 4);
    // no kubevirt kinds: no subresource group
    let apis: Value = c
        .get(format!("{base}/apis"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(apis["groups"], json!([]));

    let _ = tx.send(());
    server.await.unwrap().unwrap();
}
