//! The report's chart: four stacked panels over a shared time axis, in hand-written SVG
//! (no dependency, and the output is small and diffable enough for a README).
//!
//! Panels: arrival rate; servers per tier with their total and the oracle's total (dashed);
//! p99 latency; unhappy clients per second. Timelines longer than [`MAX_POINTS`] seconds are
//! averaged into buckets first (p99 keeps the bucket's worst second).

use std::fmt::Write as _;

use crate::model::TIERS;
use crate::report::{format_seconds, Point, Report};

/// Points drawn per line at most.
const MAX_POINTS: usize = 2000;

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 140.0;
/// Space above each panel for its title.
const PANEL_GAP: f64 = 34.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 120.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 44.0;

const PANEL_TITLES: [&str; 4] =
    ["Arrival rate (clients/s)", "Servers per tier", "p99 latency (ms)", "Unhappy clients per second"];

#[derive(Clone, Copy, PartialEq)]
enum Style {
    Line,
    /// Held until the next point: server counts.
    Step,
    Dashed,
    /// Filled down to zero.
    Area,
}

struct Series {
    name: String,
    color: &'static str,
    style: Style,
    values: Vec<f64>,
}

/// One bucket of consecutive seconds, averaged.
struct Bucket {
    t: f64,
    arrival_rate: f64,
    servers: Vec<f64>,
    oracle: f64,
    p99_ms: f64,
    unhappy: f64,
}

fn tier_color(tier: &str) -> &'static str {
    match tier {
        "frontend" => "#2ca02c",
        "catalog" => "#ff7f0e",
        "order" => "#9467bd",
        _ => "#17becf",
    }
}

/// The tiers in the timeline: the known ones in their order, then any other.
fn tiers_of(timeline: &[Point]) -> Vec<String> {
    let mut tiers: Vec<String> = timeline.iter().flat_map(|p| p.servers.keys().cloned()).collect();
    tiers.sort_by_key(|t| (TIERS.iter().position(|x| x == t).unwrap_or(TIERS.len()), t.clone()));
    tiers.dedup();
    tiers
}

fn downsample(timeline: &[Point], tiers: &[String]) -> Vec<Bucket> {
    let size = timeline.len().div_ceil(MAX_POINTS).max(1);
    timeline
        .chunks(size)
        .map(|chunk| {
            let n = chunk.len() as f64;
            let mean = |f: &dyn Fn(&Point) -> f64| chunk.iter().map(f).sum::<f64>() / n;
            Bucket {
                t: chunk[0].t,
                arrival_rate: mean(&|p| p.arrival_rate),
                servers: tiers.iter().map(|t| mean(&|p| p.servers.get(t).copied().unwrap_or(0) as f64)).collect(),
                oracle: mean(&|p| p.oracle_servers as f64),
                p99_ms: chunk.iter().map(|p| p.p99_ms).fold(0.0, f64::max),
                unhappy: mean(&|p| p.unhappy as f64),
            }
        })
        .collect()
}

/// The smallest 1, 2, 4, 5, 6 or 8 × 10^k at or above `x`, so that an axis and its quarter
/// ticks end on round numbers.
fn nice_ceiling(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 4.0, 5.0, 6.0, 8.0, 10.0].iter().map(|m| m * magnitude).find(|&v| v >= x * (1.0 - 1e-12)).unwrap_or(x)
}

/// Tick labels without needless decimals.
fn format_tick(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else if (v * 10.0) == (v * 10.0).round() {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The time axis: its unit's name and length in seconds, and a round tick step in seconds.
fn time_axis(span: f64) -> (&'static str, f64, f64) {
    let (unit, scale) = if span <= 600.0 {
        ("s", 1.0)
    } else if span <= 3.0 * 3600.0 {
        ("min", 60.0)
    } else {
        ("h", 3600.0)
    };
    let step = nice_ceiling(span / scale / 10.0) * scale;
    (unit, scale, step)
}

/// Renders the report's chart as a standalone SVG document.
pub(crate) fn render(report: &Report) -> String {
    let tiers = tiers_of(&report.timeline);
    let buckets = downsample(&report.timeline, &tiers);
    let span = (report.timeline.len() as f64).max(report.duration_s).max(1.0);

    let column = |f: &dyn Fn(&Bucket) -> f64| buckets.iter().map(f).collect::<Vec<f64>>();
    let mut servers: Vec<Series> = tiers
        .iter()
        .enumerate()
        .map(|(i, tier)| Series {
            name: tier.clone(),
            color: tier_color(tier),
            style: Style::Step,
            values: column(&|b| b.servers[i]),
        })
        .collect();
    if tiers.len() > 1 {
        let total = column(&|b| b.servers.iter().sum());
        servers.push(Series { name: "total".into(), color: "#333333", style: Style::Step, values: total });
    }
    servers.push(Series {
        name: "oracle".into(),
        color: "#d62728",
        style: Style::Dashed,
        values: column(&|b| b.oracle),
    });
    let panels: [Vec<Series>; 4] = [
        vec![Series {
            name: "arrivals".into(),
            color: "#1f77b4",
            style: Style::Line,
            values: column(&|b| b.arrival_rate),
        }],
        servers,
        vec![Series { name: "p99".into(), color: "#8c564b", style: Style::Line, values: column(&|b| b.p99_ms) }],
        vec![Series { name: "unhappy".into(), color: "#d62728", style: Style::Area, values: column(&|b| b.unhappy) }],
    ];

    let height = TOP + panels.len() as f64 * (PANEL_GAP + PANEL_HEIGHT) + BOTTOM;
    let plot_width = WIDTH - LEFT - RIGHT;
    let x_of = |t: f64| LEFT + t / span * plot_width;
    let times: Vec<f64> = buckets.iter().map(|b| b.t).collect();
    let (unit, scale, step) = time_axis(span);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let policy = report.policy.as_deref().map(|p| format!(" · policy {p}")).unwrap_or_default();
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">quire load · {}{}</text>"#,
        escape(&report.profile),
        escape(&policy),
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="38" font-size="12" fill="#333">{} clients · {:.1} % unhappy · {:.0} server-seconds, {:.2}× the oracle's</text>"##,
        report.clients,
        report.unhappy_pct,
        report.server_seconds.get("total").copied().unwrap_or(0.0),
        report.ratio_to_oracle
    );

    for (i, (series, title)) in panels.iter().zip(PANEL_TITLES).enumerate() {
        let top = TOP + PANEL_GAP + i as f64 * (PANEL_GAP + PANEL_HEIGHT);
        let bottom = top + PANEL_HEIGHT;
        let max = nice_ceiling(series.iter().flat_map(|s| s.values.iter().copied()).fold(0.0, f64::max));
        let y_of = |v: f64| bottom - v / max * PANEL_HEIGHT;

        let _ = writeln!(svg, r#"<text x="{LEFT}" y="{}" font-size="12" font-weight="bold">{title}</text>"#, top - 8.0);
        // Grid and y labels: quarters of the axis.
        for k in 0..=4 {
            let v = max * k as f64 / 4.0;
            let y = y_of(v);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                LEFT + plot_width,
                LEFT - 6.0,
                y + 4.0,
                format_tick(v)
            );
        }
        // Vertical grid at the time ticks; labels under the last panel only.
        let mut t = 0.0;
        while t <= span + 1e-9 {
            let x = x_of(t);
            let _ = writeln!(svg, r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#f0f0f0"/>"##);
            if i == panels.len() - 1 {
                let _ = writeln!(
                    svg,
                    r##"<text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                    bottom + 16.0,
                    format_tick(t / scale)
                );
            }
            t += step;
        }
        for s in series {
            svg.push_str(&path(s, &times, span, &x_of, &y_of, bottom));
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##
        );
        if series.len() > 1 {
            for (k, s) in series.iter().enumerate() {
                let y = top + 12.0 + k as f64 * 16.0;
                let x = LEFT + plot_width + 12.0;
                let dash = if s.style == Style::Dashed { r#" stroke-dasharray="5,3""# } else { "" };
                let _ = writeln!(
                    svg,
                    r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
                    x + 18.0,
                    s.color,
                    x + 24.0,
                    y + 4.0,
                    escape(&s.name)
                );
            }
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">time ({unit}) · {}</text>"##,
        LEFT + plot_width / 2.0,
        height - 8.0,
        format_seconds(span)
    );
    svg.push_str("</svg>\n");
    svg
}

/// One series as an SVG path.
fn path(
    series: &Series,
    times: &[f64],
    span: f64,
    x_of: &dyn Fn(f64) -> f64,
    y_of: &dyn Fn(f64) -> f64,
    bottom: f64,
) -> String {
    let Some(&first) = series.values.first() else { return String::new() };
    let mut d = String::new();
    if series.style == Style::Area {
        let _ = write!(d, "M{:.1},{bottom:.1} ", x_of(times[0]));
    }
    let _ =
        write!(d, "{}{:.1},{:.1}", if series.style == Style::Area { "L" } else { "M" }, x_of(times[0]), y_of(first));
    for (i, (&t, &v)) in times.iter().zip(&series.values).enumerate().skip(1) {
        if series.style == Style::Step {
            let _ = write!(d, " H{:.1} V{:.1}", x_of(t), y_of(v));
        } else {
            let _ = write!(d, " L{:.1},{:.1}", x_of(t), y_of(v));
        }
        // A step holds its last value to the end of the timeline.
        if i == times.len() - 1 && series.style != Style::Line {
            let _ = write!(d, " H{:.1}", x_of(span));
        }
    }
    let (fill, dash) = match series.style {
        Style::Area => {
            let _ = write!(d, " V{bottom:.1} Z");
            (format!(r#" fill="{}" fill-opacity="0.35""#, series.color), "")
        }
        Style::Dashed => (r#" fill="none""#.to_string(), r#" stroke-dasharray="5,3""#),
        Style::Line | Style::Step => (r#" fill="none""#.to_string(), ""),
    };
    format!(
        "<path d=\"{d}\" stroke=\"{}\" stroke-width=\"1.5\" stroke-linejoin=\"round\"{fill}{dash}/>\n",
        series.color
    )
}

#[cfg(test)]
mod tests {
    use quire_common::capacity::Costs;

    use super::*;
    use crate::model::{ClientModel, Op, Outcome, Status};
    use crate::profile::Profile;
    use crate::report::Recorder;

    fn report(spec: &str) -> Report {
        let profile = Profile::parse(spec).unwrap();
        let mut r = Recorder::new(&profile, ClientModel::default(), Costs::CLOUD_SIM);
        let d = profile.duration() as usize;
        for s in 0..d {
            let t = s as f64;
            r.arrival(t);
            r.request(t, Op::Lookup, 100.0 + (s % 50) as f64, Outcome::Ok);
            r.client(t, if s % 7 == 0 { Status::Dropped } else { Status::Ok });
            for (tier, n) in [("frontend", 1 + (s / 100) as u32 % 4), ("catalog", 3), ("order", 3)] {
                r.servers(t, tier, n);
            }
        }
        let mut report = r.finish();
        report.policy = Some("a<b".into());
        report
    }

    #[test]
    fn svg_has_the_panels() {
        let svg = report("ramp-1-20-300s").to_svg();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        for title in PANEL_TITLES {
            assert!(svg.contains(title), "{title}");
        }
        for legend in ["frontend", "catalog", "order", "oracle", "stroke-dasharray"] {
            assert!(svg.contains(legend), "{legend}");
        }
        assert!(svg.contains("a&lt;b"));
        assert!(!svg.contains("NaN"));
        assert_eq!(svg.matches("<svg").count(), 1);
    }

    #[test]
    fn long_timelines_are_downsampled() {
        let report = report("c-1-6h");
        assert_eq!(report.timeline.len(), 21_600);
        let tiers = tiers_of(&report.timeline);
        assert_eq!(tiers, ["frontend", "catalog", "order"]);
        let buckets = downsample(&report.timeline, &tiers);
        assert!(buckets.len() <= MAX_POINTS);
        let svg = report.to_svg();
        assert!(svg.len() < 1_000_000, "{}", svg.len());
        assert!(svg.contains("time (h)"));
    }

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 8.0);
        assert_eq!(nice_ceiling(9.0), 10.0);
        assert_eq!(nice_ceiling(2.2), 4.0);
        assert_eq!(nice_ceiling(52.0), 60.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(format_tick(2.5), "2.5");
        assert_eq!(time_axis(120.0), ("s", 1.0, 20.0));
        assert_eq!(time_axis(86_400.0).0, "h");
    }
}
