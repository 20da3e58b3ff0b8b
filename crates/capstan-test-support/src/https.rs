//! An HTTPS server on a loopback port, with a certificate for `127.0.0.1` signed by a
//! certificate authority made for it (whose PEM file a client is given to trust). Each
//! request is answered with the status line `answer` returns at that moment.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A running server (its thread ends with the test process).
pub struct HttpsServer {
    pub port: u16,
    /// The certificate authority's certificate, PEM.
    pub ca_file: PathBuf,
}

impl HttpsServer {
    /// Starts it; `dir` receives the authority's PEM file.
    pub fn start(dir: &Path, answer: impl Fn() -> String + Send + 'static) -> HttpsServer {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "capstan test authority");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let ca_file = dir.join("test-authority.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                // A client that refuses the certificate ends its connection: nothing to do.
                let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                    continue;
                };
                let mut stream = rustls::StreamOwned::new(connection, tcp);
                let mut buffer = [0u8; 2048];
                if stream.read(&mut buffer).is_err() {
                    continue;
                }
                let status = answer();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                stream.conn.send_close_notify();
                let _ = stream.flush();
            }
        });
        HttpsServer { port, ca_file }
    }
}
