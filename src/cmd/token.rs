//! `swarm token`: make a new random cluster token, print it or write it to a file
//! only root can read (`--output FILE`, mode 0600, its directory created).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use swarm_net::ClusterToken;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write the token to FILE (mode 0600; missing directories are created, mode
    /// 0700) instead of printing it.
    #[arg(short, long, env = "SWARM_TOKEN_OUTPUT", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Replace FILE if it exists (every node must then get the new token).
    #[arg(long, env = "SWARM_TOKEN_FORCE", requires = "output")]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    let text = ClusterToken::generate().to_text();
    match &args.output {
        None => println!("{text}"),
        Some(path) => {
            write_token(path, &text, args.force)?;
            eprintln!(
                "wrote a new cluster token to {} (mode 0600); copy it to every node and the tracker",
                path.display()
            );
        }
    }
    Ok(())
}

/// Writes `text` and a newline to `path` with mode 0600, through a temporary file in
/// the same directory renamed into place, so no reader ever sees a partial token.
fn write_token(path: &Path, text: &str, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; a new token would lock out every node holding the old one. \
             Pass --force to replace it.",
            path.display()
        );
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).with_context(|| format!("creating the directory {}", dir.display()))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".swarm-token-")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    // tempfile creates files with mode 0600 on unix; say so explicitly anyway.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(format!("{text}\n").as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
