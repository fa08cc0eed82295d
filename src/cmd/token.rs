//! `swarm token`: print a new random cluster token.

use anyhow::Result;
use swarm_net::ClusterToken;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    println!("{}", ClusterToken::generate().to_text());
    Ok(())
}
