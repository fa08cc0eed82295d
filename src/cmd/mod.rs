//! One module per subcommand, plus the options and helpers they share.

pub mod agent;
pub mod common;
pub mod containerd_config;
pub mod demo;
pub mod demo_upstream;
pub mod health;
pub mod metrics;
pub mod pull;
pub mod seed;
pub mod stage;
pub mod status;
pub mod token;
pub mod tracker;
