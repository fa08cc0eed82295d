//! A peer that holds the cluster token, announces a whole blob, completes the
//! handshake and sends a full bitfield, then accepts every piece request and never
//! answers it (the streams stay open until the peer is dropped).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use swarm_net::{ClusterToken, Endpoint, EndpointConfig, read_msg, write_msg};
use swarm_proto::codec::MAX_PEER_FRAME_LEN;
use swarm_proto::msg::{Announce, PeerMessage};
use swarm_proto::{Bitfield, Layout, PeerId};
use swarm_tracker::client::TrackerClient;

/// The running silent peer; it stops (and its connections close) when dropped.
pub struct SilentPeer {
    pub peer_id: PeerId,
    /// Piece requests it accepted (and never answered).
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SilentPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SilentPeer {
    /// Starts the peer on 127.0.0.1 with the token in `token_file` and announces it
    /// to `tracker` as a holder of the whole `layout` blob (re-announced every 2 s).
    pub async fn start(token_file: &Path, tracker: SocketAddr, layout: Layout) -> anyhow::Result<Self> {
        let token = ClusterToken::from_file(token_file).context("reading the cluster token")?;
        let ep = Endpoint::bind("127.0.0.1:0".parse()?, token, &EndpointConfig::default()).context("bind")?;
        let peer_id = PeerId([0x5E; 16]);
        let client = TrackerClient::new(ep.clone(), tracker);
        let ann = Announce {
            peer_id,
            blob: layout.digest,
            listen_port: ep.local_addr()?.port(),
            advertise: None,
            zone: String::new(),
            have: layout.piece_count(),
            complete: true,
            num_want: 0,
        };
        client.announce(&ann).await.context("the silent peer's announce")?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
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
                    let counter = counter.clone();
                    held.spawn(async move {
                        let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                        let Ok(Some(PeerMessage::Handshake { blob, .. })) =
                            read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await
                        else {
                            return;
                        };
                        let version = swarm_net::protocol_version(&conn);
                        let reply = PeerMessage::Handshake { version, peer_id, blob };
                        let _ = write_msg(&mut send, &reply).await;
                        let bits = PeerMessage::Bitfield(Bitfield::full(layout.piece_count()));
                        let _ = write_msg(&mut send, &bits).await;
                        // Drain the control stream (bitfield, haves, hashes) so the
                        // node's control writer never stalls on us.
                        let control = tokio::spawn(async move {
                            while let Ok(Some(_)) = read_msg::<PeerMessage>(&mut recv, MAX_PEER_FRAME_LEN).await {}
                        });
                        // Accept every request stream, read the request, never answer.
                        let mut open = vec![(send, control)];
                        while let Ok((s, mut r)) = conn.accept_bi().await {
                            if let Ok(Some(PeerMessage::Request { .. })) =
                                read_msg::<PeerMessage>(&mut r, MAX_PEER_FRAME_LEN).await
                            {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            open.push((s, tokio::spawn(async move { drop(r) })));
                        }
                    });
                }
                drop(held);
            };
            tokio::join!(announcing, serving);
        });
        Ok(Self { peer_id, requests, task })
    }

    /// Piece requests accepted so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}
