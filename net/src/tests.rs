//! Loopback tests of endpoints, the token proof and framing. Raw quinn clients and
//! servers built from the crate's own TLS configs play the attackers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use swarm_proto::msg::{PeerMessage, RejectReason};
use swarm_proto::{Digest, PROTOCOL_VERSION, PeerId};

use crate::auth::{CLIENT_ROLE, PROOF_LEN, SERVER_ROLE, session_secret};
use crate::probe::send_proof;
use crate::*;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn token(fill: u8) -> ClusterToken {
    ClusterToken::new(vec![fill; 32]).expect("token")
}

fn bind(fill: u8) -> Endpoint {
    Endpoint::bind(loopback(), token(fill), &EndpointConfig::default()).expect("bind")
}

/// Accepts connections forever, sending each authentication result to the channel.
fn spawn_acceptor(server: &Endpoint) -> tokio::sync::mpsc::UnboundedReceiver<Result<quinn::Connection, NetError>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let server = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(incoming.authenticate().await);
            });
        }
    });
    rx
}

fn raw_endpoint(server: bool) -> quinn::Endpoint {
    probe::raw_endpoint(server).expect("raw endpoint")
}

async fn raw_connect(ep: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    probe::connect(ep, addr).await.expect("handshake")
}

fn assert_auth_failed_close(e: &quinn::ConnectionError) {
    assert!(probe::is_auth_failed(e), "expected an AUTH_FAILED close, got {e}");
}

fn handshake(n: u8) -> PeerMessage {
    PeerMessage::Handshake { version: PROTOCOL_VERSION, peer_id: PeerId([n; 16]), blob: Digest::of(&[n]) }
}

#[tokio::test]
async fn same_token_connects_and_exchanges_frames_both_ways() {
    let server = bind(7);
    let client = bind(7);
    let server_addr = server.local_addr().expect("addr");
    let client_addr = client.local_addr().expect("addr");
    let mut accepted = spawn_acceptor(&server);

    let conn = client.connect(server_addr).await.expect("connect");
    assert_eq!(conn.remote_address(), server_addr);
    let server_conn = accepted.recv().await.expect("accepted").expect("authenticated");
    assert_eq!(server_conn.remote_address(), client_addr);

    // Client-initiated stream: two messages each way, then a clean end.
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    write_msg(&mut send, &handshake(1)).await.expect("write");
    write_msg(&mut send, &PeerMessage::Have { piece: 9 }).await.expect("write");
    send.finish().expect("finish");
    let (mut s_send, mut s_recv) = server_conn.accept_bi().await.expect("accept stream");
    let first: Option<PeerMessage> = read_msg(&mut s_recv, codec_limit()).await.expect("read");
    assert_eq!(first, Some(handshake(1)));
    let second: Option<PeerMessage> = read_msg(&mut s_recv, codec_limit()).await.expect("read");
    assert_eq!(second, Some(PeerMessage::Have { piece: 9 }));
    let end: Option<PeerMessage> = read_msg(&mut s_recv, codec_limit()).await.expect("read");
    assert_eq!(end, None, "clean end of stream");
    write_msg(&mut s_send, &handshake(2)).await.expect("write");
    s_send.finish().expect("finish");
    let reply: Option<PeerMessage> = read_msg(&mut recv, codec_limit()).await.expect("read");
    assert_eq!(reply, Some(handshake(2)));
    assert_eq!(read_msg::<PeerMessage>(&mut recv, codec_limit()).await.expect("read"), None);

    // Server-initiated stream on the same connection.
    let (mut s_send, _s_recv) = server_conn.open_bi().await.expect("open");
    let msg = PeerMessage::Reject { piece: 3, reason: RejectReason::Busy };
    write_msg(&mut s_send, &msg).await.expect("write");
    s_send.finish().expect("finish");
    let (_send, mut recv) = conn.accept_bi().await.expect("accept");
    assert_eq!(read_msg::<PeerMessage>(&mut recv, codec_limit()).await.expect("read"), Some(msg));
}

fn codec_limit() -> usize {
    swarm_proto::codec::MAX_PEER_FRAME_LEN
}

#[tokio::test]
async fn a_client_with_another_token_is_refused_on_both_sides() {
    let server = bind(1);
    let intruder = bind(2);
    let server_addr = server.local_addr().expect("addr");
    let intruder_addr = intruder.local_addr().expect("addr");
    let mut accepted = spawn_acceptor(&server);

    let err = intruder.connect(server_addr).await.expect_err("must be refused");
    assert!(matches!(err, NetError::AuthRejected { addr } if addr == server_addr), "{err:?}");
    assert_eq!(
        err.to_string()
            .lines()
            .next()
            .map(|l| l.starts_with(&format!("refused by {server_addr}: cluster token mismatch"))),
        Some(true),
        "{err}"
    );

    let server_side = accepted.recv().await.expect("result").expect_err("server must refuse");
    assert!(matches!(server_side, NetError::AuthFailed { addr } if addr == intruder_addr), "{server_side:?}");

    // The server keeps working for clients with the right token.
    let friend = bind(1);
    friend.connect(server_addr).await.expect("friend connects");
    accepted.recv().await.expect("result").expect("friend authenticated");
}

#[tokio::test]
async fn a_proof_recorded_on_one_connection_is_refused_on_another() {
    let server = bind(3);
    let server_addr = server.local_addr().expect("addr");
    let mut accepted = spawn_acceptor(&server);
    let attacker = raw_endpoint(false);
    let secret = token(3);

    // Connection A: an honest proof, accepted; the server answers with its own.
    let conn_a = raw_connect(&attacker, server_addr).await;
    let ekm_a = session_secret(&conn_a).expect("ekm");
    let proof_a = secret.proof(CLIENT_ROLE, &ekm_a);
    let answer = send_proof(&conn_a, &proof_a).await.expect("accepted");
    assert!(secret.verify(SERVER_ROLE, &ekm_a, &answer), "server proof must verify");
    accepted.recv().await.expect("result").expect("A authenticated");

    // Connection B: replaying A's proof fails, because B's exporter secret differs.
    let conn_b = raw_connect(&attacker, server_addr).await;
    let ekm_b = session_secret(&conn_b).expect("ekm");
    assert_ne!(ekm_a, ekm_b, "exporter secrets must differ per session");
    let closed = send_proof(&conn_b, &proof_a).await.expect_err("replay must be refused");
    assert_auth_failed_close(&closed);
    assert!(matches!(accepted.recv().await.expect("result"), Err(NetError::AuthFailed { .. })));

    // Replaying the server's answer from A on a new connection fails as well.
    let conn_c = raw_connect(&attacker, server_addr).await;
    let closed = send_proof(&conn_c, &answer).await.expect_err("replayed server proof must be refused");
    assert_auth_failed_close(&closed);
    assert!(matches!(accepted.recv().await.expect("result"), Err(NetError::AuthFailed { .. })));
}

#[tokio::test]
async fn role_labels_stop_reflection_and_short_proofs() {
    let server = bind(4);
    let server_addr = server.local_addr().expect("addr");
    let mut accepted = spawn_acceptor(&server);
    let attacker = raw_endpoint(false);
    let secret = token(4);

    // A proof with the right token and session but the server's role label.
    let conn = raw_connect(&attacker, server_addr).await;
    let ekm = session_secret(&conn).expect("ekm");
    let closed = send_proof(&conn, &secret.proof(SERVER_ROLE, &ekm)).await.expect_err("wrong role");
    assert_auth_failed_close(&closed);
    assert!(matches!(accepted.recv().await.expect("result"), Err(NetError::AuthFailed { .. })));

    // A proof cut short, then the stream finished.
    let conn = raw_connect(&attacker, server_addr).await;
    let ekm = session_secret(&conn).expect("ekm");
    let proof = secret.proof(CLIENT_ROLE, &ekm);
    let closed = send_proof(&conn, &proof[..PROOF_LEN - 1]).await.expect_err("short proof");
    assert_auth_failed_close(&closed);
    assert!(matches!(accepted.recv().await.expect("result"), Err(NetError::AuthFailed { .. })));
}

#[tokio::test]
async fn a_server_without_the_token_cannot_pass_by_reflecting_our_proof() {
    let rogue = raw_endpoint(true);
    let rogue_addr = rogue.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let conn = rogue.accept().await.expect("incoming").await.expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut proof = [0u8; PROOF_LEN];
        recv.read_exact(&mut proof).await.expect("proof");
        send.write_all(&proof).await.expect("reflect");
        let _ = send.finish();
        conn.closed().await
    });
    let client = bind(5);
    let err = client.connect(rogue_addr).await.expect_err("rogue server must fail");
    assert!(matches!(err, NetError::AuthFailed { addr } if addr == rogue_addr), "{err:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), server).await.expect("closed in time").expect("task");
    assert_auth_failed_close(&closed);
}

#[tokio::test]
async fn oversized_and_truncated_frames_are_refused() {
    // Oversized: a length prefix over the limit is refused before the body arrives.
    {
        let (_s, _c, mut send, mut recv) = stream_pair().await;
        send.write_all(&(1024u32 + 1).to_be_bytes()).await.expect("write");
        let err = read_msg::<PeerMessage>(&mut recv, 1024).await.expect_err("too long");
        assert!(
            matches!(err, NetError::Codec(swarm_proto::codec::CodecError::TooLong { len: 1025, limit: 1024 })),
            "{err:?}"
        );
    }
    // A real message larger than the reader's limit.
    {
        let (_s, _c, mut send, mut recv) = stream_pair().await;
        let big = PeerMessage::Bitfield(swarm_proto::Bitfield::new(64 * 1024));
        write_msg(&mut send, &big).await.expect("write");
        let err = read_msg::<PeerMessage>(&mut recv, 1024).await.expect_err("too long");
        assert!(matches!(err, NetError::Codec(swarm_proto::codec::CodecError::TooLong { .. })), "{err:?}");
    }
    // A frame cut short by the end of the stream.
    {
        let (_s, _c, mut send, mut recv) = stream_pair().await;
        send.write_all(&100u32.to_be_bytes()).await.expect("write");
        send.write_all(&[0u8; 10]).await.expect("write");
        send.finish().expect("finish");
        let err = read_msg::<PeerMessage>(&mut recv, 1024).await.expect_err("truncated");
        assert!(matches!(err, NetError::Truncated { expected: 100, got: 10 }), "{err:?}");
    }
    // A length prefix cut short.
    {
        let (_s, _c, mut send, mut recv) = stream_pair().await;
        send.write_all(&[0, 0]).await.expect("write");
        send.finish().expect("finish");
        let err = read_msg::<PeerMessage>(&mut recv, 1024).await.expect_err("truncated");
        assert!(matches!(err, NetError::Truncated { expected: 4, got: 2 }), "{err:?}");
    }
    // Garbage of the announced length.
    {
        let (_s, _c, mut send, mut recv) = stream_pair().await;
        send.write_all(&3u32.to_be_bytes()).await.expect("write");
        send.write_all(&[0xff, 0xff, 0xff]).await.expect("write");
        send.finish().expect("finish");
        let err = read_msg::<PeerMessage>(&mut recv, 1024).await.expect_err("malformed");
        assert!(matches!(err, NetError::Codec(swarm_proto::codec::CodecError::Malformed(_))), "{err:?}");
    }
    // A stream reset by the writer surfaces its code.
    {
        let (_s, _c, mut send, mut recv) = stream_pair().await;
        send.reset(quinn::VarInt::from_u32(codes::PROTOCOL_ERROR)).expect("reset");
        let err = read_msg::<PeerMessage>(&mut recv, 1024).await.expect_err("reset");
        assert_eq!(err.remote_code(), Some(codes::PROTOCOL_ERROR), "{err:?}");
        assert!(!err.is_connection_lost());
    }
}

/// A stream from client to server over a real authenticated connection. The client
/// sends one marker byte so the server sees the stream (QUIC announces a stream only
/// once data flows), and the server consumes it before handing the stream out.
async fn stream_pair() -> (Endpoint, Endpoint, quinn::SendStream, quinn::RecvStream) {
    let server = bind(6);
    let client = bind(6);
    let mut accepted = spawn_acceptor(&server);
    let conn = client.connect(server.local_addr().expect("addr")).await.expect("connect");
    let server_conn = accepted.recv().await.expect("accepted").expect("authenticated");
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    send.write_all(&[0xAA]).await.expect("marker");
    let (_send_srv, mut recv_srv) = server_conn.accept_bi().await.expect("accept");
    let mut marker = [0u8; 1];
    recv_srv.read_exact(&mut marker).await.expect("marker");
    assert_eq!(marker, [0xAA]);
    (server, client, send, recv_srv)
}

#[tokio::test]
async fn close_tells_the_remote_it_was_a_shutdown() {
    let server = bind(8);
    let client = bind(8);
    let mut accepted = spawn_acceptor(&server);
    let conn = client.connect(server.local_addr().expect("addr")).await.expect("connect");
    let _server_conn = accepted.recv().await.expect("accepted").expect("authenticated");
    server.close();
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("closed in time");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, quinn::VarInt::from_u32(codes::SHUTDOWN));
        }
        other => panic!("expected a SHUTDOWN close, got {other}"),
    }
    tokio::time::timeout(Duration::from_secs(5), server.wait_idle()).await.expect("idle");
    assert!(server.accept().await.is_none(), "a closed endpoint accepts nothing");
}

#[test]
fn bind_outside_a_runtime_is_an_error_not_a_panic() {
    let err = Endpoint::bind(loopback(), token(1), &EndpointConfig::default()).expect_err("no runtime");
    assert!(matches!(err, NetError::NoRuntime), "{err:?}");
}

#[tokio::test]
async fn bind_errors_name_the_address() {
    let first = bind(1);
    let addr = first.local_addr().expect("addr");
    let err = Endpoint::bind(addr, token(1), &EndpointConfig::default()).expect_err("port taken");
    assert!(matches!(&err, NetError::Bind { addr: a, .. } if *a == addr), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// Runs an endpoint with token `fill` in its own runtime, connects to it, "crashes"
/// it (drops its runtime: tasks and socket vanish without a CONNECTION_CLOSE), then
/// binds a new endpoint with token `restart_fill` on the same port and pokes the stale
/// connection. Returns how the stale connection ended within `wait`, if it did.
async fn crash_and_restart(fill: u8, restart_fill: u8, wait: Duration) -> (Option<quinn::ConnectionError>, Duration) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let crashed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let server = bind(fill);
            addr_tx.send(server.local_addr().expect("addr")).expect("send addr");
            let mut accepted = spawn_acceptor(&server);
            let _conn = accepted.recv().await.expect("accepted").expect("authenticated");
            // Park until told to "crash"; the connection stays open meanwhile.
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
        });
        drop(rt);
    });
    let server_addr = tokio::task::spawn_blocking(move || addr_rx.recv()).await.expect("join").expect("addr");

    let client = bind(fill);
    let conn = client.connect(server_addr).await.expect("connect");
    stop_tx.send(()).expect("stop");
    tokio::task::spawn_blocking(move || crashed.join()).await.expect("join").expect("thread");
    assert!(conn.close_reason().is_none(), "the crash sent nothing");

    let restarted = Endpoint::bind(server_addr, token(restart_fill), &EndpointConfig::default()).expect("rebind");
    let started = Instant::now();
    let (mut send, _recv) = conn.open_bi().await.expect("open");
    let _ = write_msg(&mut send, &handshake(1)).await;
    let ended = tokio::time::timeout(wait, conn.closed()).await.ok();
    let elapsed = started.elapsed();

    if restart_fill == fill {
        // A new connection to the restarted endpoint works.
        let mut accepted = spawn_acceptor(&restarted);
        client.connect(server_addr).await.expect("reconnect");
        accepted.recv().await.expect("accepted").expect("authenticated");
    }
    (ended, elapsed)
}

/// A peer that crashed and came back on the same port answers the stale connection
/// with a stateless reset the survivor recognises: it learns at once, not after the
/// 30 s idle timeout.
#[tokio::test]
async fn a_restarted_endpoint_resets_stale_connections_at_once() {
    let (ended, elapsed) = crash_and_restart(9, 9, Duration::from_secs(5)).await;
    assert!(matches!(ended, Some(quinn::ConnectionError::Reset)), "{ended:?}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}

/// The control: the reset is recognised only because the reset key comes from the
/// token. An endpoint with another token on the same port cannot reset our
/// connection.
#[tokio::test]
async fn an_endpoint_with_another_token_cannot_reset_our_connections() {
    let (ended, _) = crash_and_restart(10, 11, Duration::from_secs(1)).await;
    assert!(ended.is_none(), "{ended:?}");
}

/// Bulk data on one and on eight streams of one connection arrives whole; with
/// `--nocapture` it also prints the loopback throughput, for tuning [`EndpointConfig`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_on_one_and_eight_streams_arrive_whole() {
    const TOTAL: usize = 64 * 1024 * 1024;
    for streams in [1usize, 8] {
        let server = bind(12);
        let client = bind(12);
        let mut accepted = spawn_acceptor(&server);
        let conn = client.connect(server.local_addr().expect("addr")).await.expect("connect");
        let server_conn = accepted.recv().await.expect("accepted").expect("authenticated");
        let reader = tokio::spawn(async move {
            let mut readers = Vec::new();
            for _ in 0..streams {
                let (_send, mut recv) = server_conn.accept_bi().await.expect("accept");
                readers.push(tokio::spawn(async move {
                    let mut n = 0;
                    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
                        n += chunk.bytes.len();
                    }
                    n
                }));
            }
            let mut total = 0;
            for r in readers {
                total += r.await.expect("join");
            }
            total
        });
        let started = Instant::now();
        let chunk = bytes_of(1024 * 1024);
        let mut writers = Vec::new();
        for _ in 0..streams {
            let (mut send, _recv) = conn.open_bi().await.expect("open");
            let chunk = chunk.clone();
            writers.push(tokio::spawn(async move {
                for _ in 0..TOTAL / streams / chunk.len() {
                    send.write_all(&chunk).await.expect("write");
                }
                send.finish().expect("finish");
                let _ = send.stopped().await;
            }));
        }
        for w in writers {
            w.await.expect("join");
        }
        let got = reader.await.expect("join");
        let secs = started.elapsed().as_secs_f64();
        eprintln!("{streams} stream(s): {got} bytes in {secs:.2} s = {:.0} Mbit/s", got as f64 * 8.0 / secs / 1e6);
        assert_eq!(got, TOTAL);
    }
}

fn bytes_of(n: usize) -> Vec<u8> {
    (0..n).map(|i| i as u8).collect()
}
