//! `swarm-report`: turns benchmark JSON into `docs/benchmarks.md` and a completion
//! chart (`docs/benchmarks-completion.svg`).
//!
//! Inputs are `emulate.py run --json` documents (`--emu`, schema `swarm-emulate/1`)
//! and `swarm-sim --json` outputs (`--sim`). Neither records the command line that
//! made it, so the commands are given with `--command` (repeatable) or
//! `--commands-file` (one a line) and printed verbatim; the report's own command line
//! is added from its arguments. The targets' verdicts are computed from the figures
//! (see [`targets`]). The output is a pure function of the inputs and arguments.
//!
//! ```sh
//! target/release/swarm-report --emu simulations/results/emulate.json \
//!     --sim simulations/results/sim-edge-1000.json --commands-file simulations/results/commands.sh \
//!     --out docs/benchmarks.md --svg docs/benchmarks-completion.svg
//! ```

mod chart;
mod input;
mod markdown;
mod targets;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

/// Writes the benchmark report (markdown + SVG chart) from emulation and simulator JSON.
#[derive(Debug, Parser)]
#[command(name = "swarm-report", version)]
struct Args {
    /// An `emulate.py run --json` document (repeatable).
    #[arg(long = "emu", value_name = "FILE")]
    emu: Vec<PathBuf>,
    /// A `swarm-sim --json` output (repeatable).
    #[arg(long = "sim", value_name = "FILE")]
    sim: Vec<PathBuf>,
    /// A command that produced the inputs, shown verbatim (repeatable, in order).
    #[arg(long = "command", value_name = "CMD")]
    command: Vec<String>,
    /// A file of such commands, one a line (blank lines skipped), shown before `--command`s.
    #[arg(long, value_name = "FILE")]
    commands_file: Option<PathBuf>,
    /// The markdown to write.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// The SVG chart to write (linked from the markdown).
    #[arg(long, default_value = "docs/benchmarks-completion.svg")]
    svg: PathBuf,
    /// Write no chart.
    #[arg(long)]
    no_chart: bool,
}

/// Where `target` is, as seen from the directory of `from` (for a markdown link).
fn link_from(from: &Path, target: &Path) -> String {
    let dir = from.parent().unwrap_or(Path::new(""));
    match target.strip_prefix(dir) {
        Ok(rel) if !dir.as_os_str().is_empty() => rel.display().to_string(),
        _ if target.parent() == Some(dir) => {
            target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        }
        _ => target.display().to_string(),
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn run(args: &Args, argv: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(!args.emu.is_empty() || !args.sim.is_empty(), "no inputs: give --emu and/or --sim files");
    let emu = args.emu.iter().map(|p| input::load_emu(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let sim = args.sim.iter().map(|p| input::load_sim(p)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut commands = Vec::new();
    if let Some(f) = &args.commands_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        commands.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    commands.extend(args.command.iter().cloned());
    let report_command = argv.iter().map(|a| markdown::shell_quote(a)).collect::<Vec<_>>().join(" ");
    let checks = targets::checks(&emu, &sim);
    let panels = chart::panels(&emu);
    let draw = !args.no_chart && !panels.is_empty();
    let link = link_from(&args.out, &args.svg);
    let md = markdown::render(&markdown::Doc {
        emu: &emu,
        sim: &sim,
        checks: &checks,
        commands: &commands,
        report_command: &report_command,
        chart: draw.then_some(link.as_str()),
    });
    if draw {
        write(&args.svg, &chart::render(&panels)?)?;
    }
    write(&args.out, &md)?;
    for c in &checks {
        eprintln!("{}: {} ({})", c.verdict.label().trim_matches('*'), c.target, c.measured);
    }
    eprintln!(
        "wrote {}{}",
        args.out.display(),
        if draw { format!(" and {}", args.svg.display()) } else { String::new() }
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let args = Args::parse();
    run(&args, &argv)
}

#[cfg(test)]
mod tests;
