//! Every server replica on one store signs with one CA, kept in the store
//! (`tls::sync_cluster_ca`): an agent or client that trusts one replica
//! trusts them all.

use krvirt_server::tls::{CLUSTER_CA_KEY, Pki, TlsError, sync_cluster_ca};
use krvirt_store::Store;
use krvirt_store::embedded::EmbeddedStore;

fn names() -> Vec<String> {
    vec!["127.0.0.1".to_string()]
}

fn ca_of(dir: &std::path::Path) -> (String, String) {
    (
        std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
        std::fs::read_to_string(dir.join("ca.key")).unwrap(),
    )
}

#[tokio::test]
async fn replicas_on_one_store_share_one_ca_and_trust_each_others_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join("state.db")).unwrap();
    let (a, b) = (tmp.path().join("a/pki"), tmp.path().join("b/pki"));
    sync_cluster_ca(&store, &a).await.unwrap();
    let pki_a = Pki::ensure(&a, &names()).unwrap();
    sync_cluster_ca(&store, &b).await.unwrap();
    let pki_b = Pki::ensure(&b, &names()).unwrap();
    assert_eq!(ca_of(&a), ca_of(&b), "both replicas hold the cluster's CA");
    assert!(store.get(CLUSTER_CA_KEY).await.unwrap().is_some());
    assert_eq!(pki_a.ca_fingerprint(), pki_b.ca_fingerprint());
    // Each replica has its own server certificate, signed by the one CA:
    // a client trusting replica a's CA completes a TLS handshake with b.
    assert_ne!(pki_a.server_cert_pem, pki_b.server_cert_pem);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki_b.server_config().unwrap());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in krvirt_server::tls::pem_certs(&pki_a.ca_cert_pem).unwrap() {
        roots.add(c).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(krvirt_server::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector
        .connect(name, tcp)
        .await
        .expect("a client trusting replica a's CA accepts replica b");
    server.await.unwrap().unwrap();
    // Restarting is a no-op.
    sync_cluster_ca(&store, &a).await.unwrap();
    assert_eq!(ca_of(&a), ca_of(&b));
}

#[tokio::test]
async fn a_data_dir_from_before_offers_its_ca_and_a_foreign_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&tmp.path().join("state.db")).unwrap();
    // A data dir made before the CA was kept in the store: its CA (and the
    // certificates it signed) stay; the store takes it.
    let old = tmp.path().join("old/pki");
    let before = Pki::ensure(&old, &names()).unwrap();
    let server_cert = before.server_cert_pem.clone();
    sync_cluster_ca(&store, &old).await.unwrap();
    assert_eq!(
        Pki::ensure(&old, &names()).unwrap().server_cert_pem,
        server_cert
    );
    let stored: serde_json::Value =
        serde_json::from_slice(&store.get(CLUSTER_CA_KEY).await.unwrap().unwrap().value).unwrap();
    assert_eq!(stored["cert"].as_str().unwrap(), before.ca_cert_pem);
    // Another server with its own CA on the same store is refused, naming
    // both fingerprints; its files are left alone.
    let other = tmp.path().join("other/pki");
    let theirs = Pki::ensure(&other, &names()).unwrap();
    let err = sync_cluster_ca(&store, &other).await.unwrap_err();
    assert!(matches!(err, TlsError::ForeignCa { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&theirs.ca_fingerprint()) && msg.contains(&before.ca_fingerprint()),
        "{msg}"
    );
    assert_eq!(ca_of(&other).0, theirs.ca_cert_pem);
    // A malformed entry is an error naming the store, not a panic.
    let store2 = EmbeddedStore::open(&tmp.path().join("state2.db")).unwrap();
    store2
        .create(CLUSTER_CA_KEY, b"{}".to_vec(), None)
        .await
        .unwrap();
    let err = sync_cluster_ca(&store2, &tmp.path().join("new/pki"))
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::BadClusterCa(_)), "{err}");
}
