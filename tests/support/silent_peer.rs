//! A peer that behaves like a real swarm node holding a whole blob in every way but
//! one: it never sends piece data.
//!
//! It holds the cluster token, announces itself to the tracker as a complete holder
//! (every 2 s), and answers a node's connection as `swarm_peer::node` does: the
//! handshake, then (protocol version 2) the blob's piece hashes, then a full
//! bitfield; it reads the node's control stream. Every piece request stream it
//! accepts is read to its end and then held open, unanswered, until the requester
//! gives up on it (stop or reset) or the connection closes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use swarm_net::{ClusterToken, Endpoint, EndpointConfig, read_msg, write_msg};
use swarm_proto::codec::MAX_PEER_FRAME_LEN;
use swarm_proto::msg::{Announce, MAX_HASHES_PER_MESSAGE, PeerMessage};
use swarm_proto::{Bitfield, Digest, Metainfo, PeerId};
use swarm_tracker::client::TrackerClient;

/// The running silent peer; it stops (and its connections close) when dropped.
pub struct SilentPeer {
    pub peer_id: PeerId,
    /// Piece requests it read (and never answered).
    pub requests: Arc<AtomicU64>,
    /// For each request stream the requester gave up on (stopped it: a timeout, or
    /// another peer's copy won), how long it had been waiting.
    pub given_up: Arc<Mutex<Vec<Duration>>>,
    /// How each connection to it ended, for failure messages.
    pub closes: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SilentPeer {
    /// Starts the peer on 127.0.0.1 with the token in `token_file`, takes the blob's
    /// metainfo from `tracker` (someone must have registered it) and announces itself
    /// there as a holder of the whole blob.
    pub async fn start(token_file: &Path, tracker: SocketAddr, blob: Digest) -> anyhow::Result<Self> {
        let token = ClusterToken::from_file(token_file).context("reading the cluster token")?;
        let ep = Endpoint::bind("127.0.0.1:0".parse()?, token, &EndpointConfig::default()).context("bind")?;
        let peer_id = PeerId([0x5E; 16]);
        let client = TrackerClient::new(ep.clone(), tracker);
        let metainfo = (client.get_metainfo(blob).await)
            .context("the silent peer asking for the metainfo")?
            .with_context(|| format!("the tracker does not know {blob}: seed it first"))?;
        let metainfo = Arc::new(metainfo);
        let ann = Announce {
            peer_id,
            blob,
            listen_port: ep.local_addr()?.port(),
            advertise: None,
            zone: String::new(),
            have: metainfo.piece_count(),
            complete: true,
            num_want: 0,
        };
        client.announce(&ann).await.context("the silent peer's announce")?;
        let requests = Arc::new(AtomicU64::new(0));
        let given_up = Arc::new(Mutex::new(Vec::new()));
        let closes = Arc::new(Mutex::new(Vec::new()));
        let counters: Counters = (requests.clone(), given_up.clone(), closes.clone());
        let task = tokio::spawn(async move {
            let announcing = async {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = client.announce(&ann).await;
                }
            };
            let serving = async {
                // Dropped with the task: aborts every connection's task.
                let mut held = tokio::task::JoinSet::new();
                while let Some(incoming) = ep.accept().await {
                    let Ok(conn) = incoming.authenticate().await else { continue };
                    let (metainfo, (requests, given_up, closes)) = (metainfo.clone(), counters.clone());
                    // The acceptor's side of the peer protocol, minus the pieces.
                    held.spawn(async move {
                        let remote = conn.remote_address();
                        let talk = async {
                            let (mut send, mut recv) = conn.accept_bi().await.ok()?;
                            let Ok(Some(PeerMessage::Handshake { version, blob, .. })) =
                                read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await
                            else {
                                conn.close(2u32.into(), b"expected a handshake");
                                return None;
                            };
                            if blob != metainfo.digest {
                                conn.close(4u32.into(), b"blob not served here");
                                return None;
                            }
                            write_msg(&mut send, &PeerMessage::Handshake { version, peer_id, blob }).await.ok()?;
                            // A version-2 node sends the hashes it knows before its bitfield.
                            if version >= 2 {
                                for msg in hashes_of(&metainfo) {
                                    write_msg(&mut send, &msg).await.ok()?;
                                }
                            }
                            let bits = PeerMessage::Bitfield(Bitfield::full(metainfo.piece_count()));
                            write_msg(&mut send, &bits).await.ok()?;
                            // Read the node's control stream (hashes, bitfield, haves) so
                            // that its control writer never stalls; keep our side open.
                            let control = async move {
                                while let Ok(Some(_)) = read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await {}
                                send
                            };
                            let streams = async {
                                let mut open = tokio::task::JoinSet::new();
                                while let Ok((s, mut r)) = conn.accept_bi().await {
                                    let (requests, given_up) = (requests.clone(), given_up.clone());
                                    open.spawn(async move {
                                        let Ok(Some(PeerMessage::Request { .. })) =
                                            read_msg::<PeerMessage>(&mut r, MAX_PEER_FRAME_LEN).await
                                        else {
                                            return;
                                        };
                                        requests.fetch_add(1, Ordering::Relaxed);
                                        let asked = Instant::now();
                                        // Read to the requester's finish, so that no early
                                        // drop sends it a STOP_SENDING.
                                        while let Ok(Some(_)) = r.read_chunk(usize::MAX, true).await {}
                                        // Never answer; hold the stream until the requester
                                        // cancels it or the connection closes.
                                        if let Ok(Some(_)) = s.stopped().await {
                                            locked(&given_up).push(asked.elapsed());
                                        }
                                    });
                                }
                                open
                            };
                            let (_send, _open) = tokio::join!(control, streams);
                            Some(())
                        };
                        talk.await;
                        let reason = conn.closed().await;
                        locked(&closes).push(format!("{remote}: {reason}"));
                    });
                }
            };
            tokio::join!(announcing, serving);
        });
        Ok(Self { peer_id, requests, given_up, closes, task })
    }

    /// Piece requests read so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// How long each request the requesters gave up on so far had waited.
    pub fn given_up(&self) -> Vec<Duration> {
        locked(&self.given_up).clone()
    }

    /// How the connections to it ended so far.
    pub fn closes(&self) -> Vec<String> {
        locked(&self.closes).clone()
    }
}

type Counters = (Arc<AtomicU64>, Arc<Mutex<Vec<Duration>>>, Arc<Mutex<Vec<String>>>);

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `Hashes` messages that carry every piece hash of `metainfo`.
fn hashes_of(metainfo: &Metainfo) -> Vec<PeerMessage> {
    let layout = metainfo.layout();
    (metainfo.piece_hashes.chunks(MAX_HASHES_PER_MESSAGE).enumerate())
        .map(|(i, hashes)| PeerMessage::Hashes {
            layout,
            first: (i * MAX_HASHES_PER_MESSAGE) as u32,
            hashes: hashes.to_vec(),
        })
        .collect()
}
