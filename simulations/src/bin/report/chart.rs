//! The completion chart: for every emulated scenario one panel, in it one step line
//! per system (and repeat): x = seconds since the common start, y = nodes whose copy
//! was complete by then (an empirical CDF, unnormalised), with `T_min` as a dashed
//! vertical line.
//!
//! Drawn with plotters' SVG backend and no font backend: the backend writes text as
//! SVG `<text>` elements in the viewer's `sans-serif`, and plotters only estimates
//! text extents for the layout, so labels, captions and the legend need no font
//! files. The markdown repeats the legend anyway.

use anyhow::anyhow;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::input::{EmuDoc, Loaded};

/// One system's line in a panel (repeats are lines of the same colour).
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub system: String,
    /// Completion times of the nodes that finished, ascending.
    pub times: Vec<f64>,
}

/// One scenario of one emulation document.
#[derive(Clone, Debug, PartialEq)]
pub struct Panel {
    pub title: String,
    pub t_min: Option<f64>,
    /// Downloading nodes (the y range).
    pub nodes: u32,
    pub lines: Vec<Line>,
}

/// The order of the systems in the legend.
pub const ORDER: [&str; 4] = ["direct", "swarm", "swarm-seed", "libtorrent"];

/// The colour of a system (fixed, so every chart reads the same).
pub fn colour(system: &str) -> RGBColor {
    match system {
        "direct" => RGBColor(127, 127, 127),
        "swarm" => RGBColor(31, 119, 180),
        "swarm-seed" => RGBColor(23, 190, 207),
        "libtorrent" => RGBColor(255, 127, 14),
        _ => RGBColor(148, 103, 189),
    }
}

/// The colour's name in the markdown legend.
pub fn colour_name(system: &str) -> &'static str {
    match system {
        "direct" => "grey",
        "swarm" => "blue",
        "swarm-seed" => "cyan",
        "libtorrent" => "orange",
        _ => "purple",
    }
}

/// The panels of every scenario of every document, in input order.
pub fn panels(docs: &[Loaded<EmuDoc>]) -> Vec<Panel> {
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let mut scenarios: Vec<&str> = Vec::new();
        for r in &doc.data.results {
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
        for sc in scenarios {
            let results: Vec<_> = doc.data.results.iter().filter(|r| r.scenario == sc).collect();
            let lines = results
                .iter()
                .filter(|r| r.nodes.iter().any(|n| n.done_s.is_some()))
                .map(|r| {
                    let mut times: Vec<f64> = r
                        .nodes
                        .iter()
                        .filter(|n| n.status == "done")
                        .filter_map(|n| n.done_s)
                        .filter(|t| t.is_finite())
                        .collect();
                    times.sort_by(f64::total_cmp);
                    Line { system: r.system.clone(), times }
                })
                .collect();
            let first = results.first();
            let nodes = results.iter().filter_map(|r| r.n_downloaders).max().unwrap_or(doc.data.params.nodes);
            let p = &doc.data.params;
            let file = if docs.len() > 1 { format!(" [{}]", i + 1) } else { String::new() };
            out.push(Panel {
                title: format!("{sc}: {} nodes, {}{file}", nodes, crate::markdown::size(p.size_bytes)),
                t_min: first.and_then(|r| r.t_min_s),
                nodes,
                lines,
            });
        }
    }
    out
}

/// The step points of a CDF: (0, 0), then up by one at every completion.
pub fn steps(times: &[f64]) -> Vec<(f64, f64)> {
    let mut pts = vec![(0.0, 0.0)];
    for (k, &t) in times.iter().enumerate() {
        pts.push((t, k as f64));
        pts.push((t, (k + 1) as f64));
    }
    pts
}

const PANEL_W: u32 = 560;
const PANEL_H: u32 = 400;

const LEGEND_H: u32 = 40;

/// The SVG document of `panels` (one row of up to three panels per line) under a
/// legend strip: one entry per system, and `T_min`.
pub fn render(panels: &[Panel]) -> anyhow::Result<String> {
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    let mut systems: Vec<&str> = Vec::new();
    for l in panels.iter().flat_map(|p| &p.lines) {
        if !systems.contains(&l.system.as_str()) {
            systems.push(&l.system);
        }
    }
    systems.sort_by_key(|s| ORDER.iter().position(|o| o == s).unwrap_or(ORDER.len()));
    let mut svg = String::new();
    {
        let size = (PANEL_W * cols as u32, LEGEND_H + PANEL_H * rows as u32);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
        let (legend, body) = root.split_vertically(LEGEND_H);
        draw_legend(&legend, &systems).map_err(|e| anyhow!("chart legend: {e}"))?;
        let areas = body.split_evenly((rows, cols));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, panel).map_err(|e| anyhow!("chart {}: {e}", panel.title))?;
        }
        root.present().map_err(|e| anyhow!("chart: {e}"))?;
    }
    Ok(svg)
}

fn draw_legend(area: &Area<'_>, systems: &[&str]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let y = (LEGEND_H / 2) as i32;
    let font = ("sans-serif", 18).into_font();
    let mut x = 60;
    for sys in systems {
        area.draw(&PathElement::new(vec![(x, y), (x + 30, y)], colour(sys).stroke_width(3)))?;
        area.draw(&Text::new(sys.to_string(), (x + 38, y - 8), font.clone()))?;
        x += 38 + 10 * sys.len() as i32 + 40;
    }
    let style = ShapeStyle { color: BLACK.mix(0.6), filled: false, stroke_width: 1 };
    area.draw(&DashedPathElement::new(vec![(x, y), (x + 30, y)], 6, 4, style))?;
    area.draw(&Text::new("T_min", (x + 38, y - 8), font))?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Area<'_>, panel: &Panel) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let last = panel.lines.iter().filter_map(|l| l.times.last()).copied().fold(0.0, f64::max);
    let x_max = (last.max(panel.t_min.unwrap_or(0.0)) * 1.05).max(1.0);
    let y_max = f64::from(panel.nodes.max(1)) + 0.5;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("nodes finished")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .y_labels(panel.nodes.clamp(2, 11) as usize)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    if let Some(t) = panel.t_min {
        let style = ShapeStyle { color: BLACK.mix(0.6), filled: false, stroke_width: 1 };
        chart.draw_series(DashedLineSeries::new(vec![(t, 0.0), (t, y_max)], 6, 4, style))?;
        let font = ("sans-serif", 14).into_font().color(&BLACK.mix(0.7));
        chart.draw_series(std::iter::once(
            EmptyElement::at((t, y_max)) + Text::new(format!("T_min {t:.2} s"), (5, 2), font),
        ))?;
    }
    for line in &panel.lines {
        let c = colour(&line.system);
        let style = c.stroke_width(2);
        chart.draw_series(LineSeries::new(steps(&line.times), style))?;
    }
    Ok(())
}
