//! The tracker's stage orders (`swarm stage`) and the staging agents' progress.
//!
//! - **Orders.** One per image reference ([`StageOrder`]), newest `issued_ms` wins; a
//!   release replaces the stage order of its image. At most [`MAX_STAGE_ORDERS`] are
//!   kept (the oldest issued goes first), and an order whose pins have ended is
//!   dropped ([`StageBook::expire_orders`]). Every accepted order bumps the
//!   **generation**, which starts from a random value so that an agent's generation
//!   from a previous tracker life never matches by accident: agents long-poll with
//!   the generation they hold (`WaitStage`) and are answered when it differs.
//! - **Agents.** Each agent that long-polls or reports progress is noted with its
//!   name, zone, address and last request; its latest progress per image is kept.
//!   Agents silent for the peer TTL are forgotten ([`StageBook::expire_agents`]).
//!
//! Nothing here is persisted: a restarted tracker knows no orders until a `swarm
//! stage` command re-sends its order (it does on every poll that finds it missing);
//! agents keep their own pins and records meanwhile. With several trackers the
//! command sends every order to each of them and each keeps its own copy.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use swarm_proto::PeerId;
use swarm_proto::msg::{
    MAX_STAGE_IMAGE_LEN, MAX_STAGE_NAME_LEN, MAX_STAGE_ORDERS, MAX_STAGE_REASON_LEN, MAX_STAGE_SELECTORS, MAX_ZONE_LEN,
    StageAgent, StageAgentView, StageOrder, StageProgress, StageState, StageStatus,
};

/// Why a stage request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StageError {
    #[error("stage: the image reference is empty or longer than {MAX_STAGE_IMAGE_LEN} bytes")]
    Image,
    #[error("stage: more than {MAX_STAGE_SELECTORS} selectors, or one longer than {MAX_STAGE_NAME_LEN} bytes")]
    Selectors,
    #[error("stage: the agent's name or zone is too long")]
    Agent,
    #[error("stage: more than {MAX_STAGE_ORDERS} progress reports in one request")]
    TooManyReports,
}

/// One agent that stages.
#[derive(Debug)]
struct AgentEntry {
    agent: StageAgent,
    addr: SocketAddr,
    last_seen: Instant,
    /// Latest progress per image.
    progress: HashMap<String, StageProgress>,
}

/// Stage orders and staging agents. See the module docs.
#[derive(Debug)]
pub struct StageBook {
    generation: u64,
    orders: BTreeMap<String, StageOrder>,
    agents: HashMap<PeerId, AgentEntry>,
}

impl StageBook {
    /// An empty book whose generation starts at `generation` (random per tracker life).
    pub fn new(generation: u64) -> Self {
        Self { generation, orders: BTreeMap::new(), agents: HashMap::new() }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every order, by image.
    pub fn orders(&self) -> Vec<StageOrder> {
        self.orders.values().cloned().collect()
    }

    /// Adds or replaces the order of `order.image`, unless an order of that image
    /// issued later (or the same one) is held already.
    pub fn order(&mut self, mut order: StageOrder) -> Result<(), StageError> {
        if order.image.is_empty() || order.image.len() > MAX_STAGE_IMAGE_LEN {
            return Err(StageError::Image);
        }
        let selectors = order.zones.len() + order.nodes.len();
        if selectors > MAX_STAGE_SELECTORS
            || order.zones.iter().chain(&order.nodes).any(|s| s.len() > MAX_STAGE_NAME_LEN)
        {
            return Err(StageError::Selectors);
        }
        if self.orders.get(&order.image).is_some_and(|held| held.issued_ms >= order.issued_ms) {
            return Ok(());
        }
        order.zones.sort();
        order.zones.dedup();
        order.nodes.sort();
        order.nodes.dedup();
        self.orders.insert(order.image.clone(), order);
        while self.orders.len() > MAX_STAGE_ORDERS {
            let oldest = self.orders.values().min_by_key(|o| o.issued_ms).map(|o| o.image.clone());
            match oldest {
                Some(image) => self.orders.remove(&image),
                None => break,
            };
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }

    /// Notes that `agent` stages (a `WaitStage` or progress report from `addr`).
    pub fn seen(&mut self, agent: &StageAgent, addr: SocketAddr, now: Instant) -> Result<(), StageError> {
        if agent.name.len() > MAX_STAGE_NAME_LEN || agent.zone.len() > MAX_ZONE_LEN {
            return Err(StageError::Agent);
        }
        let entry = self.agents.entry(agent.peer_id).or_insert_with(|| AgentEntry {
            agent: agent.clone(),
            addr,
            last_seen: now,
            progress: HashMap::new(),
        });
        entry.agent = agent.clone();
        entry.addr = addr;
        entry.last_seen = now;
        Ok(())
    }

    /// Records `agent`'s progress reports (each replaces the agent's previous report
    /// of its image). Reports on images without an order are kept too: a tracker that
    /// restarted learns from them what was staged.
    pub fn progress(
        &mut self,
        agent: &StageAgent,
        addr: SocketAddr,
        reports: Vec<StageProgress>,
        now: Instant,
    ) -> Result<(), StageError> {
        if reports.len() > MAX_STAGE_ORDERS {
            return Err(StageError::TooManyReports);
        }
        if reports.iter().any(|r| r.image.is_empty() || r.image.len() > MAX_STAGE_IMAGE_LEN) {
            return Err(StageError::Image);
        }
        self.seen(agent, addr, now)?;
        let Some(entry) = self.agents.get_mut(&agent.peer_id) else { return Ok(()) };
        entry.progress.clear();
        for mut r in reports {
            if let StageState::Failed { reason } = &mut r.state
                && reason.len() > MAX_STAGE_REASON_LEN
            {
                let mut end = MAX_STAGE_REASON_LEN;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            entry.progress.insert(r.image.clone(), r);
        }
        Ok(())
    }

    /// The order of `image` and every staging agent, with its progress on it.
    pub fn status(&self, image: &str, interval: Duration, now: Instant) -> StageStatus {
        let mut agents: Vec<StageAgentView> = self
            .agents
            .values()
            .map(|e| StageAgentView {
                agent: e.agent.clone(),
                addr: e.addr,
                last_seen_ms: u64::try_from(now.saturating_duration_since(e.last_seen).as_millis()).unwrap_or(u64::MAX),
                progress: e.progress.get(image).cloned(),
            })
            .collect();
        agents.sort_by_key(|a| a.agent.peer_id);
        StageStatus {
            order: self.orders.get(image).cloned(),
            interval_secs: u32::try_from(interval.as_secs()).unwrap_or(u32::MAX).max(1),
            agents,
        }
    }

    /// Forgets agents not seen for `ttl`; returns how many.
    pub fn expire_agents(&mut self, now: Instant, ttl: Duration) -> usize {
        let before = self.agents.len();
        self.agents.retain(|_, e| now.saturating_duration_since(e.last_seen) <= ttl);
        before - self.agents.len()
    }

    /// Drops the orders whose pins ended before `now_unix_secs` (wall clock).
    pub fn expire_orders(&mut self, now_unix_secs: u64) {
        self.orders.retain(|_, o| o.pin_until_secs > now_unix_secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(image: &str, issued_ms: u64) -> StageOrder {
        StageOrder {
            image: image.into(),
            zones: vec![],
            nodes: vec![],
            pin_until_secs: 2_000_000_000,
            release: false,
            issued_ms,
        }
    }

    fn agent(n: u8) -> StageAgent {
        StageAgent { peer_id: PeerId([n; 16]), name: format!("node-{n}"), zone: "a".into() }
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:7001".parse().expect("addr")
    }

    #[test]
    fn newer_orders_replace_older_ones_and_bump_the_generation() {
        let mut book = StageBook::new(41);
        book.order(order("r/img:1", 10)).expect("order");
        assert_eq!(book.generation(), 42);
        // The same order again (a resend) or an older one changes nothing.
        book.order(order("r/img:1", 10)).expect("resend");
        book.order(order("r/img:1", 5)).expect("older");
        assert_eq!(book.generation(), 42);
        let mut release = order("r/img:1", 20);
        release.release = true;
        book.order(release).expect("release");
        assert_eq!(book.generation(), 43);
        assert!(book.orders()[0].release);
        book.expire_orders(2_000_000_001);
        assert!(book.orders().is_empty());
    }

    #[test]
    fn the_book_keeps_at_most_the_newest_orders_and_refuses_oversized_ones() {
        let mut book = StageBook::new(0);
        for i in 0..(MAX_STAGE_ORDERS as u64 + 5) {
            book.order(order(&format!("r/img:{i}"), i + 1)).expect("order");
        }
        let orders = book.orders();
        assert_eq!(orders.len(), MAX_STAGE_ORDERS);
        assert!(orders.iter().all(|o| o.issued_ms > 5));
        assert_eq!(book.order(order("", 1)), Err(StageError::Image));
        let mut o = order("r/img:x", 1);
        o.nodes = vec!["n".repeat(MAX_STAGE_NAME_LEN + 1)];
        assert_eq!(book.order(o), Err(StageError::Selectors));
    }

    #[test]
    fn status_lists_every_staging_agent_with_its_progress_and_silent_ones_expire() {
        let mut book = StageBook::new(0);
        let t0 = Instant::now();
        book.order(order("r/img:1", 1)).expect("order");
        book.seen(&agent(1), addr(), t0).expect("seen");
        let report = StageProgress {
            image: "r/img:1".into(),
            issued_ms: 1,
            state: StageState::Failed { reason: "x".repeat(MAX_STAGE_REASON_LEN + 10) },
            manifest: None,
            blobs: 3,
            blobs_held: 1,
            bytes: 30,
            bytes_held: 10,
        };
        book.progress(&agent(2), addr(), vec![report], t0).expect("progress");
        let s = book.status("r/img:1", Duration::from_secs(30), t0 + Duration::from_secs(1));
        assert_eq!(s.order.as_ref().map(|o| o.issued_ms), Some(1));
        assert_eq!(s.interval_secs, 30);
        assert_eq!(s.agents.len(), 2);
        assert!(s.agents[0].progress.is_none());
        let p = s.agents[1].progress.as_ref().expect("agent 2's progress");
        assert!(matches!(&p.state, StageState::Failed { reason } if reason.len() == MAX_STAGE_REASON_LEN));
        assert_eq!(s.agents[1].last_seen_ms, 1000);
        book.seen(&agent(1), addr(), t0 + Duration::from_secs(60)).expect("seen");
        assert_eq!(book.expire_agents(t0 + Duration::from_secs(91), Duration::from_secs(90)), 1);
        assert_eq!(book.status("r/img:1", Duration::from_secs(30), t0).agents.len(), 1);
    }

    #[test]
    fn selection_by_zone_name_or_peer_id_prefix() {
        let mut o = order("r/img:1", 1);
        let a = agent(0xab);
        assert!(o.selects(&a.name, &a.zone, &a.peer_id), "no selector: everybody");
        o.zones = vec!["b".into()];
        assert!(!o.selects(&a.name, &a.zone, &a.peer_id));
        o.nodes = vec!["node-171".into()];
        assert!(o.selects(&a.name, &a.zone, &a.peer_id), "by name");
        o.nodes = vec!["abababab".into()];
        assert!(o.selects(&a.name, &a.zone, &a.peer_id), "by peer id prefix");
        o.nodes = vec!["abab".into()];
        assert!(!o.selects(&a.name, &a.zone, &a.peer_id), "prefixes shorter than 8 digits do not count");
    }
}
