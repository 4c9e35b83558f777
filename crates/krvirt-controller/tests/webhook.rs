//! Webhooks against a real receiver (a small axum server): signed
//! deliveries of selected events, retries after failures, status counters.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use krvirt_controller::webhook::{WebhookController, verify};
use krvirt_server::Registry;
use krvirt_server::events::EventRecorder;
use krvirt_store::embedded::EmbeddedStore;
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    /// Answer 503 to this many requests first.
    fail_first: Arc<Mutex<u32>>,
    attempts: Arc<Mutex<u32>>,
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    *r.attempts.lock().unwrap() += 1;
    {
        let mut f = r.fail_first.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    r.got.lock().unwrap().push((headers, body));
    StatusCode::NO_CONTENT
}

async fn receiver(fail_first: u32) -> (String, Receiver) {
    let r = Receiver::default();
    *r.fail_first.lock().unwrap() = fail_first;
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(r.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, r)
}

async fn until<F: Fn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hook(name: &str, url: &str, secret: &str, reasons: &[&str]) -> Value {
    json!({"apiVersion": "krvirt.io/v1", "kind": "Webhook",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"url": url, "secret": secret, "eventReasons": reasons, "maxAttempts": 4}})
}

fn involved(name: &str) -> Value {
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
           "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")}})
}

#[tokio::test]
async fn signed_selected_events_are_delivered_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new(Arc::new(
        EmbeddedStore::open(&dir.path().join("state.db")).unwrap(),
    ));
    let wk = krvirt_api::find_kind("webhooks").unwrap();
    let ek = krvirt_api::find_kind("events").unwrap();
    let (url_ok, ok) = receiver(0).await;
    let (url_flaky, flaky) = receiver(2).await;
    registry
        .create(wk, "default", hook("ok", &url_ok, "s3cret", &["Started"]))
        .await
        .unwrap();
    registry
        .create(wk, "default", hook("flaky", &url_flaky, "other", &[]))
        .await
        .unwrap();
    let ctl = tokio::spawn(WebhookController::new(registry.clone(), wk, ek).run());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let rec = EventRecorder::new(registry.clone(), "test", None);
    rec.record(
        &involved("web"),
        "Normal",
        "Stopped",
        "not selected by `ok`",
    );
    rec.record(&involved("web"), "Normal", "Started", "it runs");

    until("the selected event reaches the receiver", || {
        !ok.got.lock().unwrap().is_empty()
    })
    .await;
    until("the flaky receiver gets both events after retries", || {
        flaky.got.lock().unwrap().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = ok.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "only Started is selected");
    let (headers, body) = &got[0];
    let ev: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(ev["reason"], "Started");
    assert_eq!(ev["involvedObject"]["name"], "web");
    let ts = headers["x-krvirt-timestamp"].to_str().unwrap();
    let sig = headers["x-krvirt-signature"].to_str().unwrap();
    let age = chrono::Utc::now().timestamp() - ts.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp {ts} is now");
    // Recomputed independently: HMAC-SHA256(secret, "{ts}.{body}").
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    assert_eq!(
        sig,
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    assert!(verify(b"s3cret", ts, body, sig));
    assert!(
        !verify(b"wrong", ts, body, sig),
        "a wrong secret does not verify"
    );
    let flaky_sig = flaky.got.lock().unwrap()[0].0["x-krvirt-signature"]
        .to_str()
        .unwrap()
        .to_string();
    assert_ne!(flaky_sig, "", "every delivery is signed");
    assert_eq!(
        *flaky.attempts.lock().unwrap(),
        4,
        "2 failures, then 2 deliveries"
    );

    // Status counters.
    let mut status = Value::Null;
    for _ in 0..100 {
        status = registry.get(wk, "default", "flaky").await.unwrap()["status"].clone();
        if status["delivered"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["delivered"], 2, "{status}");
    assert_eq!(status["failed"], 0, "{status}");
    assert!(
        status["lastError"].as_str().unwrap_or("").contains("503"),
        "{status}"
    );

    // A receiver that never answers 2xx: counted as failed after maxAttempts.
    let (url_dead, dead) = receiver(u32::MAX).await;
    registry
        .create(wk, "default", {
            let mut h = hook("dead", &url_dead, "x", &["Failed"]);
            h["spec"]["maxAttempts"] = json!(2);
            h
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    rec.record(&involved("db"), "Warning", "Failed", "boom");
    let mut status = Value::Null;
    for _ in 0..200 {
        status = registry.get(wk, "default", "dead").await.unwrap()["status"].clone();
        if status["failed"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["failed"], 1, "{status}");
    assert_eq!(*dead.attempts.lock().unwrap(), 2);
    ctl.abort();
}
