//! AutoMTLS as HashiCorp's go-plugin does it: the host makes a certificate for the run and
//! hands it to the plugin (`PLUGIN_CLIENT_CERT`, PEM); the plugin answers with its own server
//! certificate in the handshake line (DER, base64 without padding), which is trusted for that
//! one connection: pinned, whatever its issuer or names.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// A byte stream a TLS session or gRPC can run over.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// The host's certificate and key for one run.
pub struct ClientIdentity {
    pub pem: String,
    der: CertificateDer<'static>,
    key: Vec<u8>,
}

impl ClientIdentity {
    /// A fresh self-signed P-384 certificate (not a CA: some plugins refuse one as an end
    /// entity; go-plugin trusts it by itself).
    pub fn generate() -> Result<ClientIdentity, rcgen::Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "capstan");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.self_signed(&key)?;
        Ok(ClientIdentity {
            pem: cert.pem(),
            der: cert.der().clone(),
            key: key.serialize_der(),
        })
    }
}

/// A TLS client configuration presenting `client` and trusting only the certificate the
/// handshake line carried (`server_cert`, base64 DER).
pub fn client_config(
    client: &ClientIdentity,
    server_cert: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use base64::Engine;
    let pinned = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(server_cert.trim_end_matches('='))
        .map_err(|e| format!("not base64: {e}"))?;
    let provider = Arc::new(crypto_provider());
    let verifier = Arc::new(Pinned {
        der: pinned,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            vec![client.der.clone()],
            PrivateKeyDer::try_from(client.key.clone()).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS primitives: *ring*'s (key exchange, ciphers, signing with the client key, which
/// draw randomness from the kernel), with aws-lc-rs's signature verification, which checks
/// P-521 too (modern Go plugins answer with a P-521 certificate; *ring* cannot verify one).
/// aws-lc's random generator is never used: it would set up its jitter entropy source first,
/// which costs more than the whole TLS handshake.
fn crypto_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.signature_verification_algorithms =
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    provider
}

/// Trusts exactly one certificate, and checks the handshake was signed with its key.
#[derive(Debug)]
struct Pinned {
    der: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.der.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the plugin presented another certificate than its handshake line named".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn only_the_certificate_of_the_handshake_line_is_trusted() {
        let server = ClientIdentity::generate().unwrap();
        let other = ClientIdentity::generate().unwrap();
        let line = base64::engine::general_purpose::STANDARD_NO_PAD.encode(server.der.as_ref());
        let provider = Arc::new(crypto_provider());
        let pinned = Pinned {
            der: base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(&line)
                .unwrap(),
            provider,
        };
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now();
        assert!(pinned
            .verify_server_cert(&server.der, &[], &name, &[], now)
            .is_ok());
        assert!(pinned
            .verify_server_cert(&other.der, &[], &name, &[], now)
            .is_err());
        // And a configuration is made from a handshake line's certificate.
        let client = ClientIdentity::generate().unwrap();
        assert!(client_config(&client, &line).is_ok());
        assert!(client_config(&client, "not base64!").is_err());
    }
}
