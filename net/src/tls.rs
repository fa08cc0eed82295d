//! TLS and QUIC configuration: the per-endpoint self-signed certificate, the rustls
//! client and server configs (TLS 1.3 only, ALPN `swarm/2` or `swarm/1`, ring provider), the
//! certificate verifier that checks handshake signatures but not identities, the
//! transport parameters and the stateless-reset key.

use std::sync::Arc;

use hmac::Mac;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::token::ClusterToken;
use crate::{EndpointConfig, NetError};

/// The name every swarm certificate carries and every client asks for.
pub(crate) const SERVER_NAME: &str = "swarm";

fn config_err(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Config { reason: format!("{what}: {e}") }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ALPN tokens of the versions up to `max_version`, best first.
fn alpns(max_version: u32) -> Vec<Vec<u8>> {
    swarm_proto::ALPNS
        .iter()
        .filter(|a| swarm_proto::alpn_version(a).is_some_and(|v| v <= max_version))
        .map(|a| a.to_vec())
        .collect()
}

/// The rustls server config: a fresh self-signed ECDSA P-256 certificate for
/// [`SERVER_NAME`], no client certificates, TLS 1.3 only, ALPNs of
/// [`swarm_proto::ALPNS`] up to `max_version`, in preference order.
pub(crate) fn server_crypto(max_version: u32) -> Result<quinn::crypto::rustls::QuicServerConfig, NetError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| config_err("cannot generate the endpoint certificate", e))?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err("TLS 1.3 unavailable", e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| config_err("cannot use the endpoint certificate", e))?;
    tls.alpn_protocols = alpns(max_version);
    // No 0-RTT: early data could be replayed, and nothing is sent before the token proof.
    tls.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| config_err("QUIC server TLS", e))
}

/// The rustls client config: TLS 1.3 only, ALPNs of [`swarm_proto::ALPNS`] up to
/// `max_version`,
/// [`TokenAuthVerifier`].
pub(crate) fn client_crypto(max_version: u32) -> Result<quinn::crypto::rustls::QuicClientConfig, NetError> {
    let provider = provider();
    let verifier = Arc::new(TokenAuthVerifier { algorithms: provider.signature_verification_algorithms });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config_err("TLS 1.3 unavailable", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = alpns(max_version);
    quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| config_err("QUIC client TLS", e))
}

/// Accepts any server certificate, because identity comes from the cluster-token
/// proof that follows the handshake, not from a CA; but still checks the TLS 1.3
/// `CertificateVerify` signature, so the server must hold the private key of the
/// certificate it sent and the handshake transcript (hence the exporter secret the
/// proof is bound to) is authentic.
#[derive(Debug)]
struct TokenAuthVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for TokenAuthVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled, so rustls never asks; refuse if it ever does.
        Err(rustls::Error::General("swarm speaks TLS 1.3 only".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// QUIC transport parameters from an [`EndpointConfig`]. Only bidirectional streams
/// are used, so the peer may open no unidirectional ones.
pub(crate) fn transport(config: &EndpointConfig) -> Result<Arc<quinn::TransportConfig>, NetError> {
    let varint = |what: &str, v: u64| quinn::VarInt::from_u64(v).map_err(|e| config_err(what, e));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|e| config_err("idle timeout", e))?,
    ));
    t.keep_alive_interval((!config.keep_alive.is_zero()).then_some(config.keep_alive));
    t.stream_receive_window(varint("stream receive window", config.stream_receive_window)?);
    t.receive_window(varint("receive window", config.receive_window)?);
    t.send_window(config.send_window);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(config.max_concurrent_bidi_streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Ok(Arc::new(t))
}

/// The key behind QUIC stateless-reset tokens: `HMAC(token, "swarm/1 stateless reset"
/// || port)`. Because it survives a restart, an endpoint restarted on the same port
/// answers packets of its predecessor's connections with a reset the remote
/// recognises, so the remote learns at once that the connection is gone instead of
/// waiting out the idle timeout (this is how a tracker client notices a restarted
/// tracker). See the crate docs for the trade-off.
pub(crate) struct ResetKey(hmac::Hmac<sha2::Sha256>);

impl ResetKey {
    pub(crate) fn derive(token: &ClusterToken, port: u16) -> Self {
        let secret = token.mac().clone().chain_update(b"swarm/1 stateless reset").chain_update(port.to_be_bytes());
        let key = secret.finalize().into_bytes();
        Self(<hmac::Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new(&{
            let mut block = hmac::digest::Key::<hmac::Hmac<sha2::Sha256>>::default();
            block[..key.len()].copy_from_slice(&key);
            block
        }))
    }
}

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = self.0.clone().chain_update(data).finalize().into_bytes();
        let n = signature_out.len().min(tag.len());
        signature_out[..n].copy_from_slice(&tag[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        self.0.clone().chain_update(data).verify_slice(signature).map_err(|_| quinn::crypto::CryptoError)
    }
}

/// Random 8-byte connection IDs that every endpoint treats as possibly its own.
///
/// quinn's default generator embeds a hash under a random per-process key and drops
/// short-header packets whose connection ID fails it, which means a restarted
/// endpoint silently drops its predecessor's packets instead of answering them with
/// the stateless reset [`ResetKey`] makes recognisable. Accepting every ID costs a
/// (rate-limited, always smaller than the packet that caused it) reset per stray
/// packet.
pub(crate) struct RandomCids;

/// Length of the connection IDs we issue.
const CID_LEN: usize = 8;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}
