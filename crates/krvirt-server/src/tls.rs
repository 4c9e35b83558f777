//! TLS for the API listener: a CA made at first start (`DATA/pki/ca.crt`,
//! `ca.key`), a server certificate it signs (`server.crt`, `server.key`,
//! re-issued when the requested names change), client certificates for
//! agents (signed from a CSR), and an axum listener that completes TLS
//! handshakes off the accept loop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::serve::{IncomingStream, Listener};
use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    date_time_ymd,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// Errors of the PKI and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid certificate request: {0}")]
    BadRequest(String),
    #[error("the cluster CA in the store: {0}")]
    Store(#[from] krvirt_store::StoreError),
    #[error(
        "this server's CA ({local}, fingerprint {local_fp}) is not the cluster's CA \
         (fingerprint {cluster_fp}, kept in the store): agents and clients trust the \
         cluster's; move {dir} away to take the cluster's CA"
    )]
    ForeignCa {
        local: String,
        dir: String,
        local_fp: String,
        cluster_fp: String,
    },
    #[error("the cluster CA in the store is malformed: {0}")]
    BadClusterCa(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Io { context, source }
}

/// Where the cluster's CA (certificate and key, JSON) lives in the store:
/// outside `/registry/`, so the API never serves it.
pub const CLUSTER_CA_KEY: &str = "/krvirt.io/pki/ca";

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct StoredCa {
    cert: String,
    key: String,
}

fn ca_fp(pem: &str) -> String {
    pem_certs(pem)
        .ok()
        .and_then(|c| c.first().map(|c| fingerprint(c.as_ref())))
        .unwrap_or_default()
}

/// Make `dir`'s CA (`ca.crt`, `ca.key`) the cluster's, before
/// [`Pki::ensure`]: every server replica on one store signs with the same
/// CA, so an agent or client that trusts one replica trusts them all.
///
/// - The store has a CA and `dir` none: `dir` takes the store's.
/// - Neither has one: this server makes one and offers it to the store
///   (create-if-absent); if another replica won the race, `dir` takes the
///   winner's instead.
/// - `dir` has a CA and the store none (a data dir from before the CA was
///   kept in the store): the store takes `dir`'s.
/// - Both, different: refused ([`TlsError::ForeignCa`]); a server whose
///   certificates were signed by another CA would lock its agents out.
pub async fn sync_cluster_ca(store: &dyn krvirt_store::Store, dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let (crt_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    let local = match (read(&crt_path)?, read(&key_path)?) {
        (Some(cert), Some(key)) => Some(StoredCa { cert, key }),
        _ => None,
    };
    let parse = |v: &[u8]| -> Result<StoredCa, TlsError> {
        serde_json::from_slice(v).map_err(|e| TlsError::BadClusterCa(e.to_string()))
    };
    let cluster = match store.get(CLUSTER_CA_KEY).await? {
        Some(kv) => Some(parse(&kv.value)?),
        None => None,
    };
    let adopt = |ca: &StoredCa| -> Result<(), TlsError> {
        KeyPair::from_pem(&ca.key)?;
        pem_certs(&ca.cert)?;
        // Leaf certificates of another CA would not verify any more.
        for f in [
            "server.crt",
            "server.key",
            "server.names",
            "apiserver-client.crt",
            "apiserver-client.key",
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        write_private(&key_path, &ca.key)?;
        write_private(&crt_path, &ca.cert)
    };
    match (local, cluster) {
        (Some(l), Some(c)) if l == c => Ok(()),
        (Some(l), Some(c)) => Err(TlsError::ForeignCa {
            local: crt_path.display().to_string(),
            dir: dir.display().to_string(),
            local_fp: ca_fp(&l.cert),
            cluster_fp: ca_fp(&c.cert),
        }),
        (None, Some(c)) => adopt(&c),
        (local, None) => {
            let mine = match local {
                Some(l) => l,
                None => {
                    let key = KeyPair::generate()?;
                    let cert = ca_params().self_signed(&key)?;
                    StoredCa {
                        cert: cert.pem(),
                        key: key.serialize_pem(),
                    }
                }
            };
            let value =
                serde_json::to_vec(&mine).map_err(|e| TlsError::BadClusterCa(e.to_string()))?;
            match store.create(CLUSTER_CA_KEY, value, None).await {
                Ok(_) => {
                    if read(&crt_path)?.as_deref() != Some(mine.cert.as_str()) {
                        adopt(&mine)?;
                    }
                    Ok(())
                }
                Err(krvirt_store::StoreError::AlreadyExists(_)) => {
                    let Some(kv) = store.get(CLUSTER_CA_KEY).await? else {
                        return Err(TlsError::BadClusterCa(
                            "it was created and deleted at once".into(),
                        ));
                    };
                    let winner = parse(&kv.value)?;
                    if read(&crt_path)?.as_deref() == Some(winner.cert.as_str()) {
                        return Ok(());
                    }
                    if read(&crt_path)?.is_some() {
                        return Err(TlsError::ForeignCa {
                            local: crt_path.display().to_string(),
                            dir: dir.display().to_string(),
                            local_fp: ca_fp(&mine.cert),
                            cluster_fp: ca_fp(&winner.cert),
                        });
                    }
                    adopt(&winner)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// The crypto provider of every TLS config krvirt builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Common name prefix of host agents' client certificates.
pub const HOST_CN_PREFIX: &str = "system:host:";

/// Common name of the API server's own client certificate: the only
/// identity agents' host APIs accept (a join only ever signs
/// `system:host:NAME`, so no agent can obtain it).
pub const SERVER_CN: &str = "system:krvirt-server";

/// The CA and the server certificate of one data directory.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert_pem: String,
    ca_key: KeyPair,
    ca_params: CertificateParams,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    /// The server's client certificate ([`SERVER_CN`]), with which it dials
    /// agents' host APIs (`apiserver-client.crt`, `.key`).
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

fn write_private(path: &Path, data: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(data.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))
}

fn read(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "krvirt CA");
    dn.push(DnType::OrganizationName, "krvirt");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2124, 1, 1);
    p
}

/// Validity of leaf certificates: from yesterday, `years` long.
fn leaf_validity(p: &mut CertificateParams, years: i32) {
    let now = chrono::Utc::now() - chrono::Duration::days(1);
    let (y, m, d) = (now.year(), now.month() as u8, now.day().min(28) as u8);
    p.not_before = date_time_ymd(y, m, d);
    p.not_after = date_time_ymd(y + years, m, d);
}

fn random_serial(p: &mut CertificateParams) {
    let mut b = [0u8; 16];
    crate::auth::random_bytes(&mut b);
    b[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&b));
}

impl Pki {
    /// Load the PKI of `dir` (usually `DATA/pki`), creating the CA on first
    /// use, and (re)issuing the server certificate unless one for exactly
    /// `names` (DNS names or IP addresses) exists.
    pub fn ensure(dir: &Path, names: &[String]) -> Result<Pki, TlsError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
        let params = ca_params();
        let (ca_cert_pem, ca_key) = match (read(&ca_crt)?, read(&ca_key)?) {
            (Some(c), Some(k)) => (c, KeyPair::from_pem(&k)?),
            _ => {
                let key = KeyPair::generate()?;
                let cert = params.self_signed(&key)?;
                write_private(&ca_key, &key.serialize_pem())?;
                write_private(&ca_crt, &cert.pem())?;
                (cert.pem(), key)
            }
        };
        let mut names: Vec<String> = names.to_vec();
        names.sort();
        names.dedup();
        let names_file = dir.join("server.names");
        let (srv_crt, srv_key) = (dir.join("server.crt"), dir.join("server.key"));
        let wanted = names.join("\n");
        let existing = match (read(&names_file)?, read(&srv_crt)?, read(&srv_key)?) {
            (Some(n), Some(c), Some(k)) if n == wanted => Some((c, k)),
            _ => None,
        };
        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca_cert_pem,
            ca_key,
            ca_params: params,
            server_cert_pem: String::new(),
            server_key_pem: String::new(),
            client_cert_pem: String::new(),
            client_key_pem: String::new(),
        };
        let (cert, key) = match existing {
            Some(ck) => ck,
            None => {
                let (c, k) = pki.issue_server(&names)?;
                write_private(&srv_key, &k)?;
                write_private(&srv_crt, &c)?;
                write_private(&names_file, &wanted)?;
                (c, k)
            }
        };
        pki.server_cert_pem = cert;
        pki.server_key_pem = key;
        let (cli_crt, cli_key) = (
            dir.join("apiserver-client.crt"),
            dir.join("apiserver-client.key"),
        );
        let (cert, key) = match (read(&cli_crt)?, read(&cli_key)?) {
            (Some(c), Some(k)) => (c, k),
            _ => {
                let key = KeyPair::generate()?;
                let csr = CertificateParams::new(Vec::<String>::new())?
                    .serialize_request(&key)?
                    .pem()?;
                let cert = pki.sign_client_csr(&csr, SERVER_CN)?;
                let key = key.serialize_pem();
                write_private(&cli_key, &key)?;
                write_private(&cli_crt, &cert)?;
                (cert, key)
            }
        };
        pki.client_cert_pem = cert;
        pki.client_key_pem = key;
        Ok(pki)
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.ca_params, &self.ca_key)
    }

    fn issue_server(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "krvirt API server");
        p.distinguished_name = dn;
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.use_authority_key_identifier_extension = true;
        leaf_validity(&mut p, 5);
        random_serial(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer())?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Sign a client certificate request (PEM) for `common_name` (the
    /// server decides the name, whatever the request asked for).
    pub fn sign_client_csr(&self, csr_pem: &str, common_name: &str) -> Result<String, TlsError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::BadRequest(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        csr.params.distinguished_name = dn;
        csr.params.subject_alt_names.clear();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.use_authority_key_identifier_extension = true;
        csr.params.custom_extensions.clear();
        leaf_validity(&mut csr.params, 1);
        random_serial(&mut csr.params);
        Ok(csr.signed_by(&self.issuer())?.pem())
    }

    /// Sign a host agent's certificate request at join: CN
    /// `system:host:HOST` (its API identity, as a client) and, so that it
    /// can serve its host API to this server, the DNS name `HOST` and
    /// server authentication. The server checks an agent's host API against
    /// the name of the Host it dials, whatever address it reaches it at.
    pub fn sign_host_csr(&self, csr_pem: &str, host: &str) -> Result<String, TlsError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::BadRequest(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{HOST_CN_PREFIX}{host}"));
        csr.params.distinguished_name = dn;
        csr.params.subject_alt_names = vec![SanType::DnsName(host.to_string().try_into()?)];
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        csr.params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        csr.params.use_authority_key_identifier_extension = true;
        csr.params.custom_extensions.clear();
        leaf_validity(&mut csr.params, 1);
        random_serial(&mut csr.params);
        Ok(csr.signed_by(&self.issuer())?.pem())
    }

    /// The TLS client config with which this server dials agents' host
    /// APIs: it trusts only the cluster CA and presents [`SERVER_CN`].
    pub fn host_api_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        host_api_client_config(
            &self.ca_cert_pem,
            &self.client_cert_pem,
            &self.client_key_pem,
        )
    }

    /// The rustls server config: this server's chain (leaf + CA), client
    /// certificates optional but, when presented, verified against the CA.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let ca = pem_certs(&self.ca_cert_pem)?;
        let mut roots = rustls::RootCertStore::empty();
        for c in &ca {
            roots.add(c.clone())?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut chain = pem_certs(&self.server_cert_pem)?;
        chain.extend(ca);
        let key = pem_key(&self.server_key_pem)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// SHA-256 fingerprint of the CA certificate (`AB:CD:…`).
    pub fn ca_fingerprint(&self) -> String {
        pem_certs(&self.ca_cert_pem)
            .ok()
            .and_then(|c| c.first().map(|c| fingerprint(c.as_ref())))
            .unwrap_or_default()
    }
}

/// A TLS client config trusting only `ca_pem` and presenting the client
/// certificate `cert_pem` (HTTP/1.1).
pub fn host_api_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca_pem)? {
        roots.add(c)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(pem_certs(cert_pem)?, pem_key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The TLS config of an agent's host API: its own certificate (signed at
/// join, see [`Pki::sign_host_csr`]) and a mandatory client certificate
/// that chains to the cluster CA `ca_pem` AND names [`SERVER_CN`]: a client
/// without a certificate, with another CA's, or with an agent's (also
/// signed by the CA) fails the handshake.
pub fn host_api_server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca_pem)? {
        roots.add(c)?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(RequireCommonName {
        inner,
        cn: SERVER_CN.to_string(),
    });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(cert_pem)?, pem_key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client certificate verifier: the CA's verdict, then the subject's
/// common name must be `cn`.
#[derive(Debug)]
struct RequireCommonName {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    cn: String,
}

impl rustls::server::danger::ClientCertVerifier for RequireCommonName {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if common_name(end_entity.as_ref()).as_deref() == Some(self.cn.as_str()) {
            Ok(rustls::server::danger::ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// SHA-256 fingerprint of a DER certificate, as colon-separated hex.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(der);
    d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Every certificate of a PEM text.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadRequest(format!("PEM certificates: {e}")))
}

/// The private key of a PEM text.
pub fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .or_else(|_| PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map(Into::into))
        .map_err(|e| TlsError::BadRequest(format!("PEM private key: {e}")))
}

/// Can the (first) certificate of `cert_pem` serve TLS for the DNS name
/// `host` (server authentication, `host` among its DNS names)? Agents'
/// certificates signed before the host API existed cannot.
pub fn serves_host(cert_pem: &str, host: &str) -> bool {
    let Some(der) = pem_certs(cert_pem).ok().and_then(|c| c.into_iter().next()) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return false;
    };
    let server_auth = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.server_auth);
    let named = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(|g| {
                matches!(g, x509_parser::extensions::GeneralName::DNSName(n) if n.eq_ignore_ascii_case(host))
            })
        });
    server_auth && named
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

// ----- listeners -----

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// An axum listener that accepts TCP connections and completes their TLS
/// handshakes concurrently (a slow client never stalls the others).
pub struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsStream, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let done = tx.clone();
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(tcp),
                    )
                    .await;
                    match hs {
                        Ok(Ok(s)) => {
                            let _ = done.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Who is on the other end of a connection (connect info of the TLS and
/// unix socket listeners).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// TCP peer address.
    pub addr: Option<SocketAddr>,
    /// Unix socket peer uid (SO_PEERCRED).
    pub uid: Option<u32>,
    /// Unix socket peer pid.
    pub pid: Option<i32>,
    /// Common name of a verified client certificate.
    pub cert_cn: Option<String>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let (_, conn) = stream.io().get_ref();
        let cert_cn = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| common_name(c.as_ref()));
        Peer {
            addr: Some(*stream.remote_addr()),
            uid: None,
            pid: None,
            cert_cn,
        }
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        Peer {
            addr: None,
            uid: cred.as_ref().map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
            cert_cn: None,
        }
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer {
            addr: Some(*stream.remote_addr()),
            ..Default::default()
        }
    }
}
